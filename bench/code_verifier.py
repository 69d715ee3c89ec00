"""The code verifier on a public Python task set: honest pass rate, attacks, cost per check.

On HumanEval (164 problems; `../shared/datasets/humaneval/HumanEval.jsonl.gz` by default):

1. **honest**: every canonical solution, as the body that continues the prompt (checked
   against the prompt-aware reference, the way the stages build it) and as a complete
   program (prompt + body, against the tests alone). Both must pass: 164/164 each.
2. **attacks**: each wrong program of `tests/verify/code_attacks.py` (frame inspection, a
   gc-polling thread, trace hooks, patched and shadowed builtins, printed tokens, an early
   exit, an always-equal object, reading other processes' memory) against HumanEval/2;
   prints the verdict each gets. None may be "passed".
3. **cost**: `--items` (50) canonical solutions verified one at a time with `__call__`,
   after one untimed warm-up, the harnesses taking turns on each item; the median,
   quartiles and minimum milliseconds per check, and the median per-item difference from
   the first harness (`paired_diff_ms`), which load on the machine disturbs least.

Every available harness of `CodeVerifier` is measured (`harness` when the checkout has
that field, else the one it has). Prints numbers only; it never asserts.

    PYTHONPATH=$PWD .venv/bin/python bench/code_verifier.py
    PYTHONPATH=$PWD .venv/bin/python bench/code_verifier.py --items 20 --parts honest,cost
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from gristmill.verify.code import CodeVerifier, humaneval_reference

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "humaneval" / "HumanEval.jsonl.gz"


def load_problems(path: Path) -> list[dict[str, Any]]:
    """HumanEval rows from a JSON lines file, gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_attacks() -> dict[str, str]:
    """The attack corpus shared with the tests."""
    spec = importlib.util.spec_from_file_location(
        "code_attacks", ROOT / "tests" / "verify" / "code_attacks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    attacks: dict[str, str] = module.ATTACKS
    return attacks


def verifiers() -> dict[str, CodeVerifier]:
    """One verifier per harness this checkout's CodeVerifier offers."""
    fields = {f.name for f in dataclasses.fields(CodeVerifier)}
    if "harness" not in fields:
        return {"(only)": CodeVerifier(timeout_s=10)}
    harnesses = ("separate", "shared")
    return {h: CodeVerifier(timeout_s=10, harness=h) for h in harnesses}  # type: ignore[call-arg]


def honest(name: str, verifier: CodeVerifier, problems: list[dict[str, Any]], show: int) -> None:
    """Pass rate of the canonical solutions, as bodies and as complete programs."""
    bodies = [f"```python\n{p['canonical_solution']}```" for p in problems]
    aware = [humaneval_reference(p["test"], p["entry_point"], p["prompt"]) for p in problems]
    full = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems]
    plain = [humaneval_reference(p["test"], p["entry_point"]) for p in problems]
    for form, responses, references in (("body", bodies, aware), ("complete", full, plain)):
        start = time.perf_counter()
        verdicts = verifier.verify_many(responses, references)
        seconds = time.perf_counter() - start
        passed = sum(v.correct for v in verdicts)
        n = len(verdicts)
        print(f"honest  {name:9} {form:9} {passed}/{n} passed ({passed / n:.1%}, {seconds:.0f}s)")
        pairs = zip(problems, verdicts, strict=True)
        misses = [(p["task_id"], v.reason) for p, v in pairs if not v.correct]
        for task, reason in misses[:show]:
            print(f"    {task}: {reason}")


def attacks(name: str, verifier: CodeVerifier, problems: list[dict[str, Any]]) -> None:
    """The verdict of every attack against HumanEval/2."""
    problem = next(p for p in problems if p["task_id"] == "HumanEval/2")
    reference = humaneval_reference(problem["test"], problem["entry_point"], problem["prompt"])
    for attack, body in load_attacks().items():
        verdict = verifier(f"```python\n{body}```", reference)
        print(f"attack  {name:9} {attack:22} {verdict.reason}")


def cost(found: dict[str, CodeVerifier], problems: list[dict[str, Any]], items: int) -> None:
    """Milliseconds per check of `items` canonical solutions, one at a time; the harnesses
    take turns on each item (so load hits them alike)."""
    chosen = problems[:items]
    references = [humaneval_reference(p["test"], p["entry_point"], p["prompt"]) for p in chosen]
    for verifier in found.values():  # warm-up: isolation probes, layout, compiled harness
        verifier(chosen[0]["canonical_solution"], references[0])
    ms: dict[str, list[float]] = {name: [] for name in found}
    for p, reference in zip(chosen, references, strict=True):
        for name, verifier in found.items():
            start = time.perf_counter()
            verdict = verifier(p["canonical_solution"], reference)
            ms[name].append((time.perf_counter() - start) * 1000)
            if not verdict.correct:
                print(f"    {name} {p['task_id']}: {verdict.reason}")
    first = next(iter(ms.values()))
    for name, times in ms.items():
        q1, median, q3 = statistics.quantiles(times, n=4)
        paired = statistics.median(t - f for t, f in zip(times, first, strict=True))
        print(
            f"cost    {name:9} items={len(times)} median_ms={median:.1f} q1_ms={q1:.1f} "
            f"q3_ms={q3:.1f} min_ms={min(times):.1f} paired_diff_ms={paired:+.1f}"
        )


def main() -> None:
    """Parse the options and print the parts asked for, for every harness."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--humaneval", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--items", type=int, default=50, help="solutions timed one by one")
    parser.add_argument("--parts", default="honest,attacks,cost")
    parser.add_argument("--show", type=int, default=10, help="honest misses to print")
    args = parser.parse_args()
    problems = load_problems(args.humaneval)
    parts = set(args.parts.split(","))
    import gristmill.verify.code as module

    print(f"load average {os.getloadavg()[0]:.2f}; {len(problems)} problems; {module.__file__}")
    found = verifiers()
    for name, verifier in found.items():
        if "honest" in parts:
            honest(name, verifier, problems, args.show)
        if "attacks" in parts:
            attacks(name, verifier, problems)
    if "cost" in parts:
        cost(found, problems, args.items)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
