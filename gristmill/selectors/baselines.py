"""Baseline selectors: `random` (seeded uniform sample) and `topk` (highest scores).

Both keep the chosen rows in input order, so outputs stay comparable with `kmeans`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl

from gristmill.pipelines.stage import Select, StageConfig, StageContext
from gristmill.selectors import check_budget, resolve_budget


def score_values(frame: pl.DataFrame, column: str, *, where: str) -> np.ndarray:
    """A numeric score column as float64; missing, non-numeric, null or NaN is an error."""
    if column not in frame.columns:
        raise ValueError(f"{where}: score column {column!r} is not in the input {frame.columns}")
    series = frame.get_column(column)
    if not series.dtype.is_numeric():
        raise ValueError(f"{where}: score column {column!r} must be numeric, got {series.dtype}")
    values = series.cast(pl.Float64).to_numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        row = int(bad[0])
        who = f"id {frame.get_column('id')[row]!r}" if "id" in frame.columns else f"row {row}"
        raise ValueError(
            f"{where}: score column {column!r} is {values[row]!r} in {who} "
            f"({len(bad)} rows without a finite score); filter them first"
        )
    return values


@dataclass(frozen=True, kw_only=True)
class RandomConfig(StageConfig):
    """How many rows to sample, and the seed (None: derived from the run seed)."""

    budget: int | float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget, where="random config")


class RandomSelect(Select):
    """Baseline: a seeded uniform sample of `budget` rows without replacement."""

    name: ClassVar[str] = "random"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "selector"
    Config: ClassVar[type[StageConfig]] = RandomConfig
    config: RandomConfig

    def reads(self) -> tuple[str, ...]:
        """Nothing but the row count."""
        return ()

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Sample rows uniformly; return them in input order."""
        n = data.height
        budget = resolve_budget(self.config.budget, n)
        seed = self.config.seed if self.config.seed is not None else ctx.derive_seed("random")
        chosen = np.random.default_rng(seed).choice(n, size=budget, replace=False)
        ctx.extra_stats.update({"budget": budget, "rows": n, "seed": seed})
        return data[np.sort(chosen)]


@dataclass(frozen=True, kw_only=True)
class TopKConfig(StageConfig):
    """How many rows to keep and which score ranks them."""

    budget: int | float = 0.1
    score_column: str = "score__quality"
    #: True keeps the highest scores, False the lowest.
    largest: bool = True

    def __post_init__(self) -> None:
        check_budget(self.budget, where="topk config")
        if not self.score_column:
            raise ValueError("topk config: score_column must be a non-empty column name")


class TopKSelect(Select):
    """Baseline: the `budget` best rows by a score column; ties go to the earlier row."""

    name: ClassVar[str] = "topk"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "selector"
    Config: ClassVar[type[StageConfig]] = TopKConfig
    config: TopKConfig

    def requires(self) -> tuple[str, ...]:
        return (self.config.score_column,)

    def reads(self) -> tuple[str, ...]:
        """The score, and the ids that name a row without one."""
        return ("id", self.config.score_column)

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Rank by score (stable, so earlier rows win ties); return the top in input order."""
        cfg = self.config
        scores = score_values(data, cfg.score_column, where=f"stage {self.name!r}")
        budget = resolve_budget(cfg.budget, data.height)
        order = np.argsort(-scores if cfg.largest else scores, kind="stable")
        chosen = np.sort(order[:budget])
        ctx.extra_stats.update(
            {
                "budget": budget,
                "rows": data.height,
                "score_cutoff": float(scores[order[budget - 1]]) if budget else None,
            }
        )
        return data[chosen]
