"""How often the math checker credits honest reference solutions, and hedged answers.

For every GSM8K row (train, and test when given) and every competition-math row (a JSON
lines file with `solution` and `answer`, e.g. PRM800K's MATH-500 split
`prm800k/math_splits/test.jsonl` from openai/prm800k), the reference solution itself is
checked against its own final answer: the honest pass rate, which should stay ~100%, and
so are a few honest ways of stating the answer ("forms": `The answer is N.`, `\\boxed{N}`,
`#### N`, the same value twice, `..., which is the answer`; for competition math a boxed
answer and `$N$ is the answer`). Then attacks built from each row's answer N are checked
against the row's solution:

    or       "The answer is N or N+1."            (GSM8K)
    boxed-or "\\boxed{N \\text{ or } N+1}"        (GSM8K)
    range    "The answer is N to N+1."            (GSM8K)
    next     "The answer is N. Or maybe N+1."     (GSM8K: the hedge in the next sentence)
    twice    "The answer is N+1. ... The answer is N."  two final answers, the last right
    box-or   "$\\boxed{1/7919}$ or $\\boxed{N}$"    (competition math: N is any LaTeX answer)

Prints one line per (dataset, form): rows, credited, rate. Nothing is timed or asserted.

    .venv/bin/python bench/verifier_attacks.py
    .venv/bin/python bench/verifier_attacks.py --gsm8k-test test.jsonl --math math500.jsonl
    .venv/bin/python bench/verifier_attacks.py --limit 200 --show 5   # print misses

`../shared/datasets/gsm8k/train.jsonl` is read by default; the GSM8K test split
(`grade_school_math/data/test.jsonl` of openai/grade-school-math) and the MATH file are
read when given (or when found under ../shared/datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

from gristmill.verify.math import verify_math

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
WRONG = "\\frac{1}{7919}"  # a value no reference answer in these sets has
#: Honest ways to state a GSM8K answer N: each must be credited.
HONEST: tuple[Callable[[str], str], ...] = (
    lambda n: f"The answer is {n}.",
    lambda n: f"\\boxed{{{n}}}",
    lambda n: f"#### {n}",
    lambda n: f"The answer is {n}.\nSo {n} is the answer.",
    lambda n: f"One bag holds 3 + 4 = 7 apples, so the total is {n}, which is the answer.",
)


def read_jsonl(path: Path, limit: int | None) -> list[dict[str, str]]:
    """The first `limit` rows of a JSON lines file (all when None)."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def plus_one(final: str) -> str:
    """GSM8K's final answer plus one, written like the data (`1,000` -> `1001`)."""
    value = Fraction(final.replace(",", "")) + 1
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def rate(name: str, form: str, items: Sequence[tuple[str, str]], show: int) -> tuple[int, int]:
    """Check (response, reference) pairs; print the rate (and up to `show` misses)."""
    started = time.perf_counter()
    credited = 0
    misses: list[str] = []
    for response, reference in items:
        verdict = verify_math(response, reference)
        credited += verdict.correct
        if not verdict.correct and len(misses) < show:
            misses.append(f"    {verdict.reason} {verdict.extracted!r} <- {reference[-80:]!r}")
    n = len(items)
    share = credited / n if n else 0.0
    seconds = time.perf_counter() - started
    print(f"{name:12} {form:9} rows={n:5} credited={credited:5} rate={share:7.2%} ({seconds:.0f}s)")
    for line in misses:
        print(line)
    return n, credited


def gsm8k(name: str, path: Path, limit: int | None, show: int) -> None:
    """Honest and hedged checks on one GSM8K file."""
    rows = read_jsonl(path, limit)
    finals = [row["answer"].rsplit("####", 1)[1].strip() for row in rows]
    refs = [row["answer"] for row in rows]
    forms: dict[str, Callable[[str], str]] = {
        "or": lambda n: f"The answer is {n} or {plus_one(n)}.",
        "boxed-or": lambda n: f"\\boxed{{{n} \\text{{ or }} {plus_one(n)}}}",
        "range": lambda n: f"The answer is {n} to {plus_one(n)}.",
        "next": lambda n: f"The answer is {n}. Or maybe {plus_one(n)}.",
        "twice": lambda n: f"The answer is {plus_one(n)}.\nOn second thought, the answer is {n}.",
    }
    rate(name, "honest", list(zip(refs, finals, strict=True)), show)
    rate(
        name,
        "forms",
        [(f(n), ref) for n, ref in zip(finals, refs, strict=True) for f in HONEST],
        show,
    )
    for form, attack in forms.items():
        rate(name, form, [(attack(n), ref) for n, ref in zip(finals, refs, strict=True)], 0)


def competition_math(name: str, path: Path, limit: int | None, show: int) -> None:
    """Honest and two-box checks on one competition-math file."""
    rows = read_jsonl(path, limit)
    rate(name, "honest", [(row["solution"], row["answer"]) for row in rows], show)
    forms = [
        (f"The final answer is $\\boxed{{{row['answer']}}}$.", row["answer"]) for row in rows
    ] + [(f"So ${row['answer']}$ is the answer.", row["answer"]) for row in rows]
    rate(name, "forms", forms, show)
    attack = [
        (f"So it is $\\boxed{{{WRONG}}}$ or $\\boxed{{{row['answer']}}}$.", row["answer"])
        for row in rows
    ]
    rate(name, "box-or", attack, 0)


def main() -> None:
    """Parse the options and print one line per dataset and form."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k-train", type=Path, default=SHARED / "gsm8k" / "train.jsonl")
    parser.add_argument("--gsm8k-test", type=Path, default=SHARED / "gsm8k" / "test.jsonl")
    parser.add_argument("--math", type=Path, default=SHARED / "competition_math" / "test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="rows per file (default all)")
    parser.add_argument("--show", type=int, default=5, help="honest misses to print per file")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; gristmill.verify.math from {_module_file()}")
    for name, path, run in (
        ("gsm8k-train", args.gsm8k_train, gsm8k),
        ("gsm8k-test", args.gsm8k_test, gsm8k),
        ("math", args.math, competition_math),
    ):
        if path.is_file():
            run(name, path, args.limit, args.show)
        else:
            print(f"{name:12} skipped: {path} not found")


def _module_file() -> str:
    """Which checker is being measured (the path of `gristmill.verify.math`)."""
    import gristmill.verify.math as module

    return str(module.__file__)


if __name__ == "__main__":
    main()
