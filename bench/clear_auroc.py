"""CLEAR confidence against correctness: GSM8K solutions vs the same with the final number changed.

For each of N GSM8K training questions, two responses: the reference solution (right) and
the same solution with its final number changed in the last step and after `####` (wrong,
and nearly identical in words; `--wrong swapped`: the next question's solution instead).
`--data arith`: level-1 problems of the built-in arithmetic generator, which the bundled
model solves about half the time greedy, answered "The answer is N." or "... N+1.".
The `clear` stage scores all 2N rows; AUROC is P(a right answer outscores a wrong one) for
C, O and S, per seed and agreement mode. The `embedding` mode is the old default, run on
the same samples for comparison.

    .venv/bin/python bench/clear_auroc.py                     # 30 questions, seeds 0 1 2
    .venv/bin/python bench/clear_auroc.py -n 10 --seeds 0 --modes contradiction

Figures measured on the bundled SmolLM2-135M are in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import numpy as np

from gristmill.embed import get_embedder
from gristmill.engines.factory import EngineSpec, get_engine, shutdown_engines
from gristmill.filters.clear import Clear, ClearConfig
from gristmill.pipelines.stage import StageContext
from gristmill.records import make_record, records_frame
from gristmill.synth.arith import ANSWER_INSTRUCTION, generate_problems

GSM8K = Path(__file__).resolve().parents[1] / "recipes" / "data" / "gsm8k_train_200.jsonl"


def solution_text(answer: str) -> str:
    """A GSM8K solution without its calculator annotations (`<<48/2=24>>`)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def changed_final_number(solution: str) -> str:
    """The solution with its final answer N replaced by N+1 (0 if N is not a number), both
    after `####` and where the last step states it."""
    body, _, final = solution.rpartition("####")
    value = final.strip().replace(",", "")
    new = str(int(float(value)) + 1) if value.lstrip("-").replace(".", "", 1).isdigit() else "0"
    head, sep, last = body.rstrip().rpartition("\n")
    last = re.sub(rf"(?<![\d.]){re.escape(final.strip())}(?![\d])", new, last)
    return f"{head}{sep}{last}\n#### {new}"


def gsm8k_pairs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(question, right solution, wrong solution) for the first GSM8K questions."""
    lines = GSM8K.read_text(encoding="utf-8").splitlines()[: args.questions]
    items = [json.loads(line) for line in lines]
    out = []
    for k, item in enumerate(items):
        right = solution_text(item["answer"])
        if args.wrong == "changed":
            wrong = changed_final_number(right)
        else:
            wrong = solution_text(items[(k + 1) % len(items)]["answer"])
        out.append((item["question"], right, wrong))
    return out


def arith_pairs(n: int) -> list[tuple[str, str, str]]:
    """(question, "The answer is N.", "The answer is N+1.") for level-1 arith problems."""
    return [
        (
            p.question + ANSWER_INSTRUCTION,
            f"The answer is {p.answer}.",
            f"The answer is {int(p.answer) + 1}.",
        )
        for p in generate_problems(n, seed=0, levels=(1,))
    ]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a right answer outscores a wrong one), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def main() -> None:
    """Score the pairs for every seed and mode; print AUROC of C, O and S."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--questions", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["contradiction", "embedding"])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--data", choices=["gsm8k", "arith"], default="gsm8k")
    parser.add_argument(
        "--wrong",
        choices=["changed", "swapped"],
        default="changed",
        help="wrong answers: the final number changed, or the next question's solution",
    )
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args()

    pairs = arith_pairs(args.questions) if args.data == "arith" else gsm8k_pairs(args)
    records = []
    for question, right, wrong in pairs:
        for answer, label in ((right, 1), (wrong, 0)):
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            records.append(make_record(messages, source=args.data, label=label))
    frame = records_frame(records)
    labels = np.array([r["label"] for r in records])
    engine = get_engine(EngineSpec())
    results: list[dict[str, Any]] = []
    try:
        for mode in args.modes:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    ctx = StageContext(
                        stage_name="clear",
                        stage_index=0,
                        seed=seed,
                        run_dir=Path(tmp),
                        engine_factory=lambda _name: engine,
                        embedder_factory=get_embedder,
                        show_progress=False,
                    )
                    cfg = ClearConfig(
                        samples=args.samples,
                        max_tokens=args.max_tokens,
                        answer_match="last_number",
                        agreement=mode,  # type: ignore[arg-type]
                    )
                    began = time.perf_counter()
                    out = Clear(cfg).process(frame, ctx)
                    seconds = time.perf_counter() - began
                row = {"mode": mode, "seed": seed, "seconds": round(seconds, 1)}
                for key, col in (("C", "score__clear"), ("O", "clear_observed"),
                                 ("S", "clear_reflection")):  # fmt: skip
                    row[key] = round(auroc(out[col].to_numpy(), labels), 3)
                stats = ctx.extra_stats
                row["by_checker"] = stats.get("agreement_by_checker", 0)
                row["by_engine"] = stats.get("agreement_by_engine", 0)
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutdown_engines()
    print(f"\n{len(pairs)} {args.data} questions × (right, wrong), k={args.samples}")
    print("mode           seed   AUROC C   AUROC O   AUROC S   checker/engine pairs   s")
    for r in results:
        print(
            f"{r['mode']:<14} {r['seed']:>4}   {r['C']:>7.3f}   {r['O']:>7.3f}   {r['S']:>7.3f}"
            f"   {r['by_checker']:>6}/{r['by_engine']:<6}          {r['seconds']:>6.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
