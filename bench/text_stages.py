"""Seconds per text stage (heuristics, exact_dedup, minhash_dedup, decontam) on N rows.

The input is GSM8K-like: each unique row is a GSM8K train problem with its numbers redrawn,
plus 10% exact copies (case and spacing changed), 10% near copies (one answer word changed)
and 1% rows that quote an evaluation problem (the eval set is 1,000 GSM8K problems kept out
of the templates). Stages are called directly, without a pipeline, so the figures are the
stages' own compute: map stages see parts of `--part-rows`, dedup stages the whole frame.
Each checkout runs in a process of its own (PYTHONPATH set to it), rounds alternating:

    .venv/bin/python bench/text_stages.py --checkouts /path/to/before . --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

import gristmill
from gristmill.filters.decontam import Decontam, DecontamConfig
from gristmill.filters.dedup import ExactDedup, MinHashDedup
from gristmill.filters.heuristics import Heuristics, HeuristicsConfig
from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import make_record, records_frame

GSM8K = Path("/work/shared/datasets/gsm8k/train.jsonl")
EVAL_ITEMS = 1000
NUMBER = re.compile(r"\d+")


def _redraw_numbers(text: str, rng: random.Random) -> str:
    return NUMBER.sub(lambda m: str(rng.randint(2, 10 ** len(m.group()) + 9)), text)


def _row(question: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return make_record(messages, source="gsm8k_like")


def build_input(
    rows: int, source: Path, seed: int = 0
) -> tuple[pl.DataFrame, list[dict[str, str]]]:
    """The benchmark frame and the eval items it leaks (see the module docstring)."""
    rng = random.Random(seed)
    problems = [json.loads(line) for line in source.read_text().splitlines()]
    evals, templates = problems[:EVAL_ITEMS], problems[EVAL_ITEMS:]
    out: list[dict[str, Any]] = []
    for k in range(rows):
        roll = rng.random()
        if out and roll < 0.10:  # exact copy after normalisation
            base = rng.choice(out)
            out.append(_row(str(base["prompt"]).upper(), "  " + str(base["response"])))
        elif out and roll < 0.20:  # near copy: one answer word changed
            base = rng.choice(out)
            words = str(base["response"]).split(" ")
            words[rng.randrange(len(words))] = "maybe"
            out.append(_row(str(base["prompt"]), " ".join(words)))
        elif roll < 0.21:  # a leaked eval problem
            item = rng.choice(evals)
            out.append(_row(item["question"], _redraw_numbers(item["answer"], rng)))
        else:
            t = templates[k % len(templates)]
            out.append(_row(_redraw_numbers(t["question"], rng), _redraw_numbers(t["answer"], rng)))
    return records_frame(out), evals


@dataclass(frozen=True)
class Timing:
    """One stage's wall and CPU seconds and the rows it dropped."""

    wall: float
    cpu: float
    dropped: int


def _timed(run: Callable[[], list[pl.DataFrame]]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    outs = run()
    dropped = sum(int(o.get_column("drop_reason").is_not_null().sum()) for o in outs)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, dropped)


def _parts(frame: pl.DataFrame, step: int) -> list[pl.DataFrame]:
    return [frame.slice(s, step) for s in range(0, frame.height, step)]


def ensure_input(work: Path, rows: int, source: Path) -> tuple[Path, Path]:
    """The benchmark input and eval set under `work` (written once per row count)."""
    work.mkdir(parents=True, exist_ok=True)
    data_path, eval_path = work / f"input-{rows}.parquet", work / "eval.jsonl"
    if not data_path.exists() or not eval_path.exists():
        frame, evals = build_input(rows, source)
        frame.write_parquet(data_path)
        eval_path.write_text("".join(json.dumps(e) + "\n" for e in evals))
    return data_path, eval_path


def measure(data_path: Path, eval_path: Path, part_rows: int) -> dict[str, Timing]:
    """Run the four stages once, in this process, on the same input."""
    frame = pl.read_parquet(data_path)
    ctx = StageContext(stage_name="bench", stage_index=0, seed=0, run_dir=data_path.parent)
    heur = Heuristics(HeuristicsConfig(min_prompt_words=3, max_response_chars=4000))
    sets = ({"path": str(eval_path), "fields": ["question"]},)
    decontam = Decontam(DecontamConfig(eval_sets=sets))  # type: ignore[arg-type]
    indexed = frame.with_row_index(ROW_COLUMN)
    parts = _parts(frame, part_rows)
    return {
        "heuristics": _timed(lambda: [heur.process(p, ctx) for p in parts]),
        "exact_dedup": _timed(lambda: [ExactDedup().select(indexed, ctx)]),
        "minhash_dedup": _timed(lambda: [MinHashDedup().select(indexed, ctx)]),
        "decontam": _timed(lambda: [decontam.process(p, ctx) for p in parts]),
    }


def _child(args: argparse.Namespace, data_path: Path, eval_path: Path) -> None:
    timings = measure(data_path, eval_path, args.part_rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    where = str(Path(gristmill.__file__).resolve().parents[1])
    print(
        json.dumps({"checkout": where, "peak_gb": peak, **{k: vars(v) for k, v in timings.items()}})
    )


def _run_checkout(checkout: Path, argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd="/")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--part-rows", type=int, default=10_000, help="rows per map-stage part")
    parser.add_argument("--source", type=Path, default=GSM8K)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gristmill-text-bench"))
    parser.add_argument(
        "--checkouts",
        type=Path,
        nargs="+",
        default=[Path(__file__).resolve().parents[1]],
        help="gristmill checkouts to time, each in its own process (e.g. before after)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the checkouts")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_path, eval_path = ensure_input(args.work, args.rows, args.source)
    if args.child:
        return _child(args, data_path, eval_path)
    argv = ["--rows", str(args.rows), "--part-rows", str(args.part_rows), "--work", str(args.work)]
    runs: dict[Path, list[dict[str, Any]]] = {c: [] for c in args.checkouts}
    for _ in range(args.repeats):  # rounds interleave the checkouts: load drifts hit both
        for checkout in args.checkouts:
            runs[checkout].append(_run_checkout(checkout, argv))
    print(f"{args.rows:,} rows, map stages in parts of {args.part_rows:,}; best of {args.repeats}")
    header = "".join(f"{c.name:>24}" for c in args.checkouts)
    print(f"{'stage':<15}{header}   (wall s / cpu s / dropped)")
    for stage in ("heuristics", "exact_dedup", "minhash_dedup", "decontam"):
        cells = []
        for checkout in args.checkouts:
            best = min(runs[checkout], key=lambda r: r[stage]["wall"])[stage]
            cells.append(f"{best['wall']:8.2f} /{best['cpu']:6.2f} /{best['dropped']:7d}")
        print(f"{stage:<15}" + "".join(f"{c:>24}" for c in cells))
    peaks = "".join(f"{max(r['peak_gb'] for r in runs[c]):>24.2f}" for c in args.checkouts)
    print(f"{'peak RSS GB':<15}{peaks}")


if __name__ == "__main__":
    main()
