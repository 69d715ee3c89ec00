"""The live line of a running stage: counts read from finished parts' stats, and its text."""

from __future__ import annotations

import time
from pathlib import Path

from gristmill.flows.live import LiveCounts, live_counts, live_line
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"


def test_line_says_rows_in_flight_speed_drops_and_eta() -> None:
    counts = LiveCounts(
        rows_done=120, rows_total=480, dropped=5, in_flight=37, tokens=6360, seconds=30.0
    )
    assert live_line(counts) == "rows 120/480 · in flight 37 · 212 tok/s · dropped 5 · ETA 1m30s"
    idle = LiveCounts(rows_done=0, rows_total=10, dropped=0, in_flight=None, tokens=None, seconds=1)
    assert live_line(idle) == "rows 0/10 · dropped 0"


def test_counts_come_from_the_finished_parts(tmp_path: Path) -> None:
    recipe = Recipe(
        part_rows=30,
        input={
            "path": str(ALPACA),
            "mapping": {"prompt": "instruction", "input": "input", "response": "output"},
        },
        stages=[{"heuristics": {"min_response_words": 40}}],
    )
    pipeline = Pipeline(recipe, tmp_path / "run", show_progress=False)
    pipeline.run(progress=lambda _line: None)
    planned = pipeline.stages[0]
    inputs = pipeline.stage_input_parts(planned)
    counts = live_counts(pipeline.layout, planned.dir, inputs, [], time.perf_counter() - 2, 0)
    summary = pipeline.success(planned)
    assert summary is not None
    assert counts.rows_done == counts.rows_total == 100
    assert counts.dropped == sum(summary["dropped"].values()) > 0
    assert counts.in_flight is None and counts.tokens is None
