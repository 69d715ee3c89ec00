"""START end to end on the real engine: the start-math recipe through the Prefect flow. The
model's Python is executed in the sandbox and its output lands in the saved trajectory;
every kept row re-verifies and made a successful tool call."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe
from gristmill.records import DROP_REASON
from gristmill.sandbox import Limits, run_cell
from gristmill.synth.hint_infer import cell_output, prose
from gristmill.verify import get_verifier

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "start-math.yaml"

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SMALL = [
    "input.rows=4",
    "input.options={levels: [1]}",
    "stages.hint_infer.samples=1",
    "stages.hint_infer.max_tokens=160",
]


def test_start_math_executes_code_and_saves_it_in_the_trajectory(
    engine: Engine, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_recipe(RECIPE, out, SMALL, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"][0]
    assert stage["stage"] == "hint_infer" and stage["rows_in"] == 4
    extra = stage["extra"]
    assert extra["problems"] == 4 and extra["trajectories"] == 4
    # continuous (the default): every trajectory step and greedy baseline is one request
    assert stage["engine"]["calls"] == extra["calls"] >= extra["rounds"] >= 1
    assert extra["hints"].get("stop", 0) >= 1 and extra["tool_calls"] >= 1

    (stage_dir,) = out.glob("01_hint_infer-*")
    rows = pl.concat(
        [pl.read_parquet(p) for p in sorted(stage_dir.rglob("part-*.parquet"))],
        how="diagonal_relaxed",
    ).filter(pl.col("parent_id").is_not_null())
    assert rows.height == 4
    calls = [(r, c) for r in rows.iter_rows(named=True) for c in r["tool_calls"]]
    assert calls, "the prefilled code fence makes the model write code that runs"
    for row, call in calls:
        response = row["response"]
        shown = f"```output\n{call['output']}\n```" if call["output"] else "```output\n```"
        assert response[call["position"] :].startswith(shown)
        assert call["code"] in response[: call["position"]]
        assert call["status"] in ("ok", "error", "timeout", "killed")
    # the saved output is what the code prints when run again in the sandbox
    row, call = calls[0]  # the first call of its trajectory: no earlier cells to replay
    assert row["tool_calls"][0] == call
    again = run_cell(call["code"], limits=Limits(timeout_s=5, cpu_s=5))
    assert again.status == call["status"]
    if again.status == "ok":
        assert cell_output(again, 1000) == call["output"]
    hinted = [r for r in rows.iter_rows(named=True) if r["hints"]]
    assert hinted
    for row in hinted:
        kept = row[DROP_REASON] is None
        for hint in row["hints"]:
            kind, _, word = hint["point"].partition(":")
            assert kind in ("stop", "trigger")
            assert hint["text"].startswith(f"{word}, " if word else ("Wait, ", "Alternatively, "))
            at = row["response"][hint["position"] :]
            assert hint["edit"] in (("stripped", "marked") if kept else (None,))
            if hint["edit"] == "stripped":  # Hint-RFT's modify step took it out: its code follows
                assert hint["text"] not in row["response"] and at.startswith("```python\n")
            else:  # the prefilled fence follows the hint
                assert at.startswith(hint["text"] + "\n\n```python\n")
    assert sum(extra["hints"].values()) == sum(len(r["hints"]) for r in rows.iter_rows(named=True))

    # the dataset holds exactly the kept trajectories (with 4 level-1 problems and one
    # sample each there may be none; the unit tests cover the filter on scripted models)
    dataset = pl.read_parquet(out / "dataset" / "data")
    kept = rows.filter(pl.col(DROP_REASON).is_null())
    assert dataset.height == kept.height
    if kept.height:
        assert sorted(dataset["id"]) == sorted(kept["id"])
    verify = get_verifier("math")
    for row in dataset.iter_rows(named=True):
        assert verify(prose(row["response"]), row["reference"]).correct
        assert row["n_tool_ok"] >= 1 and row["messages"][-1]["content"] == row["response"]
    for row in rows.filter(pl.col(DROP_REASON) == "not_verified").iter_rows(named=True):
        assert not verify(prose(row["response"]), row["reference"]).correct
