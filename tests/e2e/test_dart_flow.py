"""DART end to end on the real engine: built-in arithmetic → dart → dataset, every row of
which re-verifies as correct; the stage stats give trials and coverage per level (the run is
`dart_run` in conftest.py, shared with the trainer tests); a second run takes its
difficulty from the first's counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import polars as pl
import pytest
from dart_small import DART_RECIPE, DART_SMALL

from gristmill.flows.recipe import run_recipe
from gristmill.verify import get_verifier

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_dart_arith_lands_verified_rows_with_per_level_stats(dart_run: Path) -> None:
    out = dart_run
    manifest = json.loads((out / "manifest.json").read_text())
    dart = manifest["stages"][0]
    assert dart["stage"] == "dart" and dart["rows_in"] == 10
    extra = dart["extra"]
    buckets = extra["buckets"]
    assert set(buckets) == {"1", "3"}
    assert sum(b["queries"] for b in buckets.values()) == 10
    trials = sum(b["trials"] for b in buckets.values())
    assert 20 <= trials <= 60  # probe 2 each, at most 6 each
    # continuous (the default): one request per query per round, each as soon as the query's
    # last one was verified; at most 3 per query (the probe, then 2 samples at a time to 6)
    assert dart["engine"]["calls"] == extra["calls"]
    assert 10 <= extra["calls"] <= 30 and 1 <= extra["rounds"] <= 3
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


def _query_rows(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """One row per sampled query of a finished dart stage folder: kept rows by their
    parent_id, rejected ones (sampled, nothing kept) by their id."""
    out: dict[str, dict[str, Any]] = {}
    for pattern, key in (("part-*.parquet", "parent_id"), ("rejected/part-*.parquet", "id")):
        for path in sorted(stage_dir.glob(pattern)):
            frame = pl.read_parquet(path).filter(pl.col("query_trials").is_not_null())
            for row in frame.iter_rows(named=True):
                out[row[key]] = row
    return out


def test_difficulty_from_the_shared_run_skips_the_probe(dart_run: Path, tmp_path: Path) -> None:
    """A second run reads the first run's counters: each query's fail rate is its failures
    over every sample the first run drew, and the second run samples once, with no probe."""
    first = json.loads((dart_run / "manifest.json").read_text())["stages"][0]
    first_dir = dart_run / first["dir"]
    pool = {}
    for qid, row in _query_rows(first_dir).items():
        trials, raw = row["query_trials"], row["query_raw_correct"]
        assert raw >= row["query_correct"]
        pool[qid] = round((trials - raw) / trials, 6)
    assert len(pool) == 10

    out = tmp_path / "again"
    again = [f"stages.dart.difficulty_from={dart_run}", "stages.dart.samples_per_round=1"]
    again.append("stages.dart.max_trials=1")
    run_recipe(DART_RECIPE, out, [*DART_SMALL, *again], show_progress=False)
    dart = json.loads((out / "manifest.json").read_text())["stages"][0]
    source = dart["extra"]["difficulty"]
    assert source["source"] == "earlier_run" and source["stage_dir"] == str(first_dir)
    assert source["fingerprint"] == first["fingerprint"] and source["queries"] == 10
    # one request of one sample per query: no probing round
    assert dart["extra"]["rounds"] == 1 and dart["engine"]["calls"] == 10
    assert sum(b["trials"] for b in dart["extra"]["buckets"].values()) == 10
    assert {q: r["fail_rate"] for q, r in _query_rows(out / dart["dir"]).items()} == pool
