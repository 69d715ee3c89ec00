"""Fixtures of the filter tests: every committed data slice as a records frame."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from gristmill.records import make_record, records_frame

TESTS = Path(__file__).resolve().parents[1]

#: Committed slices and the fields that become the user and assistant turns.
SLICES = {
    "gsm8k_train_20_119": (
        TESTS / "filters" / "data" / "gsm8k_train_20_119.jsonl",
        "question",
        "answer",
    ),
    "gsm8k_train_20": (TESTS / "data" / "gsm8k_train_20.jsonl", "question", "answer"),
    "humaneval_10": (TESTS / "data" / "humaneval_10.jsonl", "prompt", "canonical_solution"),
    "alpaca_farm_eval_20": (TESTS / "data" / "alpaca_farm_eval_20.json", "instruction", "output"),
    "alpaca_farm_eval_gpt35_100": (
        TESTS / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl",
        "instruction",
        "output",
    ),
    "self_instruct_user_oriented_20x8": (
        TESTS / "selectors" / "data" / "self_instruct_user_oriented_20x8.jsonl",
        "instruction",
        "response",
    ),
}


def slice_records(path: Path, prompt: str, response: str) -> pl.DataFrame:
    """A committed JSON/JSONL slice as records (built here, not by the input reader)."""
    text = path.read_text(encoding="utf-8")
    rows = (
        json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
    )
    records = []
    for row in rows:
        messages = [
            {"role": "user", "content": row[prompt]},
            {"role": "assistant", "content": row[response]},
        ]
        records.append(make_record(messages, source=path.stem))
    return records_frame(records)


@pytest.fixture(scope="session")
def committed_slices() -> dict[str, pl.DataFrame]:
    """Every committed slice, by name."""
    return {name: slice_records(*spec) for name, spec in SLICES.items()}
