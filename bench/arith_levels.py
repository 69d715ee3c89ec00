"""How often the bundled model solves each level of the built-in arith problems.

Generates N problems per level, asks the engine (greedy, one `generate` call) with
`ANSWER_INSTRUCTION` appended, and checks the answers with `verify_math`: strictly (only a
stated answer counts) and leniently (the last number counts too). Prints one row per level.

    .venv/bin/python bench/arith_levels.py              # 20 per level, 256 tokens
    .venv/bin/python bench/arith_levels.py -n 40 --seed 1 --dump /tmp/arith.jsonl

Measured once (-n 40, seed 0): level 1 50%, 2 22%, 3 8%, 4 2%, 5 0%.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from gristmill.engines.base import Sampling
from gristmill.engines.factory import EngineSpec, get_engine, shutdown_engines
from gristmill.synth.arith import ANSWER_INSTRUCTION, LEVELS, generate_problems
from gristmill.verify.math import verify_math


def main() -> None:
    """Run the measurement and print the per-level table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--per-level", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dump", help="write problems, responses and verdicts as JSON lines")
    args = parser.parse_args()

    problems = generate_problems(args.per_level * len(LEVELS), seed=args.seed)
    engine = get_engine(EngineSpec())
    prompts = [
        engine.chat_prompt([{"role": "user", "content": p.question + ANSWER_INSTRUCTION}])
        for p in problems
    ]
    started = time.perf_counter()
    outputs = engine.generate(prompts, Sampling(temperature=0.0, max_tokens=args.max_tokens))
    seconds = time.perf_counter() - started

    strict: dict[int, int] = defaultdict(int)
    lenient: dict[int, int] = defaultdict(int)
    stated: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    rows = []
    for problem, [completion] in zip(problems, outputs, strict=True):
        s = verify_math(completion.text, problem.answer)
        le = verify_math(completion.text, problem.answer, allow_last_number=True)
        total[problem.level] += 1
        strict[problem.level] += s.correct
        lenient[problem.level] += le.correct
        stated[problem.level] += s.reason != "no_answer"
        rows.append(
            {
                "level": problem.level,
                "question": problem.question,
                "answer": problem.answer,
                "response": completion.text,
                "strict": s.reason,
                "lenient": le.reason,
                "extracted": le.extracted,
            }
        )
    shutdown_engines()
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"{len(problems)} problems, generate took {seconds:.1f} s")
    print("level  n   stated  strict  lenient")
    for level in LEVELS:
        n = total[level]
        print(
            f"{level:>5}  {n:<3} {stated[level] / n:>6.0%}  {strict[level] / n:>6.0%}  "
            f"{lenient[level] / n:>7.0%}"
        )


if __name__ == "__main__":
    main()
