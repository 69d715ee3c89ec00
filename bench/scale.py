"""Million-row curation on one box: wall time, peak memory and per-stage rows/s of `gristmill run`.

Writes a synthetic input of N grade-school-math rows and runs, as `gristmill run` in a child
process, the engine-free recipe heuristics → exact_dedup → minhash_dedup → decontam → random
(issue 16's measurement), then the same for N/5, and prints wall time, peak RSS and each
stage's rows/s for both, and the memory ratio peak(N) / peak(N/5).

The input (seeded, so every run of the same N writes the same file):

- GSM8K train questions are split into a pool and a held-out eval file (`--eval-rows`, the
  last rows); decontam checks against the eval file.
- 79% of rows are unique problems: two pool problems asked together (question A, then B;
  answer A, then B), each ordered pair used once. Two such rows share at most one problem,
  so they are far apart for MinHash (estimated Jaccard about 1/3).
- 10% are exact copies of an earlier unique row, 10% near copies (one word of the question
  deleted, one filler word inserted), 1% planted test items (an eval problem asked with a
  pool problem).

GSM8K comes from `../shared/datasets/gsm8k/train.jsonl`; without it, the committed slice
`tests/filters/data/gsm8k_train_20_119.jsonl` (100 problems: a unique row then asks as many
problems at once as it takes to keep rows distinct, three or four), or `--gsm8k PATH`.

    .venv/bin/python bench/scale.py                       # 1,000,000 and 200,000 rows
    .venv/bin/python bench/scale.py --rows 200000         # 200,000 and 40,000 rows
    .venv/bin/python bench/scale.py --rows 200000 --no-small --keep /tmp/scale

Peak RSS is sampled (every `--poll-s`) over the child's whole process tree (the run, Prefect's
temporary server, the reaper's watcher); the largest single process's peak is its kernel
high-water mark (`VmHWM` in /proc, read at every poll, so no peak between polls is missed).
`getrusage` of the children is not used: Linux carries a process's peak RSS across exec, so
a child started by this script counts this script's own size (about 2.4 GB once it has
written a million rows), not the run's. Figures are in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import psutil

ROOT = Path(__file__).resolve().parents[1]
#: `../shared` beside the checkout (or beside the folder of a git worktree).
SHARED_GSM8K = [
    base / "shared" / "datasets" / "gsm8k" / "train.jsonl"
    for base in (ROOT.parent, ROOT.parents[1])
]
COMMITTED_GSM8K = ROOT / "tests" / "filters" / "data" / "gsm8k_train_20_119.jsonl"
FILLERS = ("so", "then", "now", "also", "please", "exactly")


@dataclass(frozen=True)
class Mix:
    """Row kinds of the synthetic input, as shares of N (the rest are unique problems)."""

    exact: float = 0.10
    near: float = 0.10
    planted: float = 0.01


@dataclass(frozen=True)
class Measured:
    """One `gristmill run`: its wall time, peak memory and per-stage stats."""

    rows: int
    wall_s: float
    peak_tree_bytes: int
    peak_process_bytes: int
    stages: list[dict[str, Any]]
    #: From the launch to the input split's end (Python and Prefect start, reading the input).
    input_s: float
    #: From the last stage's end to the run's exit (dataset, manifest, catalog query).
    finish_s: float
    dataset_rows: int
    #: Peak tree RSS while each phase ran: "input" (start, reading and splitting the input),
    #: each stage by name, "finish" (dataset and manifest).
    phase_peaks: dict[str, int]


def read_gsm8k(path: Path) -> list[dict[str, str]]:
    """GSM8K rows (question, answer)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        {"question": row["question"], "answer": row["answer"]}
        for row in (json.loads(line) for line in lines if line.strip())
    ]


def near_copy(question: str, rng: np.random.Generator) -> str:
    """The question with one word deleted and one filler word inserted elsewhere."""
    words = question.split()
    if len(words) > 3:
        del words[int(rng.integers(len(words)))]
    words.insert(int(rng.integers(len(words) + 1)), FILLERS[int(rng.integers(len(FILLERS)))])
    return " ".join(words)


def synthetic_rows(
    n: int, pool: Sequence[dict[str, str]], evals: Sequence[dict[str, str]], *, seed: int, mix: Mix
) -> tuple[list[str], list[str]]:
    """N (question, answer) rows of the mix; see the module docstring."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(
        4, size=n, p=[1 - mix.exact - mix.near - mix.planted, mix.exact, mix.near, mix.planted]
    )
    kinds[0] = 0  # a copy needs an earlier unique row
    unique = int((kinds == 0).sum())
    parts = 2
    while math.perm(len(pool), parts) < 4 * unique:
        parts += 1
    combos = _distinct_tuples(len(pool), parts, unique, rng)
    questions: list[str] = []
    answers: list[str] = []
    unique_at: list[int] = []
    u = 0
    for i, kind in enumerate(kinds.tolist()):
        if kind == 0:
            picked = [pool[j] for j in combos[u]]
            u += 1
            unique_at.append(i)
            questions.append(" ".join(p["question"] for p in picked))
            answers.append("\n".join(p["answer"] for p in picked))
            continue
        if kind == 3:
            item, other = evals[int(rng.integers(len(evals)))], pool[int(rng.integers(len(pool)))]
            questions.append(f"{item['question']} {other['question']}")
            answers.append(f"{item['answer']}\n{other['answer']}")
            continue
        source = unique_at[int(rng.integers(len(unique_at)))]
        q = questions[source]
        questions.append(q if kind == 1 else near_copy(q, rng))
        answers.append(answers[source])
    return questions, answers


def _distinct_tuples(size: int, parts: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct ordered tuples of `parts` distinct pool indices."""
    out = np.zeros((0, parts), dtype=np.int64)
    while len(out) < count:
        fresh = rng.integers(size, size=(2 * (count - len(out)) + 16, parts))
        fresh = fresh[np.all(np.diff(np.sort(fresh, axis=1), axis=1) > 0, axis=1)]
        out = np.unique(np.concatenate([out, fresh]), axis=0)
    return rng.permutation(out)[:count]


def write_inputs(
    folder: Path, n: int, *, gsm8k: Path | None, eval_rows: int, seed: int, mix: Mix
) -> tuple[Path, Path, str]:
    """The synthetic input and the eval file in `folder`; also says which GSM8K was used."""
    source = gsm8k or next((p for p in SHARED_GSM8K if p.exists()), COMMITTED_GSM8K)
    rows = read_gsm8k(source)
    held = max(1, min(eval_rows, len(rows) // 5))
    pool, evals = rows[:-held], rows[-held:]
    questions, answers = synthetic_rows(n, pool, evals, seed=seed, mix=mix)
    data = folder / f"input-{n}.jsonl"
    pl.DataFrame({"question": questions, "answer": answers}).write_ndjson(data)
    eval_path = folder / "eval.jsonl"
    pl.DataFrame(evals).write_ndjson(eval_path)
    return data, eval_path, f"{source} ({len(pool)} pool, {len(evals)} eval problems)"


def recipe_yaml(data: Path, eval_path: Path, *, part_rows: int, budget: float) -> str:
    """The measured recipe: heuristics → exact_dedup → minhash_dedup → decontam → random."""
    return "\n".join(
        [
            "name: scale",
            "seed: 0",
            f"part_rows: {part_rows}",
            "input:",
            f"  path: {json.dumps(str(data))}",
            "  mapping: {prompt: question, response: answer}",
            "  source: gsm8k-synthetic",
            "stages:",
            "  - heuristics",
            "  - exact_dedup",
            "  - minhash_dedup",
            "  - decontam:",
            "      eval_sets:",
            f"        - {{path: {json.dumps(str(eval_path))}, fields: [question],",
            "           name: gsm8k_eval}",
            f"  - random: {{budget: {budget}}}",
            "",
        ]
    )


@dataclass(frozen=True)
class Child:
    """A finished `gristmill run` child: when it started, how long it ran, its memory."""

    launched: datetime
    wall_s: float
    #: (when, RSS summed over its process tree), every poll.
    samples: list[tuple[datetime, int]]
    #: The kernel's peak RSS (VmHWM) of its largest process, as last read (0: unknown).
    largest_bytes: int


def run_measured(recipe: Path, out: Path, *, poll_s: float) -> Child:
    """Run `gristmill run` as a child process, sampling its tree's memory."""
    cmd = [sys.executable, "-m", "gristmill.cli", "run", str(recipe), "--out", str(out)]
    cmd.append("--no-progress")
    launched = datetime.now(UTC)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    samples: list[tuple[datetime, int]] = []
    peaks: dict[int, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=_sample_tree, args=(child.pid, poll_s, done, samples, peaks))
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode != 0:
        sys.stdout.write(output.decode(errors="replace"))
        raise SystemExit(f"gristmill run failed with exit code {child.returncode}")
    return Child(launched, wall, samples, max(peaks.values(), default=0))


def _high_water(pid: int) -> int:
    """A process's peak RSS so far (VmHWM), in bytes; 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sample_tree(
    pid: int,
    poll_s: float,
    done: threading.Event,
    samples: list[tuple[datetime, int]],
    peaks: dict[int, int],
) -> None:
    """Append (now, sum of RSS over `pid` and its descendants) every `poll_s` seconds, and
    keep each process's latest high-water mark in `peaks`."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.is_set():
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), _high_water(proc.pid))
        samples.append((datetime.now(UTC), total))
        done.wait(poll_s)


def stage_stats(run: Path) -> tuple[list[dict[str, Any]], datetime, int]:
    """Per stage (from the manifest): name, rows in and out, seconds, drops and when it
    finished (1 s resolution); when the input split finished; the dataset's rows."""
    manifest = json.loads((run / "manifest.json").read_text())
    keys = ("index", "stage", "rows_in", "rows_out", "seconds", "dropped")
    stages = [
        {**{k: s[k] for k in keys}, "end": datetime.fromisoformat(s["finished_at"])}
        for s in manifest["stages"]
    ]
    split = json.loads((run / manifest["input"]["dir"] / "_SUCCESS.json").read_text())
    return stages, datetime.fromisoformat(split["finished_at"]), int(manifest["dataset"]["rows"])


def phase_peaks(
    samples: list[tuple[datetime, int]], split_end: datetime, stages: list[dict[str, Any]]
) -> dict[str, int]:
    """Peak tree RSS per phase, phases cut at the finish times (rounded down to the second,
    so a phase also counts the second before it starts)."""
    bounds = [("input", split_end), *((s["stage"], s["end"]) for s in stages)]
    peaks: dict[str, int] = {}
    start = datetime.min.replace(tzinfo=UTC)
    for name, end in [*bounds, ("finish", datetime.max.replace(tzinfo=UTC) - timedelta(days=1))]:
        inside = [rss for when, rss in samples if start <= when < end + timedelta(seconds=1)]
        peaks[name] = max(inside, default=0)
        start = end
    return peaks


def measure(n: int, folder: Path, args: argparse.Namespace) -> Measured:
    """Write the input for N rows, run the recipe on it, read back the stats."""
    made = time.perf_counter()
    data, eval_path, source = write_inputs(
        folder, n, gsm8k=args.gsm8k, eval_rows=args.eval_rows, seed=args.seed, mix=Mix()
    )
    print(f"N={n:,}: input written in {time.perf_counter() - made:.1f}s from {source}", flush=True)
    recipe = folder / f"scale-{n}.yaml"
    recipe.write_text(
        recipe_yaml(data, eval_path, part_rows=args.part_rows, budget=args.budget),
        encoding="utf-8",
    )
    run = folder / f"run-{n}"
    child = run_measured(recipe, run, poll_s=args.poll_s)
    stages, split_end, rows = stage_stats(run)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
        data.unlink()
    return Measured(
        rows=n,
        wall_s=child.wall_s,
        peak_tree_bytes=max((rss for _, rss in child.samples), default=0),
        peak_process_bytes=child.largest_bytes,
        stages=stages,
        input_s=(split_end - child.launched).total_seconds(),
        finish_s=child.wall_s - (stages[-1]["end"] - child.launched).total_seconds(),
        dataset_rows=rows,
        phase_peaks=phase_peaks(child.samples, split_end, stages),
    )


def gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB" if value else "-"


def report(results: list[Measured]) -> None:
    """The per-run table and the ratios."""
    print()
    print(
        f"{'rows':>10} {'wall':>8} {'start+input':>11} {'stages':>8} {'finish':>7} "
        f"{'peak tree':>10} {'peak proc':>10}  dataset rows"
    )
    for m in results:
        staged = sum(s["seconds"] for s in m.stages)
        print(
            f"{m.rows:>10,} {m.wall_s:>7.1f}s {m.input_s:>10.0f}s {staged:>7.1f}s "
            f"{m.finish_s:>6.0f}s {gb(m.peak_tree_bytes):>10} {gb(m.peak_process_bytes):>10}"
            f"  {m.dataset_rows:,}"
        )
    for m in results:
        print(f"\nN={m.rows:,}: per stage")
        print(
            f"  {'stage':<16} {'rows in':>10} {'rows out':>10} {'seconds':>8} {'rows/s':>10}"
            f" {'peak tree':>10}  dropped"
        )
        print(
            f"  {'(input split)':<16} {'':>10} {m.rows:>10,} {m.input_s:>7.0f}s {'':>10}"
            f" {gb(m.phase_peaks['input']):>10}"
        )
        for s in m.stages:
            rate = s["rows_in"] / s["seconds"] if s["seconds"] else float("inf")
            drops = ", ".join(f"{k}={v:,}" for k, v in sorted(s["dropped"].items())) or "-"
            print(
                f"  {s['stage']:<16} {s['rows_in']:>10,} {s['rows_out']:>10,} "
                f"{s['seconds']:>7.1f}s {rate:>10,.0f} {gb(m.phase_peaks[s['stage']]):>10}"
                f"  {drops}"
            )
        print(
            f"  {'(dataset)':<16} {'':>10} {m.dataset_rows:>10,} {m.finish_s:>7.0f}s {'':>10}"
            f" {gb(m.phase_peaks['finish']):>10}"
        )
    if len(results) == 2:
        big, small = results
        print()
        for label, attr in (("tree", "peak_tree_bytes"), ("largest process", "peak_process_bytes")):
            a, b = getattr(big, attr), getattr(small, attr)
            if a and b:
                print(f"memory ratio ({label}) {big.rows:,}/{small.rows:,}: {a / b:.2f}")
        print(f"wall ratio {big.rows:,}/{small.rows:,}: {big.wall_s / small.wall_s:.2f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", "-n", type=int, default=1_000_000, help="N (default 1,000,000)")
    parser.add_argument("--no-small", action="store_true", help="skip the N/5 run")
    parser.add_argument("--part-rows", type=int, default=20_000, help="recipe part_rows")
    parser.add_argument("--budget", type=float, default=0.5, help="random's budget (share)")
    parser.add_argument(
        "--gsm8k", type=Path, help="GSM8K train.jsonl (default: ../shared, else the slice)"
    )
    parser.add_argument("--eval-rows", type=int, default=1000, help="held-out eval problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll-s", type=float, default=0.1, help="RSS sampling interval")
    parser.add_argument("--keep", metavar="DIR", help="keep inputs and run folders in DIR")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure N and N/5 (smaller first, so its run does not inherit a larger page cache)."""
    args = parse_args(argv)
    sizes = [args.rows] if args.no_small else [args.rows, max(1, args.rows // 5)]
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gm-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        results = {n: measure(n, folder, args) for n in sorted(sizes)}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(
        f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"{os.cpu_count()} CPUs; part_rows {args.part_rows:,}"
    )
    report([results[n] for n in sizes])


if __name__ == "__main__":
    main()
