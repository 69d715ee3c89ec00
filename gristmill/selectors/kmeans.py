"""The `kmeans` stage: kMQ, k-means diversity selection with optional quality weighting.

From "Diversify and Conquer: Diversity-Centric Data Selection with Iterative Refinement"
(Yu et al. 2024; reference code for-ai/iterative-data-selection,
`selection/methods/deita/kmeansrandom.py`): cluster the embeddings with k-means, then draw
`budget / K` rows from every cluster without replacement, uniformly or with
`p ∝ exp(score / τ)` inside the cluster (the reference uses τ = 1).

Where we differ from the reference, on purpose:

- Budget: the reference takes `int(B / K)` per cluster and silently loses both the
  remainder and the shortfall of clusters smaller than `B / K`, so it returns fewer rows
  than asked. We give each cluster `floor(B / K)`, hand the remainder out one row at a
  time (largest clusters first, ties to the lower cluster id), then repeatedly spread
  whatever small clusters could not use over the clusters that still have rows, so the
  output has exactly `min(B, n)` rows.
- Training data: `faiss.Kmeans` trains on at most `max_points_per_centroid` (default 256)
  points per centroid and silently subsamples the rest. We train on every point unless
  `max_points_per_centroid` is set. Its warning about fewer than 39 points per centroid
  (which changes nothing in training) is switched off: small selections are normal here.
- Sampling without replacement uses the Gumbel-top-k trick (keys `score/τ + Gumbel`),
  which draws exactly the successive-softmax distribution of `numpy.random.choice(p=...)`
  but never fails when some probabilities underflow to zero.
- Defaults: `niter=100, nredo=1` (the reference: 300 and 5) and `K ≈ sqrt(n)` capped by
  the budget and by n (the reference: K = 1024).

Iterative rounds (`rounds: R`, the paper's iterative refinement; reference
`selection/methods/kmeansiter.py` and `select_new_iter` in `selection/iter.py`): round 1
draws its share of the budget as above; after every round a `scorer` stage scores the
rows just drawn, each cluster's mean score over the rows selected so far gives it the
weight `softmax(mean / share_temperature)` (the reference: `exp(mean) / sum`), and the
next round's share of the budget is split over the clusters by those weights, drawn from
rows not yet selected. Selected rows stay. Where we differ:

- Every round gets an equal share of the budget (remainder to the first rounds) and
  takes it exactly. The reference's round 1 takes `int(B / R / K)` per cluster, and its
  later rounds draw `int(B / K / R)` cluster labels in all (K times fewer than round 1)
  with `np.random.choice(K, p=weights)`; we give each cluster its expected count instead
  (largest remainder), capped by its unselected rows, the rest spread by weight.
- The reference scores the pool with a model trained on it (a reward model's score of the
  gold answer minus that of the model's own answer, or perplexity), so old rows are
  re-scored each round. A pipeline stage trains nothing, so a row's score cannot change
  between rounds: we score each row once, when it is drawn, which gives the same cluster
  means. The last round is scored too, so the output carries the scorer's columns on
  every row.
- A cluster with no scored row yet gets the mean over all scored rows (the reference
  assumes every cluster has some).
- Later rounds draw inside a cluster as round 1 does (`weighting`); the reference draws
  them uniformly, which is our default.

GPU: `device: "gpu"` passes `gpu=True` to `faiss.Kmeans`, which needs a faiss build with
GPU support (the `gpu` extra, faiss-gpu-cu12); the CPU build is the default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl

from gristmill.filters.embed import (
    EMBEDDING_COLUMN,
    TextField,
    check_text_field,
    field_source_column,
    frame_embeddings,
)
from gristmill.pipelines.stage import ROW_COLUMN, Map, Select, Stage, StageConfig, StageContext
from gristmill.records import SCORE_PREFIX
from gristmill.selectors import check_budget, resolve_budget
from gristmill.selectors.baselines import score_values


def default_k(n: int, budget: int) -> int:
    """Clusters when the config names none: round(sqrt(n)), at most `budget` and `n`."""
    return max(1, min(round(math.sqrt(n)), budget, n))


def cluster_quotas(sizes: list[int], budget: int) -> list[int]:
    """Rows to draw from each cluster: `budget` split evenly, never more than a cluster has.

    Exactly `min(budget, sum(sizes))` rows in all. Each round splits what is left evenly
    over clusters that still have spare rows; the indivisible remainder goes one row at a
    time to the clusters with the most spare rows (ties: lower cluster id).
    """
    quotas = [0] * len(sizes)
    left = min(budget, sum(sizes))
    while left > 0:
        open_ = [c for c, size in enumerate(sizes) if size > quotas[c]]
        share = left // len(open_)
        for c in open_:
            take = min(share, sizes[c] - quotas[c])
            quotas[c] += take
            left -= take
        if share == 0 or left < len(open_):
            by_spare = sorted(
                (c for c in open_ if sizes[c] > quotas[c]),
                key=lambda c: (-(sizes[c] - quotas[c]), c),
            )
            for c in by_spare[:left]:
                quotas[c] += 1
                left -= 1
    return quotas


def gumbel_top_k(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a size-k sample without replacement with p ∝ exp(logits), in draw order."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    keys = logits + rng.gumbel(size=len(logits))
    return np.argsort(-keys, kind="stable")[:k]


def round_budgets(budget: int, rounds: int) -> list[int]:
    """`budget` split evenly over `rounds`, the remainder one row each to the first rounds."""
    share, extra = divmod(budget, rounds)
    return [share + (1 if r < extra else 0) for r in range(rounds)]


def cluster_means(
    scores: np.ndarray, labels: np.ndarray, selected: np.ndarray, k: int
) -> np.ndarray:
    """Each cluster's mean score over its selected rows; a cluster with none gets the mean
    over every selected row (no evidence either way)."""
    pooled = scores[selected]
    neutral = float(pooled.mean()) if len(pooled) else 0.0
    means = np.full(k, neutral)
    for c in range(k):
        mine = scores[selected & (labels == c)]
        if len(mine):
            means[c] = float(mine.mean())
    return means


def share_weights(means: np.ndarray, temperature: float) -> np.ndarray:
    """The next round's cluster weights: softmax(mean score / temperature)."""
    logits = np.asarray(means, dtype=np.float64) / temperature
    exp = np.exp(logits - logits.max())
    return np.asarray(exp / exp.sum())


def share_quotas(weights: np.ndarray, spare: list[int], budget: int) -> list[int]:
    """Rows to draw from each cluster in a weighted round: `budget` in proportion to
    `weights`, never more than a cluster's `spare` (unselected) rows.

    Exactly `min(budget, sum(spare))` rows. Each pass splits what is left over the clusters
    with spare rows by weight and floors; what capped clusters could not take is split
    again over the others, and once nothing is capped the indivisible rest goes one row at
    a time to the largest fractional parts (ties: lower cluster id).
    """
    w = np.asarray(weights, dtype=np.float64)
    quotas = [0] * len(spare)
    left = min(budget, sum(spare))
    while left > 0:
        open_ = [c for c, room in enumerate(spare) if room > quotas[c]]
        total = float(w[open_].sum())
        # weights that underflowed to zero everywhere left: split evenly
        ideal = {c: left * (w[c] / total if total > 0 else 1 / len(open_)) for c in open_}
        capped = False
        for c in open_:
            take = min(math.floor(ideal[c]), spare[c] - quotas[c])
            capped |= take < math.floor(ideal[c])
            quotas[c] += take
            left -= take
        if capped:  # split the capped clusters' rest again, by weight, over the others
            continue
        by_fraction = sorted(
            (c for c in open_ if spare[c] > quotas[c]),
            key=lambda c: (-(ideal[c] - math.floor(ideal[c])), c),
        )
        for c in by_fraction[:left]:
            quotas[c] += 1
            left -= 1
    return quotas


@dataclass(frozen=True)
class KMeansFit:
    """A trained clustering: centroids, each point's cluster, and the final objective."""

    centroids: np.ndarray
    labels: np.ndarray
    objective: float


def train_kmeans(
    vectors: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int,
    seed: int,
    max_points_per_centroid: int | None,
    gpu: bool = False,
) -> KMeansFit:
    """faiss k-means on `vectors`, trained on every point unless a per-centroid cap is set."""
    import faiss  # heavy: only when a stage runs

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows, got k={k} for {n} rows")
    cap = max_points_per_centroid if max_points_per_centroid is not None else n
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        max_points_per_centroid=cap,
        # only silences faiss's "please provide at least 39 points per centroid" warning
        min_points_per_centroid=1,
        verbose=False,
        gpu=gpu,
    )
    objective = kmeans.train(x)
    _, labels = kmeans.index.search(x, 1)
    return KMeansFit(
        centroids=np.asarray(kmeans.centroids, dtype=np.float32),
        labels=labels.reshape(-1).astype(np.int64),
        objective=float(objective),
    )


def check_gpu_faiss() -> None:
    """Raise a clear error unless this faiss build can run on a GPU."""
    import faiss  # heavy: only when a stage runs

    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or get_num_gpus() < 1:
        raise RuntimeError(
            "kmeans device 'gpu' needs faiss with GPU support and a visible GPU "
            "(pip install 'gristmill[gpu]' for faiss-gpu-cu12); use device: cpu otherwise"
        )


@dataclass(frozen=True, kw_only=True)
class KMeansConfig(StageConfig):
    """kMQ settings: budget, clustering, and the optional quality weighting."""

    #: Rows to select: an int, or a float fraction of the input in (0, 1].
    budget: int | float = 0.1
    #: Number of clusters; None: round(sqrt(n)) capped by the budget and the row count.
    k: int | None = None
    #: Text to embed when no embedding column is used.
    field: TextField = "prompt"
    #: Reuse this column when the input has it (the `embed` stage writes "embedding").
    embedding_column: str | None = EMBEDDING_COLUMN
    #: Seed of k-means and of the sampling; None: derived from the run seed.
    seed: int | None = None
    niter: int = 100
    nredo: int = 1
    #: faiss trains on at most this many points per centroid; None: on all points.
    max_points_per_centroid: int | None = None
    #: "uniform" sampling inside clusters, or "quality": p ∝ exp(score / temperature).
    weighting: Literal["uniform", "quality"] = "uniform"
    #: Numeric score for "quality" weighting (any `score__*` column).
    score_column: str | None = None
    temperature: float = 1.0
    #: "cpu" (faiss-cpu) or "gpu" (needs faiss built with GPU support).
    device: Literal["cpu", "gpu"] = "cpu"
    #: Iterative refinement: draw the budget in this many rounds, later rounds' cluster
    #: shares following the scorer's cluster means. 1: one draw, no scorer.
    rounds: int = 1
    #: The stage that scores each round's new rows, as a recipe writes a stage
    #: (`{judge: {mode: score, name: quality}}`) or a stage object; a row-local stage that
    #: writes a `score__*` column. Kept as its spec with every field resolved.
    scorer: Mapping[str, Any] | Stage | None = None
    #: The scorer's column that sets the shares; None: its only `score__*` column.
    round_score: str | None = None
    #: A later round's cluster weights are softmax(mean score / share_temperature).
    share_temperature: float = 1.0
    #: Rows per scorer call (the scorer sees them as a map stage sees one part).
    score_batch: int = 64

    def __post_init__(self) -> None:
        where = "kmeans config"
        check_budget(self.budget, where=where)
        check_text_field(self.field, where=where)
        if self.k is not None and self.k < 1:
            raise ValueError(f"{where}: k must be >= 1, got {self.k}")
        if self.niter < 1 or self.nredo < 1:
            raise ValueError(f"{where}: niter and nredo must be >= 1")
        if self.max_points_per_centroid is not None and self.max_points_per_centroid < 1:
            raise ValueError(f"{where}: max_points_per_centroid must be >= 1 or null")
        if self.weighting not in ("uniform", "quality"):
            raise ValueError(
                f"{where}: weighting must be 'uniform' or 'quality', got {self.weighting!r}"
            )
        if self.weighting == "quality" and not self.score_column:
            raise ValueError(
                f"{where}: weighting 'quality' needs a score_column (e.g. score__quality)"
            )
        if not self.temperature > 0:
            raise ValueError(f"{where}: temperature must be > 0, got {self.temperature}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"{where}: device must be 'cpu' or 'gpu', got {self.device!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"{where}: rounds must be an integer >= 1, got {self.rounds!r}")
        if not self.share_temperature > 0:
            raise ValueError(
                f"{where}: share_temperature must be > 0, got {self.share_temperature}"
            )
        if self.score_batch < 1:
            raise ValueError(f"{where}: score_batch must be >= 1, got {self.score_batch}")
        if self.scorer is None:
            if self.rounds > 1:
                raise ValueError(
                    f"{where}: rounds > 1 needs a scorer to weight the later rounds, e.g. "
                    "scorer: {judge: {mode: score, name: quality}}"
                )
            if self.round_score is not None:
                raise ValueError(f"{where}: round_score names a column of the scorer; none is set")
            return
        if self.rounds == 1:
            raise ValueError(f"{where}: a scorer runs between rounds; set rounds >= 2")
        from gristmill.stages import stage_spec  # see build_scorer

        scorer = build_scorer(self.scorer, where=f"{where}: scorer")
        score = scorer_column(scorer, self.round_score, where=f"{where}: round_score")
        object.__setattr__(self, "scorer", stage_spec(scorer))
        object.__setattr__(self, "round_score", score)
        # the built stage rides along outside the fields: not compared, hashed or written
        object.__setattr__(self, "_scorer", scorer)

    def scorer_stage(self) -> Map | None:
        """The built scorer stage (None without rounds)."""
        stage: Map | None = getattr(self, "_scorer", None)
        return stage


def build_scorer(spec: object, *, where: str) -> Map:
    """The scorer stage from its recipe spec or a stage object: a row-local stage."""
    # The registry lists this module's stage, so it is imported when a config is built.
    from gristmill.stages import build_stage

    stage = build_stage(spec, where=where)
    if not isinstance(stage, Map):
        raise ValueError(
            f"{where}: must be a row-local stage (a Map or Filter) that scores rows; "
            f"{stage.name!r} is a {stage.kind} stage"
        )
    return stage


def scorer_column(scorer: Map, column: str | None, *, where: str) -> str:
    """The `score__*` column of the scorer that weights the rounds."""
    produced = [c for c in scorer.produces() if c.startswith(SCORE_PREFIX)]
    if column is not None:
        if column not in produced:
            raise ValueError(
                f"{where}: {column!r} is not a `{SCORE_PREFIX}*` column the scorer "
                f"{scorer.name!r} writes ({produced or 'it writes none'})"
            )
        return column
    if len(produced) != 1:
        raise ValueError(
            f"{where}: the scorer {scorer.name!r} must write one `{SCORE_PREFIX}*` column "
            f"to weight the rounds, it writes {produced or 'none'}"
            + ("; name one with round_score" if produced else "")
        )
    return produced[0]


class KMeansSelect(Select):
    """kMQ: FAISS k-means on all points, per-cluster budget with leftovers redistributed, uniform
    or quality-weighted draws, optionally in rounds re-weighted by a scorer's cluster means."""

    name: ClassVar[str] = "kmeans"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "selector"
    citation: ClassVar[str | None] = (
        "Yu et al., 2024. Diversify and Conquer: Diversity-Centric Data Selection with "
        "Iterative Refinement (kMQ). arXiv:2409.11378"
    )
    Config: ClassVar[type[StageConfig]] = KMeansConfig
    uses_embedder: ClassVar[bool] = True
    config: KMeansConfig

    def requires(self) -> tuple[str, ...]:
        cols = [field_source_column(self.config.field)]
        if self.config.weighting == "quality" and self.config.score_column:
            cols.append(self.config.score_column)
        scorer = self.config.scorer_stage()
        if scorer is not None:
            cols += [c for c in scorer.requires() if c not in cols]
        return tuple(cols)

    def reads(self) -> tuple[str, ...] | None:
        """The ids, the embedded field, a stored embedding and the quality score; every
        column when a scorer runs (a scorer stage sees whole rows)."""
        cfg = self.config
        if cfg.scorer_stage() is not None:
            return None
        cols = ["id", field_source_column(cfg.field)]
        if cfg.embedding_column is not None:
            cols.append(cfg.embedding_column)
        if cfg.weighting == "quality" and cfg.score_column:
            cols.append(cfg.score_column)
        return tuple(cols)

    def produces(self) -> tuple[str, ...]:
        scorer = self.config.scorer_stage()
        return ("cluster", *(scorer.produces() if scorer is not None else ()))

    def engine_names(self) -> tuple[str | None, ...]:
        """The scorer's engines (its engines' identity then enters the fingerprint)."""
        scorer = self.config.scorer_stage()
        return scorer.engine_names() if scorer is not None else ()

    def config_for_fingerprint(self) -> dict[str, Any]:
        """The config, with the scorer as its key, version and fingerprinted config (the
        engine it names counts by identity, through `engine_names`, not by name)."""
        values = super().config_for_fingerprint()
        scorer = self.config.scorer_stage()
        if scorer is not None:
            spec = self.config.scorer
            assert isinstance(spec, Mapping)  # __post_init__ keeps the scorer as its spec
            values["scorer"] = {
                "stage": next(iter(spec)),
                "version": scorer.version,
                "config": scorer.config_for_fingerprint(),
            }
        return values

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Cluster, split the budget over clusters, draw (round by round, scoring the new
        rows, when there are rounds); return the picks in input order."""
        cfg = self.config
        n = data.height
        if n == 0:
            return data.with_columns(pl.lit(None, dtype=pl.Int64).alias("cluster"))
        budget = resolve_budget(cfg.budget, n)
        budgets = round_budgets(budget, cfg.rounds)
        scores = (
            score_values(data, cfg.score_column, where=f"stage {self.name!r}")
            if cfg.weighting == "quality" and cfg.score_column
            else np.zeros(n)
        )
        if cfg.device == "gpu":
            check_gpu_faiss()
        vectors = frame_embeddings(data, ctx, column=cfg.embedding_column, field=cfg.field)
        # without a k, round 1 (the whole budget when there is one round) can reach every cluster
        k = min(cfg.k, n) if cfg.k is not None else default_k(n, budgets[0])
        seed = cfg.seed if cfg.seed is not None else ctx.derive_seed("kmeans")
        fit = train_kmeans(
            vectors,
            k,
            niter=cfg.niter,
            nredo=cfg.nredo,
            seed=seed,
            max_points_per_centroid=cfg.max_points_per_centroid,
            gpu=cfg.device == "gpu",
        )
        members = [np.flatnonzero(fit.labels == c) for c in range(k)]
        sizes = [len(m) for m in members]
        rng = np.random.default_rng(seed)
        logits = scores / cfg.temperature
        selected = np.zeros(n, dtype=bool)
        scorer = cfg.scorer_stage()
        pool = np.zeros(n)  # the scorer's score of every selected row
        means = np.zeros(k)
        drawn: list[np.ndarray] = []
        picks: list[list[int]] = []
        scored: list[pl.DataFrame] = []
        history: list[dict[str, Any]] = []
        parts = 0  # scorer calls so far: each is a part to the scorer
        for r, round_budget in enumerate(budgets):
            weights = None
            if r == 0:  # an even split (the whole budget when there is one round)
                quotas = cluster_quotas(sizes, round_budget)
            else:  # shares by the cluster means of the rows selected so far
                weights = share_weights(means, cfg.share_temperature)
                spare = [int((~selected[m]).sum()) for m in members]
                quotas = share_quotas(weights, spare, round_budget)
            new = _draw(members, quotas, selected, logits, rng)
            drawn.append(new)
            picks.append(quotas)
            if scorer is None:
                continue
            scorer_stats = None
            if len(new):
                frame, scorer_stats = self._score(scorer, data, new, ctx, first_part=parts)
                parts += math.ceil(len(new) / cfg.score_batch)
                pool[new] = score_values(
                    frame, str(cfg.round_score), where=f"stage {self.name!r} scorer"
                )
                scored.append(frame.with_columns(pl.Series(ROW_COLUMN, new, dtype=pl.Int64)))
            means = cluster_means(pool, fit.labels, selected, k)
            history.append(
                {
                    "round": r + 1,
                    "budget": round_budget,
                    "weights": None if weights is None else _rounded(weights),
                    "cluster_picks": quotas,
                    "mean_score": round(float(pool[new].mean()), 6) if len(new) else None,
                    "cluster_means": _rounded(means),
                    "scorer": scorer_stats,
                }
            )
        chosen = np.sort(np.concatenate(drawn))
        ctx.extra_stats.update(
            {
                "rows": n,
                "budget": budget,
                "k": k,
                "seed": seed,
                "trained_on": n
                if cfg.max_points_per_centroid is None
                else min(n, k * cfg.max_points_per_centroid),
                "objective": fit.objective,
                "cluster_sizes": sizes,
                "cluster_picks": [int(sum(p)) for p in zip(*picks, strict=True)],
            }
        )
        out = data.with_columns(pl.Series("cluster", fit.labels, dtype=pl.Int64))[chosen]
        if scorer is None:
            return out
        ctx.extra_stats["rounds"] = history
        # every chosen row was scored once, when it was drawn: align on input position
        columns = pl.concat(scored, how="vertical_relaxed").sort(ROW_COLUMN).drop(ROW_COLUMN)
        return out.with_columns(columns.get_columns())

    def _score(
        self,
        scorer: Map,
        data: pl.DataFrame,
        rows: np.ndarray,
        ctx: StageContext,
        *,
        first_part: int,
    ) -> tuple[pl.DataFrame, dict[str, Any] | None]:
        """The scorer's columns for `rows` (positions in `data`, in that order) and its
        stats merged over its calls. It runs as a map stage runs, on batches without the
        internal row column, under its own name and stats; only its columns are kept."""
        cfg = self.config
        produced = list(scorer.produces())
        batch_all = data[rows].drop(ROW_COLUMN, strict=False)
        frames: list[pl.DataFrame] = []
        extras: list[dict[str, Any]] = []
        for b, start in enumerate(range(0, len(rows), cfg.score_batch)):
            batch = batch_all.slice(start, cfg.score_batch)
            sub = dataclasses.replace(
                ctx,
                stage_name=f"{ctx.stage_name}.scorer",
                part_index=first_part + b,
                state_dir=None,
                extra_stats={},
            )
            out = scorer.process(batch, sub)
            where = f"stage {self.name!r}: scorer {scorer.name!r}"
            if out.height != batch.height or (
                "id" in batch.columns
                and "id" in out.columns
                and not out.get_column("id").equals(batch.get_column("id"))
            ):
                raise RuntimeError(
                    f"{where} must return its input rows in order ({batch.height}), "
                    f"it returned {out.height}"
                )
            missing = [c for c in produced if c not in out.columns]
            if missing:
                raise RuntimeError(f"{where} did not write its column(s) {missing}")
            frames.append(out.select(produced))
            extras.append(sub.extra_stats)
        merged = pl.concat(frames, how="vertical_relaxed")
        stats = None
        if scorer.Stats is not None and any(extras):
            parts = [scorer.Stats.from_dict(e) for e in extras if e]
            stats = scorer.Stats.merge(parts).to_dict()
        return merged, stats


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


def _draw(
    members: list[np.ndarray],
    quotas: list[int],
    selected: np.ndarray,
    logits: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw each cluster's quota from its unselected rows (p ∝ exp(logits)); mark them
    selected; return the new rows, cluster by cluster."""
    picks = []
    for rows, quota in zip(members, quotas, strict=True):
        free = rows[~selected[rows]]
        picks.append(free[gumbel_top_k(logits[free], quota, rng)])
    new = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    selected[new] = True
    return new
