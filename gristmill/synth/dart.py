"""The `dart` stage: DART-Math's difficulty-aware rejection tuning (Uniform and Prop2Diff).

Vanilla rejection sampling gives every query the same number of trials, so its data is
biased toward easy queries and often holds nothing for the hardest ones. DART keeps
sampling a query until it has its target number of correct answers or hits a trial cap:

- `uniform`: every query's target is k_u. We stop at exactly k_u kept answers (a round may
  find more; the first k_u, or a seeded random k_u, are kept). The reference code's strict
  `>` test keeps sampling until k_u + 1 and so overshoots by one; we do not.
- `prop2diff`: difficulty is the fail rate measured in a first probing round of m samples
  per query (or read from `difficulty_column`); the target is ceil(k_p * fail_rate) with at
  least 1, so a query never solved while probing gets k_p.

Each round is ONE `generate` call over every unfinished query. The per-query counters are
saved with every round (see `synth/sampling.py`), so a resumed run continues from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from gristmill.pipelines.stage import StageConfig
from gristmill.synth.rejection import SolveConfig, VerifiedSampler
from gristmill.synth.sampling import LoopState, Query


@dataclass(frozen=True, kw_only=True)
class DartConfig(SolveConfig):
    """DART's allocation: targets per query, samples per round and the trial cap."""

    strategy: Literal["uniform", "prop2diff"] = "prop2diff"
    #: Uniform: correct answers wanted for every query.
    k_u: int = 4
    #: Prop2Diff: correct answers wanted for the hardest query (fail rate 1).
    k_p: int = 8
    #: Prop2Diff: samples per query in the probing round that measures fail rates.
    probe_samples: int = 8
    #: Samples per unfinished query in each later round.
    samples_per_round: int = 8
    #: Trial cap per query (probing included).
    max_trials: int = 64
    #: Prop2Diff: a column holding each query's fail rate in [0, 1], instead of probing.
    difficulty_column: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_u", "k_p", "probe_samples", "samples_per_round", "max_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        probing = self.strategy == "prop2diff" and self.difficulty_column is None
        if probing and self.probe_samples > self.max_trials:
            raise ValueError("probe_samples cannot exceed max_trials")


def prop2diff_target(k_p: int, failures: int, trials: int) -> int:
    """ceil(k_p * failures / trials), at least 1 (exact integer arithmetic)."""
    if trials <= 0:
        return k_p
    return max(1, -(-k_p * failures // trials))


class DartPolicy:
    """Rounds until each query has its target of correct answers or its trial cap."""

    def __init__(self, cfg: DartConfig, provided: Mapping[str, float] | None = None) -> None:
        self.cfg = cfg
        self.provided = provided

    @property
    def probing(self) -> bool:
        return self.cfg.strategy == "prop2diff" and self.provided is None

    def next_round(self, state: LoopState, queries: Sequence[Query]) -> dict[str, int]:
        cfg = self.cfg
        if state.rounds == 0:
            if self.probing:
                return {q.id: cfg.probe_samples for q in queries}
            for q in queries:
                c = state.counters[q.id]
                if cfg.strategy == "uniform":
                    c.target = cfg.k_u
                else:
                    assert self.provided is not None
                    rate = self.provided[q.id]
                    c.fail_rate = rate
                    c.target = max(1, math.ceil(cfg.k_p * rate - 1e-9))
        out = {}
        for q in queries:
            c = state.counters[q.id]
            assert c.target is not None
            if c.correct < c.target and c.trials < cfg.max_trials:
                out[q.id] = min(cfg.samples_per_round, cfg.max_trials - c.trials)
        return out

    def after_round(self, state: LoopState, queries: Sequence[Query]) -> None:
        if state.rounds == 1 and self.probing:
            for q in queries:
                c = state.counters[q.id]
                failures = c.trials - c.raw_correct
                c.fail_rate = round(failures / c.trials, 6) if c.trials else 1.0
                c.target = prop2diff_target(self.cfg.k_p, failures, c.trials)


class Dart(VerifiedSampler):
    """DART-Math difficulty-aware rejection sampling (`strategy: uniform | prop2diff`)."""

    name: ClassVar[str] = "dart"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = DartConfig

    def requires(self) -> tuple[str, ...]:
        cfg = self.config
        assert isinstance(cfg, DartConfig)
        extra = (cfg.difficulty_column,) if cfg.difficulty_column else ()
        return (*super().requires(), *extra)

    def policy(self, rows: Sequence[Mapping[str, Any]]) -> DartPolicy:
        cfg = self.config
        assert isinstance(cfg, DartConfig)
        provided = None
        if cfg.strategy == "prop2diff" and cfg.difficulty_column is not None:
            provided = {}
            for row in rows:
                value = row.get(cfg.difficulty_column)
                if not isinstance(value, int | float) or not 0 <= value <= 1:
                    raise ValueError(
                        f"stage 'dart': row {row['id']}: {cfg.difficulty_column!r} must be a "
                        f"fail rate in [0, 1], got {value!r}"
                    )
                provided[row["id"]] = float(value)
        return DartPolicy(cfg, provided)
