"""Does selected data train better than random at the same budget? (issue 13's benchmark)

One pool, GSM8K train problems with their worked solutions: the first `--pool` rows of
`../shared/datasets/gsm8k/train.jsonl` (or `--gsm8k PATH`). The last `--held-out` of them
are the eval set and are never selected: they are not in the selection input, and
`gm.evaluate` also drops any training row whose id or question is in the eval set.

Each method selects `--share` (10%) of the rest with a real `gristmill` pipeline run:

- `random`: a seeded uniform sample (the baseline);
- `kmeans`: kMQ, MiniLM embeddings of the questions, FAISS k-means, uniform per cluster;
- `s2l`: S2L, loss trajectories of a small proxy (the bundled model cut to `--s2l-layers`
  layers) over `--s2l-epochs`, clustered, sampled smallest cluster first;
- `clear`: CLEAR confidence (samples from the bundled model), the most confident rows;
- `grape` needs several candidate answers per question; this pool has one, so it is
  reported as not applicable rather than run on a made-up candidate set.

Then `gm.evaluate` fine-tunes the bundled SmolLM2-135M-Instruct on each selection once per
seed (`--seeds`) at the same loss-token budget (`--budget-tokens`) and measures held-out
per-token NLL of the reference solutions (and, with `--accuracy`, greedy accuracy checked
by the math verifier). It prints mean ± std over seeds per method, the difference from
random, and whether that difference exceeds the seed spread (|Δ| > std_method + std_random),
and the untrained base model's NLL on the same eval set, so the gap between methods can be
read against what the training budget moved at all.
Selection never sees the eval set; nothing here is tuned to it. Wall times are printed.

    .venv/bin/python bench/selection.py                               # all methods, 3 seeds
    .venv/bin/python bench/selection.py --methods random,kmeans --seeds 0,1 --pool 800
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

import gristmill as gm
from gristmill import stages

ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k" / "train.jsonl"
MAPPING = {"prompt": "question", "response": "answer"}
METHODS = ("random", "kmeans", "s2l", "clear", "grape")


@dataclass(frozen=True)
class Selected:
    """One method's selection: its run folder (None: not applicable) and how long it took."""

    method: str
    run: Path | None
    seconds: float
    note: str = ""


def write_pool(source: Path, pool: int, held_out: int, folder: Path) -> tuple[Path, Path]:
    """The selection input (the first pool - held_out rows) and the eval set (the rest)."""
    lines = source.read_text(encoding="utf-8").splitlines()[:pool]
    if len(lines) < pool or held_out >= pool:
        raise SystemExit(f"{source}: need {pool} rows with {held_out} held out, has {len(lines)}")
    rows = [json.loads(line) for line in lines]
    train, evals = folder / "pool.jsonl", folder / "eval.jsonl"
    for path, part in ((train, rows[: pool - held_out]), (evals, rows[pool - held_out :])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return train, evals


def method_stages(method: str, share: float, args: argparse.Namespace) -> list[Any]:
    """The stages that select `share` of the pool with `method` (seeded, fixed settings)."""
    if method == "random":
        return [stages.RandomSelect(budget=share, seed=0)]
    if method == "kmeans":
        return [
            stages.Embed(field="prompt"),
            stages.KMeansSelect(budget=share, k=args.k, seed=0),
        ]
    if method == "s2l":
        return [
            stages.S2LSelect(
                budget=share,
                layers=args.s2l_layers,
                epochs=args.s2l_epochs,
                checkpoints=args.s2l_checkpoints,
                k=args.k,
                max_length=args.max_length,
                seed=0,
            )
        ]
    if method == "clear":
        return [
            stages.Clear(samples=args.clear_samples, max_tokens=args.clear_max_tokens),
            stages.TopKSelect(budget=share, score_column="score__clear"),
        ]
    raise ValueError(f"no stages for method {method!r}")


def select(method: str, pool: Path, folder: Path, args: argparse.Namespace) -> Selected:
    """Run `method`'s selection over the pool as a gristmill recipe; time it."""
    if method == "grape":
        return Selected(method, None, 0.0, "n/a: one answer per question, GRAPE needs candidates")
    uses_engine = method == "clear"
    recipe = gm.Recipe(
        name=f"select-{method}",
        seed=0,
        part_rows=args.part_rows,
        input=gm.Input(path=str(pool), mapping=MAPPING, source="gsm8k"),
        engines={"default": gm.Engine()} if uses_engine else {},
        stages=method_stages(method, args.share, args),
    )
    start = time.perf_counter()
    recipe.run(folder / method, workers=1)
    return Selected(method, folder / method, time.perf_counter() - start)


def verdicts(summary: pl.DataFrame) -> list[str]:
    """One line per method and metric: mean ± std, Δ from random, beyond the seed spread."""
    lines = []
    for metric in summary["metric"].unique(maintain_order=True).to_list():
        rows = summary.filter(pl.col("metric") == metric)
        base = rows.filter(pl.col("dataset") == "random")
        base_mean = float(base["mean"][0]) if base.height else None
        base_std = float(base["std"][0]) if base.height else 0.0
        for r in rows.iter_rows(named=True):
            line = f"{metric:<10} {r['dataset']:<8} {r['mean']:.4f} ± {r['std']:.4f}"
            line += f" (n={r['seeds']})"
            if base_mean is not None and r["dataset"] != "random":
                delta = r["mean"] - base_mean
                beyond = abs(delta) > r["std"] + base_std
                spread = "beyond" if beyond else "within"
                line += f"  Δ vs random {delta:+.4f}: {spread} seed spread"
            lines.append(line)
    return lines


def base_nll(evals: Path, max_length: int) -> float:
    """Held-out NLL of the untrained base model: the reference line for the table."""
    from gristmill.engines.models import resolve_model
    from gristmill.evaluation.data import load_eval_set
    from gristmill.evaluation.metrics import answer_nll

    eval_set = load_eval_set(evals, mapping=MAPPING, verifier="math")
    return answer_nll(resolve_model("smollm2-135m-instruct"), eval_set, max_length=max_length).value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=Path, default=None, help="GSM8K train JSONL")
    parser.add_argument("--pool", type=int, default=2000, help="rows taken from GSM8K")
    parser.add_argument("--held-out", type=int, default=300, help="last rows held out for eval")
    parser.add_argument("--share", type=float, default=0.1, help="share each method selects")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--budget-tokens", type=int, default=12000, help="loss tokens per run")
    parser.add_argument("--accuracy", action="store_true", help="also greedy accuracy (vLLM)")
    parser.add_argument("--k", type=int, default=17, help="clusters for kMQ and S2L")
    parser.add_argument("--s2l-layers", type=int, default=6, help="proxy model layers")
    parser.add_argument("--s2l-epochs", type=int, default=1)
    parser.add_argument("--s2l-checkpoints", type=int, default=4)
    parser.add_argument("--clear-samples", type=int, default=2)
    parser.add_argument("--clear-max-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=384, help="training max_length")
    parser.add_argument("--part-rows", type=int, default=500)
    parser.add_argument("--keep", type=Path, default=None, help="keep runs and evals here")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "random" not in methods:
        raise SystemExit(f"methods must include random and be among {METHODS}; got {methods}")
    seeds = [int(s) for s in args.seeds.split(",")]
    source = args.gsm8k or SHARED_GSM8K
    if not source.exists():
        raise SystemExit(f"{source} not found: pass --gsm8k PATH (GSM8K train JSONL)")
    from gristmill.evaluation.budget import Budget
    from gristmill.evaluation.results import read_evals, summary
    from gristmill.evaluation.train import TrainConfig

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gm-selection-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        pool, evals = write_pool(source, args.pool, args.held_out, folder)
        picked = [select(m, pool, folder / "runs", args) for m in methods]
        for s in picked:
            print(f"select {s.method:<8} {s.seconds:7.1f}s {s.note}", flush=True)
        runs = [s for s in picked if s.run is not None]
        start = time.perf_counter()
        gm.evaluate(
            [s.run for s in runs if s.run is not None],
            names=[s.method for s in runs],
            eval_set=evals,
            eval_mapping=MAPPING,
            verifier="math",
            accuracy=args.accuracy,
            budget=Budget(tokens=args.budget_tokens),
            seeds=seeds,
            config=TrainConfig(max_length=args.max_length),
            out=folder / "evals",
            progress=lambda line: print(line, flush=True),
        )
        trained = time.perf_counter() - start
        results = read_evals(folder / "evals")
        walls = results.group_by("dataset", "seed").agg(pl.col("wall_seconds").first())
        print(
            f"\nselection bench: pool {args.pool - args.held_out} rows, {args.held_out} held "
            f"out, share {args.share}, budget {args.budget_tokens} loss tokens, seeds {seeds}, "
            f"load {load:.2f} -> {os.getloadavg()[0]:.2f}"
        )
        print(
            f"training + eval: {trained:.0f}s for {walls.height} runs "
            f"({walls['wall_seconds'].mean():.0f}s each on average)"
        )
        for line in verdicts(summary(results)):
            print(line)
        print(f"nll        base (untrained) {base_nll(evals, args.max_length):.4f}")
        for s in picked:
            if s.run is None:
                print(f"{s.method}: {s.note}")


if __name__ == "__main__":
    main()
