"""DART end to end on the real engine: built-in arithmetic → dart → dataset, every row of
which re-verifies as correct; the stage stats give trials and coverage per level."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe
from gristmill.verify import get_verifier

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "dart-arith.yaml"

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SMALL = [
    "input.rows=10",
    "input.options={levels: [1, 3]}",
    "stages.dart.max_tokens=160",
    "stages.dart.probe_samples=2",
    "stages.dart.samples_per_round=2",
    "stages.dart.k_p=2",
    "stages.dart.max_trials=6",
]


def test_dart_arith_lands_verified_rows_with_per_level_stats(
    engine: Engine, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_recipe(RECIPE, out, SMALL, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    dart = manifest["stages"][0]
    assert dart["stage"] == "dart" and dart["rows_in"] == 10
    extra = dart["extra"]
    buckets = extra["buckets"]
    assert set(buckets) == {"1", "3"}
    assert sum(b["queries"] for b in buckets.values()) == 10
    trials = sum(b["trials"] for b in buckets.values())
    assert 20 <= trials <= 60  # probe 2 each, at most 6 each
    # one generate call per round, never one per problem
    assert dart["engine"]["calls"] == extra["rounds"] == extra["calls"] <= 3
    covered = sum(b["covered"] for b in buckets.values())
    assert dart["rows_out"] + dart["dropped"].get("no_correct_sample", 0) >= 10 - covered

    ds = datasets.load_dataset("parquet", data_dir=str(out / "dataset" / "data"), split="train")
    assert len(ds) == manifest["stages"][-1]["rows_out"]
    assert len(ds) >= 1, "the model solves some level-1 sums"
    verify = get_verifier("math")
    for row in ds:
        assert row["parent_id"] and row["source"] == "arith"
        assert row["messages"][-1]["content"] == row["response"]
        verdict = verify(row["response"], row["reference"])
        assert verdict.correct, (row["response"], row["reference"])
        assert row["verdict_extracted"] is not None
        assert row["query_correct"] >= 1 and row["query_trials"] <= 6
