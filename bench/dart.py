"""DART benchmark on the built-in arithmetic problems with the bundled model; prints ratios.

1. Batched rounds vs a per-query loop: DART-Uniform with ONE generate call per round over
   every open problem, against the same loop run one problem at a time (same seeds, same
   targets and caps). Reports engine calls and wall time, and their ratios.
2. Vanilla rejection sampling vs DART-Uniform vs Prop2Diff at the same total number of
   samples B = N * k: vanilla gives every problem k samples; the DART strategies run until
   their targets or the shared budget B is spent. Reports per-level coverage, the hardest
   level's coverage and the share of kept rows that come from hard problems.

    python bench/dart.py                       # defaults: about 10 minutes on 2 CPU cores
    python bench/dart.py --per-level 4 --k 4   # quicker
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Outcome:
    """One run of the loop: its counters, kept rows per level and cost."""

    name: str
    calls: int
    seconds: float
    samples: int
    covered: dict[int, int]
    kept: dict[int, int]
    queries: dict[int, int]


class BudgetPolicy:
    """Wraps a policy so the whole run spends at most `budget` samples: each request takes
    what is left of it (queries asked in order, so the last round may be cut short)."""

    def __init__(self, inner: Any, budget: int) -> None:
        self.inner, self.left = inner, budget

    def wants(self, query_id: str, counter: Any, requests: int) -> int:
        give = min(self.inner.wants(query_id, counter, requests), self.left)
        self.left -= give
        return give

    def after(self, query_id: str, counter: Any, requests: int) -> None:
        self.inner.after(query_id, counter, requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-level", type=int, default=8, help="problems per level 1..5")
    parser.add_argument("--k", type=int, default=6, help="vanilla samples per problem")
    parser.add_argument(
        "--loop-problems", type=int, default=15, help="problems for part 1 (0 skips it)"
    )
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from gristmill.engines.base import EngineStats
    from gristmill.engines.factory import EngineSpec, get_engine
    from gristmill.pipelines.stage import MeteredEngine, StageContext
    from gristmill.synth.arith import ANSWER_INSTRUCTION, generate_problems
    from gristmill.synth.dart import DartConfig, DartPolicy
    from gristmill.synth.rejection import choose_correct
    from gristmill.synth.sampling import Query, SamplingSpec, run_rounds, samples_by_query
    from gristmill.verify import get_verifier

    start = time.perf_counter()
    engine = get_engine(EngineSpec())
    print(f"engine ready in {time.perf_counter() - start:.1f}s")
    lock = threading.Lock()
    verifier = get_verifier("math")
    spec = SamplingSpec(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens)
    ctx = StageContext(stage_name="bench", stage_index=0, seed=args.seed, run_dir=".")
    problems = generate_problems(5 * args.per_level, seed=args.seed)
    queries = [
        Query(
            id=f"p{i:03d}",
            prompt_text=engine.chat_prompt(
                [{"role": "user", "content": p.question + ANSWER_INSTRUCTION}]
            ),
            reference=p.answer,
        )
        for i, p in enumerate(problems)
    ]
    level = {q.id: p.level for q, p in zip(queries, problems, strict=True)}

    def run(name: str, subset: Sequence[Query], policy: Any) -> tuple[Outcome, Any]:
        stats = EngineStats()
        metered = MeteredEngine(engine, stats, lock)
        t0 = time.perf_counter()
        state = run_rounds(
            subset,
            policy,
            engine=metered,
            verifier=verifier,
            spec=spec,
            seed_for=lambda qid, r: ctx.derive_seed(qid, r),
        )
        seconds = time.perf_counter() - t0
        by_query = samples_by_query(state)
        covered: dict[int, int] = {}
        kept: dict[int, int] = {}
        count: dict[int, int] = {}
        for q in subset:
            c = state.counters[q.id]
            lv = level[q.id]
            count[lv] = count.get(lv, 0) + 1
            covered[lv] = covered.get(lv, 0) + (c.correct > 0)
            rows = choose_correct(by_query.get(q.id, []), c.target, "first", 0)
            kept[lv] = kept.get(lv, 0) + len(rows)
        samples = sum(c.trials for c in state.counters.values())
        return Outcome(name, state.calls, seconds, samples, covered, kept, count), state

    # ---- 1. batched rounds vs a per-query loop ---------------------------------------------
    uniform = DartConfig(strategy="uniform", k_u=2, samples_per_round=4, max_trials=12)
    subset = queries[: args.loop_problems]
    if not subset:
        part_two(args, queries, level, run)
        return
    batched, b_state = run("batched", subset, DartPolicy(uniform))
    loop_calls = 0
    loop_seconds = 0.0
    loop_correct = 0
    for q in subset:
        one, state = run("loop", [q], DartPolicy(uniform))
        loop_calls += one.calls
        loop_seconds += one.seconds
        loop_correct += state.counters[q.id].correct
    b_correct = sum(c.correct for c in b_state.counters.values())
    print(f"\n1. DART-Uniform (k_u=2, 4 per round, cap 12) on {len(subset)} problems")
    print(f"{'path':<10}{'calls':>7}{'seconds':>10}{'correct':>9}")
    print(f"{'batched':<10}{batched.calls:>7}{batched.seconds:>10.1f}{b_correct:>9}")
    print(f"{'per-query':<10}{loop_calls:>7}{loop_seconds:>10.1f}{loop_correct:>9}")
    print(f"calls ratio (per-query / batched): {loop_calls / batched.calls:.1f}x")
    print(f"wall ratio  (per-query / batched): {loop_seconds / batched.seconds:.1f}x")

    part_two(args, queries, level, run)


def part_two(
    args: argparse.Namespace, queries: Sequence[Any], level: dict[str, int], run: Any
) -> None:
    """Vanilla vs Uniform vs Prop2Diff at the same total number of samples."""
    from gristmill.synth.dart import DartConfig, DartPolicy
    from gristmill.synth.rejection import VanillaPolicy

    budget = args.k * len(queries)
    vanilla, _ = run("vanilla", queries, VanillaPolicy(args.k, 1, None))
    uni_cfg = DartConfig(strategy="uniform", k_u=3, samples_per_round=4, max_trials=4 * args.k)
    p2d_cfg = DartConfig(
        strategy="prop2diff",
        k_p=4,
        probe_samples=4,
        samples_per_round=4,
        max_trials=4 * args.k,
    )
    uni, _ = run("uniform", queries, BudgetPolicy(DartPolicy(uni_cfg), budget))
    p2d, _ = run("prop2diff", queries, BudgetPolicy(DartPolicy(p2d_cfg), budget))
    hardest = max(level.values())
    print(f"\n2. {len(queries)} problems, budget {budget} samples ({args.k} per problem)")
    header = f"{'method':<11}{'samples':>8}{'calls':>6}{'seconds':>9}{'rows':>6}"
    header += "".join(f"{'cov L' + str(lv):>8}" for lv in sorted(vanilla.queries))
    header += f"{'hard rows %':>12}"
    print(header)
    for o in (vanilla, uni, p2d):
        rows = sum(o.kept.values())
        hard = sum(v for lv, v in o.kept.items() if lv >= hardest - 1)
        line = f"{o.name:<11}{o.samples:>8}{o.calls:>6}{o.seconds:>9.1f}{rows:>6}"
        line += "".join(f"{o.covered[lv] / o.queries[lv]:>8.2f}" for lv in sorted(o.queries))
        line += f"{100 * hard / max(rows, 1):>12.1f}"
        print(line)
    v_cov = vanilla.covered[hardest] / vanilla.queries[hardest]
    for o in (uni, p2d):
        cov = o.covered[hardest] / o.queries[hardest]
        ratio = f"{cov / v_cov:.2f}x" if v_cov else ("inf" if cov else "n/a (both 0)")
        print(f"{o.name}: level-{hardest} coverage {cov:.2f} vs vanilla {v_cov:.2f} ({ratio})")


if __name__ == "__main__":
    main()
