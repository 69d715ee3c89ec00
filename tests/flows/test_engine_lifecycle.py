"""Engine lifecycle across stages, on the threads and the Dask runner, with cheap engines.

The engines are OpenAI-compatible clients (building one contacts no server), used by a
stage that only asks for its engine, so the test sees the pipeline's start/close order
without loading a model: each engine starts when its first stage runs and is closed
before a stage that does not use it, in every process that started it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import gristmill as gm

ALPACA = (
    Path(__file__).resolve().parents[1] / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
)

MODULE = '''
import polars as pl

import gristmill as gm


class Touch(gm.Map):
    """Writes which model its engine serves (asks for the engine, calls nothing)."""

    engine: str | None = None
    uses_engine = True

    def process(self, batch: pl.DataFrame, ctx: gm.StageContext) -> pl.DataFrame:
        return batch.with_columns(pl.lit(ctx.engine().model_id).alias(f"model_{ctx.stage_index}"))
'''


@pytest.fixture
def touch_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "lifecycle_stages.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))  # Dask's worker processes inherit it
    yield folder
    sys.modules.pop("lifecycle_stages", None)


def recipe(resident: bool = False) -> gm.Recipe:
    url = "http://127.0.0.1:9"  # never contacted
    return gm.Recipe.from_dict(
        {
            "name": "lifecycle",
            "part_rows": 4,
            "input": {"path": str(ALPACA), "mapping": {"prompt": "instruction"}, "limit": 12},
            "engines": {
                "a": {"backend": "openai", "model": "model-a", "options": {"base_url": url}},
                "b": {
                    "backend": "openai",
                    "model": "model-b",
                    "options": {"base_url": url},
                    "resident": resident,
                },
            },
            "stages": [
                {"lifecycle_stages:Touch": {"engine": "a"}},
                {"heuristics": {"check_response": False}},  # no LLM: `a` stays loaded
                {"lifecycle_stages:Touch": {"engine": "a"}},
                {"lifecycle_stages:Touch": {"engine": "b"}},
                {"lifecycle_stages:Touch": {"engine": "a"}},
            ],
        }
    )


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "logs" / "engines.jsonl").read_text().splitlines()]


def test_threads_one_engine_at_a_time_and_resident(touch_module: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe().run(run, show_progress=False)
    assert [(e["event"], e["engine"]) for e in events(run)] == [
        ("start", "a"),
        ("close", "a"),
        ("start", "b"),
        ("close", "b"),
        ("start", "a"),
        ("close", "a"),
    ]
    data = pl.read_parquet(run / "dataset" / "data" / "*.parquet")
    assert data.select("model_1", "model_3", "model_4", "model_5").unique().rows() == [
        ("model-a", "model-a", "model-b", "model-a")
    ]
    recipe().run(run, show_progress=False)  # all done: a rerun starts nothing
    assert len(events(run)) == 6

    kept = tmp_path / "resident"
    recipe(resident=True).run(kept, show_progress=False)
    assert [(e["event"], e["engine"]) for e in events(kept)] == [
        ("start", "a"),
        ("close", "a"),
        ("start", "b"),  # resident: stays loaded while `a` runs again, and after the run
        ("start", "a"),
        ("close", "a"),
    ]


@pytest.mark.slow
def test_dask_workers_close_their_engines_between_stages(
    touch_module: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    recipe().run(run, runner="dask", workers=2, show_progress=False)
    log = sorted(events(run), key=lambda e: e["at"])
    assert {e["engine"] for e in log if e["event"] == "start"} == {"a", "b"}
    assert len({e["process"] for e in log}) == 2, "each worker process ran parts"
    open_now: set[tuple[int, str]] = set()
    for e in log:
        key = (e["process"], e["engine"])
        if e["event"] == "start":
            others = {name for _, name in open_now if name != e["engine"]}
            assert not others, f"{e['engine']} started while {others} still ran: {log}"
            assert key not in open_now
            open_now.add(key)
        else:
            open_now.remove(key)
    assert not open_now, "every worker closed its engines after the last stage"
    data = pl.read_parquet(run / "dataset" / "data" / "*.parquet")
    assert data.select("model_1", "model_3", "model_4", "model_5").unique().rows() == [
        ("model-a", "model-a", "model-b", "model-a")
    ]
