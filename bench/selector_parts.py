"""Benchmark: the selectors' heavy parts, each against a reference doing the same work.

  kmeans  kMQ selection (cluster, split the budget, draw) on N×D synthetic float32
          embeddings (a mixture of Gaussians): faiss k-means, as the `kmeans` stage runs it
          (every point, `niter` Lloyd iterations), against scikit-learn's KMeans with the
          same work (lloyd, random init, one run, `niter` iterations, tol 0); plus faiss with
          its own default training subsample (256 points per centroid) for reference.
  grape   GRAPE scoring (`grape_scores`: chat rendering, token counting, slicing) against
          the engine's bare `prompt_logprobs` on the very texts GRAPE builds, same batches.
  s2l     S2L proxy training throughput (tokens/s) of the bundled SmolLM2 cut to `--layers`
          layers against the full model, on real AlpacaFarm rows.

Timings are printed, never asserted. Run: `.venv/bin/python bench/selector_parts.py --help`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gristmill.records import read_records
from gristmill.selectors.kmeans import cluster_quotas, gumbel_top_k, train_kmeans

ALPACA = (
    Path(__file__).resolve().parents[1]
    / "tests"
    / "selectors"
    / "data"
    / "alpaca_farm_eval_gpt35_100.jsonl"
)
ALPACA_MAPPING = {"prompt": "instruction", "input": "input", "response": "output"}


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    part: str
    path: str
    seconds: float
    work: str
    rate: float | None = None
    note: str = ""


# ---- kmeans -------------------------------------------------------------------------------


def synthetic_embeddings(n: int, dim: int, *, centers: int, seed: int) -> np.ndarray:
    """`n` float32 points around `centers` random Gaussian centres (unit noise, spread 4)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim), dtype=np.float32) * 4.0
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x += means[rng.integers(0, centers, size=n)]
    return x


def select_from_labels(labels: np.ndarray, k: int, budget: int, seed: int) -> np.ndarray:
    """kMQ's draw: an even budget per cluster, uniform without replacement inside each."""
    members = [np.flatnonzero(labels == c) for c in range(k)]
    quotas = cluster_quotas([len(m) for m in members], budget)
    rng = np.random.default_rng(seed)
    picks = [
        m[gumbel_top_k(np.zeros(len(m)), q, rng)] for m, q in zip(members, quotas, strict=True)
    ]
    return np.sort(np.concatenate(picks))


def time_faiss(x: np.ndarray, k: int, niter: int, budget: int, cap: int | None) -> float:
    """Seconds for faiss k-means (all points, or `cap` per centroid) plus the draw."""
    start = time.perf_counter()
    fit = train_kmeans(x, k, niter=niter, nredo=1, seed=0, max_points_per_centroid=cap)
    chosen = select_from_labels(fit.labels, k, budget, 0)
    seconds = time.perf_counter() - start
    assert len(chosen) == budget
    return seconds


def time_sklearn(x: np.ndarray, k: int, niter: int, budget: int) -> tuple[float, int]:
    """Seconds for scikit-learn's Lloyd k-means with faiss's settings plus the same draw."""
    from sklearn.cluster import KMeans

    start = time.perf_counter()
    km = KMeans(
        n_clusters=k,
        init="random",
        n_init=1,
        max_iter=niter,
        tol=0.0,
        algorithm="lloyd",
        random_state=0,
    ).fit(x)
    chosen = select_from_labels(km.labels_.astype(np.int64), k, budget, 0)
    seconds = time.perf_counter() - start
    assert len(chosen) == budget
    return seconds, int(km.n_iter_)


def bench_kmeans(args: argparse.Namespace) -> list[Row]:
    """faiss vs scikit-learn k-means selection on synthetic embeddings."""
    import sklearn

    x = synthetic_embeddings(args.n, args.dim, centers=args.centers, seed=args.seed)
    budget = max(1, args.n // 10)
    work = f"{args.n:,}x{args.dim}, K={args.k}, {args.niter} it"
    rows = [
        Row("kmeans", "faiss (all points)", time_faiss(x, args.k, args.niter, budget, None), work),
        Row(
            "kmeans",
            "faiss (256/centroid)",
            time_faiss(x, args.k, args.niter, budget, 256),
            f"trains on {min(args.n, 256 * args.k):,} points",
        ),
    ]
    sk_n = min(args.sklearn_n or args.n, args.n)
    seconds, iters = time_sklearn(x[:sk_n], args.k, args.niter, max(1, sk_n // 10))
    note = f"scikit-learn {sklearn.__version__}, {iters} it"
    if sk_n < args.n:
        note += f"; ran on {sk_n:,} rows, seconds scaled ×{args.n / sk_n:.1f} (linear in N)"
        seconds *= args.n / sk_n
    rows.append(Row("kmeans", "sklearn KMeans (lloyd)", seconds, work, note=note))
    del x
    gc.collect()
    return rows


# ---- grape --------------------------------------------------------------------------------


def alpaca_pairs(n: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    """`n` (prompt turns, response) pairs from the AlpacaFarm slice; repeats are made distinct."""
    frame = read_records(ALPACA, mapping=ALPACA_MAPPING)
    prompts, responses = [], []
    for i in range(n):
        row = frame.row(i % frame.height, named=True)
        suffix = f" (variant {i // frame.height})" if i >= frame.height else ""
        prompts.append([{"role": "user", "content": row["prompt"] + suffix}])
        responses.append(row["response"])
    return prompts, responses


def bench_grape(args: argparse.Namespace) -> list[Row]:
    """grape_scores vs the engine's prompt_logprobs on the same texts and batches."""
    from gristmill.engines.factory import EngineSpec, get_engine, shutdown_engines
    from gristmill.selectors.grape import grape_scores

    engine = get_engine(EngineSpec())
    prompts, responses = alpaca_pairs(args.grape_n)
    texts = [
        engine.chat_prompt(p, add_generation_prompt=True) + r
        for p, r in zip(prompts, responses, strict=True)
    ]
    batch = args.grape_batch

    def raw() -> int:
        out: list[list[float | None]] = []
        for start in range(0, len(texts), batch):
            out.extend(engine.prompt_logprobs(texts[start : start + batch]))
        return sum(len(row) for row in out)

    def grape() -> int:
        scores = grape_scores(engine, prompts, responses, batch_size=batch)
        assert len(scores) == len(texts) and all(np.isfinite(scores))
        return 0

    tokens = raw()  # warm-up (untimed); also the token count of both paths
    grape()
    best = {"raw": float("inf"), "grape": float("inf")}
    for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
        for name, fn in (("raw", raw), ("grape", grape)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    shutdown_engines()
    work = f"{len(texts)} texts, {tokens:,} tokens, batch {batch}"
    return [
        Row("grape", "engine.prompt_logprobs", best["raw"], work, tokens / best["raw"]),
        Row("grape", "grape_scores", best["grape"], work, tokens / best["grape"]),
    ]


# ---- s2l ----------------------------------------------------------------------------------


def bench_s2l(args: argparse.Namespace) -> list[Row]:
    """Proxy training tokens/s: the model cut to `--layers` layers vs all of its layers."""
    import torch

    from gristmill.selectors.s2l import (
        TrainSettings,
        conversation_parts,
        load_proxy,
        tokenize_examples,
        train_trajectories,
    )

    frame = read_records(ALPACA, mapping=ALPACA_MAPPING).head(args.s2l_rows)
    ids = frame.get_column("id").to_list()
    pairs = [conversation_parts(m, where=i) for m, i in zip(frame["messages"], ids, strict=True)]
    settings = TrainSettings(
        epochs=1, lr=1e-4, batch_size=args.s2l_batch, checkpoints=1, seed=args.seed
    )
    rows = []
    for layers in (args.layers, None):
        proxy = load_proxy("smollm2-135m-instruct", layers=layers, device="cpu", dtype="float32")
        examples, _ = tokenize_examples(proxy.tokenizer, pairs, ids, max_length=args.max_length)
        result = train_trajectories(proxy, examples, settings, progress=False)
        rows.append(
            Row(
                "s2l",
                f"train {proxy.layers}/{proxy.total_layers} layers",
                result.train_seconds,
                f"{len(examples)} rows, {result.train_tokens:,} tokens, {result.total_steps} steps",
                result.train_tokens / result.train_seconds,
                f"+ {result.eval_seconds:.1f}s to score all rows once; "
                f"{torch.get_num_threads()} threads",
            )
        )
        del proxy
        gc.collect()
    return rows


# ---- output -------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table."""
    lines = [f"{'part':<7}{'path':<26}{'seconds':>9}{'tok/s':>10}  work / note"]
    for r in rows:
        rate = f"{r.rate:,.0f}" if r.rate is not None else "-"
        note = f"{r.work}" + (f"; {r.note}" if r.note else "")
        lines.append(f"{r.part:<7}{r.path:<26}{r.seconds:>9.2f}{rate:>10}  {note}")
    return "\n".join(lines)


def ratios(rows: Sequence[Row]) -> list[str]:
    """The headline ratios, for whichever parts ran."""
    by = {r.path: r for r in rows}
    out = []
    if "sklearn KMeans (lloyd)" in by:
        sk, fa = by["sklearn KMeans (lloyd)"], by["faiss (all points)"]
        out.append(f"kmeans: sklearn / faiss seconds = {sk.seconds / fa.seconds:.1f}x (same work)")
        sub = by["faiss (256/centroid)"]
        out.append(f"kmeans: sklearn / faiss-256 seconds = {sk.seconds / sub.seconds:.1f}x")
    if "grape_scores" in by:
        g, raw = by["grape_scores"], by["engine.prompt_logprobs"]
        out.append(
            f"grape: grape_scores / prompt_logprobs throughput = {raw.seconds / g.seconds:.2f}"
        )
    s2l = [r for r in rows if r.part == "s2l"]
    if len(s2l) == 2 and s2l[0].rate and s2l[1].rate:
        out.append(
            f"s2l: {s2l[0].path} / {s2l[1].path} tokens/s = {s2l[0].rate / s2l[1].rate:.1f}x"
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (sizes, so the bench can run smaller)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="kmeans,s2l,grape", help="comma list (default: all)")
    p.add_argument("--n", type=int, default=1_000_000, help="kmeans: embeddings (1,000,000)")
    p.add_argument("--dim", type=int, default=384, help="kmeans: dimensions (384)")
    p.add_argument("--k", type=int, default=100, help="kmeans: clusters (100)")
    p.add_argument("--niter", type=int, default=20, help="kmeans: Lloyd iterations (20)")
    p.add_argument("--centers", type=int, default=200, help="kmeans: mixture components (200)")
    p.add_argument(
        "--sklearn-n",
        type=int,
        default=None,
        help="kmeans: run scikit-learn on the first N rows only and scale its time (default: all)",
    )
    p.add_argument("--grape-n", type=int, default=256, help="grape: texts (256)")
    p.add_argument("--grape-batch", type=int, default=64, help="grape: texts per call (64)")
    p.add_argument("--repeats", type=int, default=3, help="grape: interleaved rounds, best kept")
    p.add_argument("--s2l-rows", type=int, default=64, help="s2l: AlpacaFarm rows (64)")
    p.add_argument("--s2l-batch", type=int, default=8, help="s2l: batch size (8)")
    p.add_argument("--layers", type=int, default=2, help="s2l: layers of the cut proxy (2)")
    p.add_argument("--max-length", type=int, default=256, help="s2l: tokens per example (256)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen parts and print the table and ratios."""
    args = parse_args(argv)
    parts: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
        "kmeans": bench_kmeans,
        "s2l": bench_s2l,
        "grape": bench_grape,
    }
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in parts]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {list(parts)}")
    load_before = os.getloadavg()
    rows: list[Row] = []
    for name in chosen:
        start = time.perf_counter()
        rows.extend(parts[name](args))
        print(f"[{name}] done in {time.perf_counter() - start:.0f}s", flush=True)
    load: Any = os.getloadavg()
    print(f"\nload average before {load_before[0]:.2f}, after {load[0]:.2f}; cpus {os.cpu_count()}")
    print(format_table(rows))
    for line in ratios(rows):
        print(line)


if __name__ == "__main__":
    main()
