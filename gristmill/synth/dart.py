"""The `dart` stage: DART-Math's difficulty-aware rejection tuning (Uniform and Prop2Diff).

Vanilla rejection sampling gives every query the same number of trials, so its data is
biased toward easy queries and often holds nothing for the hardest ones. DART keeps
sampling a query until it has its target number of correct answers or hits a trial cap:

- `uniform`: every query's target is k_u. We stop at exactly k_u kept answers (a round may
  find more; the first k_u, or a seeded random k_u, are kept). The reference code's strict
  `>` test keeps sampling until k_u + 1 and so overshoots by one; we do not.
- `prop2diff`: the target is ceil(k_p * fail_rate) with at least 1, so a query never solved
  gets k_p. The fail rate comes from one of three places, recorded in the stage stats
  (`extra.difficulty`): an earlier run's sampling counters (`difficulty_from`: failures over
  every sample it drew, as the reference reads the pass rate of its whole synthesis pool;
  no probe), a column (`difficulty_column`), or else a first probing round of
  `probe_samples` per query (a rate in steps of 1/m).
- `count`: whether a target counts distinct correct answers (after `dedup`) or every
  correct answer as the reference does (`raw`; with `dedup: none` it is the reference's
  rule exactly, since every correct sample is then also kept).

The sampling defaults are the reference's synthesis settings (T 1.6, top-p 0.95, 2048 new
tokens, at most 2048 trials per query); small CPU recipes lower them.

Each round is ONE `generate` call over every unfinished query. The per-query counters are
saved with every round (see `synth/sampling.py`), so a resumed run continues from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from gristmill.pipelines.stage import StageConfig
from gristmill.pipelines.stats import ExtraStats, first
from gristmill.synth.difficulty import counts_for, read_counters
from gristmill.synth.rejection import SamplerStats, SolveConfig, VerifiedSampler
from gristmill.synth.sampling import Counter


@dataclass(frozen=True, kw_only=True)
class DartConfig(SolveConfig):
    """DART's allocation: targets per query, samples per round and the trial cap."""

    # DART-Math's synthesis settings (README's DART-Math-Uniform command, scripts/synth-vrt.sh)
    temperature: float = 1.6
    top_p: float = 0.95
    max_tokens: int = 2048
    strategy: Literal["uniform", "prop2diff"] = "prop2diff"
    #: Uniform: correct answers wanted for every query.
    k_u: int = 4
    #: Prop2Diff: correct answers wanted for the hardest query (fail rate 1).
    k_p: int = 8
    #: What a target counts: `distinct` correct answers (two that `dedup` finds the same
    #: count once) or every correct answer, duplicates included (`raw`, the reference's
    #: rule). Rows are emitted for distinct answers either way; `dedup: none` keeps all.
    count: Literal["distinct", "raw"] = "distinct"
    #: Prop2Diff: samples per query in the probing round that measures fail rates (skipped
    #: when `difficulty_from` or `difficulty_column` gives them).
    probe_samples: int = 8
    #: Samples per unfinished query in each later round.
    samples_per_round: int = 8
    #: Trial cap per query (probing included); the reference's largest is 2048.
    max_trials: int = 2048
    #: Prop2Diff: a column holding each query's fail rate in [0, 1], instead of probing.
    difficulty_column: str | None = None
    #: Prop2Diff: an earlier run folder, one of its `dart`/`rejection` stage folders, or a
    #: dataset whose rows carry sampling counters (`query_trials`, `query_raw_correct`):
    #: each query's fail rate is its failures over all the samples drawn there; no probe.
    difficulty_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_u", "k_p", "probe_samples", "samples_per_round", "max_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.count not in ("distinct", "raw"):
            raise ValueError(f"count must be 'distinct' or 'raw', got {self.count!r}")
        if self.difficulty_from is not None and self.difficulty_column is not None:
            raise ValueError("give difficulty_from or difficulty_column, not both")
        if self.difficulty_from == "":
            raise ValueError("difficulty_from must be a path (a run, stage folder or dataset)")
        given = self.difficulty_from is not None or self.difficulty_column is not None
        if given and self.strategy != "prop2diff":
            raise ValueError(
                "difficulty_from and difficulty_column only apply to strategy 'prop2diff'"
            )
        if self.probing and self.probe_samples > self.max_trials:
            raise ValueError("probe_samples cannot exceed max_trials")

    @property
    def probing(self) -> bool:
        """Whether fail rates are measured by a probing round (nothing gives them)."""
        return (
            self.strategy == "prop2diff"
            and self.difficulty_column is None
            and self.difficulty_from is None
        )


@dataclass(frozen=True, kw_only=True)
class Difficulty:
    """A query's given fail rate and the Prop2Diff target that follows from it."""

    fail_rate: float
    target: int


@dataclass(frozen=True, kw_only=True)
class DartStats(SamplerStats):
    """`rejection`'s stats plus where Prop2Diff's fail rates came from (None: uniform)."""

    difficulty: dict[str, Any] | None = first()


def prop2diff_target(k_p: int, failures: int, trials: int) -> int:
    """ceil(k_p * failures / trials), at least 1 (exact integer arithmetic)."""
    if trials <= 0:
        return k_p
    return max(1, -(-k_p * failures // trials))


class DartPolicy:
    """Rounds until each query has its target of correct answers or its trial cap."""

    def __init__(
        self,
        cfg: DartConfig,
        provided: Mapping[str, Difficulty] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.provided = provided
        #: Where the fail rates came from, for the stage stats (None: uniform needs none).
        self.source: dict[str, Any] | None = dict(source) if source is not None else None
        if self.probing:
            self.source = {"source": "probe", "probe_samples": cfg.probe_samples}

    @property
    def probing(self) -> bool:
        return self.cfg.strategy == "prop2diff" and self.provided is None

    def wants(self, query_id: str, counter: Counter, requests: int) -> int:
        cfg = self.cfg
        if requests == 0:
            if self.probing:
                return cfg.probe_samples
            if cfg.strategy == "uniform":
                counter.target = cfg.k_u
            else:
                assert self.provided is not None
                given = self.provided[query_id]
                counter.fail_rate, counter.target = given.fail_rate, given.target
        assert counter.target is not None
        have = counter.correct if cfg.count == "distinct" else counter.raw_correct
        if have < counter.target and counter.trials < cfg.max_trials:
            return min(cfg.samples_per_round, cfg.max_trials - counter.trials)
        return 0

    def after(self, query_id: str, counter: Counter, requests: int) -> None:
        if requests == 1 and self.probing:
            failures = counter.trials - counter.raw_correct
            counter.fail_rate = fail_rate(failures, counter.trials)
            counter.target = prop2diff_target(self.cfg.k_p, failures, counter.trials)


def fail_rate(failures: int, trials: int) -> float:
    """failures / trials to 6 places (1.0 with no trials: nothing known to be solved)."""
    return round(failures / trials, 6) if trials else 1.0


class Dart(VerifiedSampler):
    """DART-Math: Uniform (k_u correct per query) or Prop2Diff (targets ∝ fail rate, probed or
    from an earlier run's counters), one `generate` call per round."""

    name: ClassVar[str] = "dart"
    #: 2: rows carry `query_raw_correct`; reference sampling defaults; `count`, `difficulty_from`.
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "synth"
    citation: ClassVar[str | None] = (
        "Tong et al., 2024. DART-Math: Difficulty-Aware Rejection Tuning for Mathematical "
        "Problem-Solving. arXiv:2407.13690"
    )
    Config: ClassVar[type[StageConfig]] = DartConfig
    Stats: ClassVar[type[ExtraStats] | None] = DartStats

    @property
    def dart_config(self) -> DartConfig:
        assert isinstance(self.config, DartConfig)
        return self.config

    def requires(self) -> tuple[str, ...]:
        cfg = self.dart_config
        extra = (cfg.difficulty_column,) if cfg.difficulty_column else ()
        return (*super().requires(), *extra)

    def policy(self, rows: Sequence[Mapping[str, Any]]) -> DartPolicy:
        cfg = self.dart_config
        if cfg.difficulty_from is not None:
            return self._policy_from_counters(rows)
        if cfg.difficulty_column is None:
            return DartPolicy(cfg)
        provided = {}
        for row in rows:
            value = row.get(cfg.difficulty_column)
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(
                    f"stage 'dart': row {row['id']}: {cfg.difficulty_column!r} must be a "
                    f"fail rate in [0, 1], got {value!r}"
                )
            target = max(1, math.ceil(cfg.k_p * value - 1e-9))
            provided[row["id"]] = Difficulty(fail_rate=float(value), target=target)
        return DartPolicy(cfg, provided, {"source": "column", "column": cfg.difficulty_column})

    def _policy_from_counters(self, rows: Sequence[Mapping[str, Any]]) -> DartPolicy:
        """Fail rates from an earlier run's counters: failures over all its samples."""
        cfg = self.dart_config
        assert cfg.difficulty_from is not None
        earlier = read_counters(cfg.difficulty_from)
        counts = counts_for([row["id"] for row in rows], earlier)
        provided = {
            qid: Difficulty(
                fail_rate=fail_rate(c.failures, c.trials),
                target=prop2diff_target(cfg.k_p, c.failures, c.trials),
            )
            for qid, c in counts.items()
        }
        return DartPolicy(cfg, provided, earlier.provenance)

    def provenance(self, policy: Any) -> dict[str, Any]:
        assert isinstance(policy, DartPolicy)
        return {"difficulty": policy.source}
