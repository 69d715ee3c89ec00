"""Benchmark: reading Alpaca-style JSON lines into records, the per-row path against the
columnar one, on the same file in the same run.

  per-row    what `read_records` did before the columnar reader: json per line, then
             `make_record` per row (`reader.rowcheck`), extras typed by Arrow; still the
             path that builds a block the columnar reader turns down and names bad rows
  columnar   `read_records` now: msgspec per line, records a column at a time
  streamed   `iter_record_batches(rows=--part-rows)`, every batch consumed
  polars     `polars.read_ndjson` of the same file: parsing alone, no mapping or checks

and, on the records read, the ids alone: `record_ids` (polars writes the canonical JSON,
sha256 per row) against `record_id` called per row.

The input is `--rows` rows of `--source` (a JSON array or JSON lines of Alpaca rows,
instruction/input/output) repeated, each instruction suffixed with its row number so that
ids differ; mapping prompt/input/response. Timings are printed, never asserted.
Run: `.venv/bin/python bench/reader.py --help`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.reader import iter_record_batches, read_records
from gristmill.reader.blocks import exact_json_lines
from gristmill.reader.plan import make_plan
from gristmill.reader.rowcheck import core_by_row, extras_frame
from gristmill.records import record_id, record_ids

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "recipes" / "data" / "alpaca_farm_eval_gpt35_160.jsonl"
MAPPING = {"prompt": "instruction", "input": "input", "response": "output"}


def _source_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows: list[dict[str, Any]] = json.loads(text)
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_input(source: Path, rows: int, path: Path) -> Path:
    """`rows` rows of the source, repeated, each instruction suffixed with its row number."""
    base = _source_rows(source)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            row = dict(base[i % len(base)])
            row["instruction"] = f"{row['instruction']} #{i}"
            fh.write(json.dumps(row) + "\n")
    return path


def per_row(path: Path) -> pl.DataFrame:
    """The per-row reader, as `read_records` ran it before (one block, the whole file)."""
    block = exact_json_lines(path.read_bytes(), str(path), 1, 0)
    plan = make_plan(block, MAPPING, None, path.stem)
    core = core_by_row(block, plan)
    return pl.concat([core, extras_frame(block, plan.extras)], how="horizontal")


def columnar(path: Path) -> pl.DataFrame:
    return read_records(path, mapping=MAPPING)


def streamed(path: Path, part_rows: int) -> pl.DataFrame:
    """Every batch consumed; the last one is returned (memory holds a block, not the file)."""
    last = pl.DataFrame()
    for batch in iter_record_batches(path, rows=part_rows, mapping=MAPPING):
        last = batch
    return last


def polars_ndjson(path: Path) -> pl.DataFrame:
    return pl.read_ndjson(path)


def ids_per_row(frame: pl.DataFrame) -> pl.DataFrame:
    ids = [record_id(m, r) for m, r in zip(frame["messages"], frame["reference"], strict=True)]
    return pl.DataFrame({"id": ids})


def ids_columnar(frame: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame({"id": record_ids(frame["messages"], frame["reference"])})


def _rounds(runs: dict[str, Callable[[], pl.DataFrame]], rounds: int) -> dict[str, float]:
    """Best seconds of each path over `rounds` interleaved rounds (a busy machine slows
    them alike)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", "-n", type=int, default=100_000)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--part-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="best of R interleaved rounds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = write_input(args.source, args.rows, Path(tmp) / "alpaca.jsonl")
        size_mb = path.stat().st_size / 1e6
        print(f"input: {args.rows} rows, {size_mb:.1f} MB of JSON lines ({args.source.name})")
        runs: dict[str, Callable[[], pl.DataFrame]] = {
            "per-row": lambda: per_row(path),
            "columnar": lambda: columnar(path),
            "streamed": lambda: streamed(path, args.part_rows),
            "polars": lambda: polars_ndjson(path),
        }
        records = columnar(path)
        same = records.equals(per_row(path))
        runs["ids/row"] = lambda: ids_per_row(records)
        runs["ids/col"] = lambda: ids_columnar(records)
        seconds = _rounds(runs, args.rounds)
    print(f"{'path':<10} {'seconds':>8} {'rows/s':>10}")
    for name, took in seconds.items():
        print(f"{name:<10} {took:>8.3f} {args.rows / took:>10,.0f}")
    ratio = seconds["per-row"] / seconds["columnar"]
    print(f"columnar is {ratio:.1f}x the per-row path; same records and ids: {same}")


if __name__ == "__main__":
    main()
