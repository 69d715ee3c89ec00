"""The default recipe end to end through the Prefect flow on the real vLLM engine.

Magpie → heuristics → embed → semantic dedup → k-means → dataset, loaded with `datasets`
and queried with DuckDB; then a run killed with SIGKILL mid-stage and resumed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import polars as pl
import pytest

from gristmill.catalog import query
from gristmill.cli import main as cli_main
from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "magpie.yaml"

# Small enough for CI, big enough that every stage has work; the engine spec is left as in
# the recipe so the flow reuses the session's engine.
SMALL = [
    "input.rows=24",
    "part_rows=4",
    "stages.magpie.instruction_max_tokens=40",
    "stages.magpie.response_max_tokens=80",
    "stages.heuristics.min_prompt_words=2",
    # 80-token answers are mostly cut: keep them, so that k-means has more rows than its
    # budget whatever the sampled text (with only 6 left, it kept all and rejected none)
    "stages.heuristics.drop_truncated=false",
    "stages.kmeans.budget=6",
    "stages.kmeans.k=3",
]

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def clean_run(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    dataset = run_recipe(RECIPE, out, SMALL, show_progress=False)
    assert dataset == out / "dataset"
    return out


def test_flow_lands_a_dataset_trainers_and_duckdb_read(clean_run: Path) -> None:
    manifest = json.loads((clean_run / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [s["stage"] for s in stages] == [
        "magpie",
        "heuristics",
        "embed",
        "semantic_dedup",
        "kmeans",
    ]
    assert stages[0]["rows_in"] == 24
    for before, after in itertools.pairwise(stages):
        assert after["rows_in"] == before["rows_out"], "stages must chain row counts"
    assert stages[0]["engine"]["calls"] >= 12, "one instruction + one response call per part"
    assert stages[0]["engine"]["output_tokens"] > 0

    ds = datasets.load_dataset(
        "parquet", data_dir=str(clean_run / "dataset" / "data"), split="train"
    )
    assert len(ds) == manifest["dataset"]["rows"] == stages[-1]["rows_out"]
    assert 0 < len(ds) <= 6
    assert "embedding" not in ds.column_names, "embeddings stay in stage outputs, not the dataset"
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert row["prompt"].strip() and row["response"].strip()
        assert "<|im_start|>" not in row["prompt"]
        assert row["model"] == "smollm2-135m-instruct" and row["source"] == "magpie"

    _, rows = query(clean_run, "select count(*) from dataset")
    assert rows[0][0] == len(ds)
    _, rows = query(clean_run, "select stage, rows_in, rows_out from stage_stats order by index")
    assert [r[0] for r in rows] == [s["stage"] for s in stages]
    # every dataset row traces back to a magpie output row, and dropped rows are queryable
    _, rows = query(
        clean_run,
        "select count(*) from dataset d join magpie m using (id)",
    )
    assert rows[0][0] == len(ds)
    _, rows = query(clean_run, "select drop_reason, count(*) from kmeans_rejected group by 1")
    assert dict(rows).get("not_selected", 0) == stages[-1]["rows_in"] - stages[-1]["rows_out"]
    card = (clean_run / "dataset" / "README.md").read_text()
    assert "Magpie" in card and "kMQ" in card


def test_cli_query_formats(clean_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli_main(
            [
                "query",
                "--run",
                str(clean_run),
                "--format",
                "json",
                "select stage, rows_out from stage_stats order by index",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["stage"] == "magpie"
    assert cli_main(["query", "--run", str(clean_run), "select count(*) as n from dataset"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].strip() == "n" and "(1 rows)" in out
    assert cli_main(["query", "--run", str(clean_run / "nope"), "select 1"]) == 2


#: Resume must reproduce a clean run exactly only in the reproducible mode.
DETERMINISTIC = [*SMALL, "deterministic=true"]


@pytest.mark.heavy
def test_sigkill_mid_stage_then_resume_matches_clean_run(engine: Engine, tmp_path: Path) -> None:
    clean_run = tmp_path / "clean"
    run_recipe(RECIPE, clean_run, DETERMINISTIC, show_progress=False)
    out = tmp_path / "run"
    # its own Prefect home: two ephemeral Prefect servers must not share one SQLite file
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gristmill.cli",
            "run",
            str(RECIPE),
            "--out",
            str(out),
            "--no-progress",
            *[a for s in DETERMINISTIC for a in ("--set", s)],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        first_part = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = sorted(out.glob("01_magpie-*/part-00000.parquet"))
            if found:
                first_part = found[0]
                break
            time.sleep(0.05)
        assert first_part is not None, f"no magpie part appeared; log:\n{_tail(tmp_path)}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stage_dir = first_part.parent
    done = {p.name: p.stat().st_mtime_ns for p in stage_dir.glob("part-*.parquet")}
    assert 1 <= len(done) < 6, f"kill must land mid-stage, found parts {sorted(done)}"
    assert not (stage_dir / "_SUCCESS.json").exists()
    assert not list(stage_dir.glob("*.tmp")), "temp files are hidden (dot-prefixed)"

    dataset = run_recipe(RECIPE, out, DETERMINISTIC, show_progress=False)

    for name, mtime in done.items():
        assert (stage_dir / name).stat().st_mtime_ns == mtime, f"{name} was regenerated"
    assert len(list(stage_dir.glob("part-*.parquet"))) == 6
    resumed = pl.read_parquet(dataset / "data" / "*.parquet").sort("id")
    clean = pl.read_parquet(clean_run / "dataset" / "data" / "*.parquet").sort("id")
    assert resumed.equals(clean), "resumed dataset must equal a clean run with the same seed"
    magpie_resumed = pl.read_parquet(stage_dir / "part-*.parquet").sort("id")
    magpie_clean = pl.read_parquet(next(clean_run.glob("01_magpie-*")) / "part-*.parquet")
    assert magpie_resumed.equals(magpie_clean.sort("id"))


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "killed.log").read_text()[-4000:]
