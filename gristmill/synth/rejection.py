"""The `rejection` stage: sample k answers per query, verify them, keep the correct ones.

After rejection-sampling fine-tuning (RFT, Yuan et al. 2023): every query gets k samples
per round at one temperature, in ONE `generate` call per round across the batch; samples
are checked by a verifier (`gristmill.verify`); the correct ones are de-duplicated (by
normalised text, or RFT-style by their sequence of equations) and emitted as SFT records,
or paired with incorrect samples of the same query as DPO preference records. Every row
carries its lineage (`parent_id` = the query's id), its sampling settings and its verdict.
Queries that end with nothing to emit go to `rejected/` with their counters.

The config, output and statistics are shared with DART (`synth/dart.py`), which differs
only in how many samples each query gets per round.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import polars as pl

from gristmill.engines.base import Message
from gristmill.pipelines.stage import ROW_COLUMN, LLMConfig, Map, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, by_key, counts, most, summed
from gristmill.records import (
    CORE_COLUMNS,
    DROP_REASON,
    make_record,
    record_id,
    records_frame,
)
from gristmill.sandbox import ISOLATION_SETTINGS, IsolationSetting, require_isolation
from gristmill.synth.continuous import run_loop
from gristmill.synth.sampling import (
    Counter,
    LoopState,
    Query,
    Sample,
    SamplingSpec,
    round_bar,
    samples_by_query,
    usable_queries,
    with_rejected,
)
from gristmill.verify import get_verifier
from gristmill.verify.base import Verifier


@dataclass(frozen=True, kw_only=True)
class SolveConfig(LLMConfig):
    """What every verified-sampling stage shares: prompt, sampling, checking and output."""

    #: The user turn sent to the model; `{prompt}` is replaced by the query's prompt.
    prompt_template: str = "{prompt}"
    system: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    #: `math` (answer extraction + equivalence) or `code` (tests in the sandbox).
    verifier: str = "math"
    #: Math only: accept the last number of a response that states no explicit answer.
    allow_last_number: bool = False
    #: Math only: when answer and reference both carry a unit, they must be the same one
    #: (`864 inches^3` is then not `864 inches^2`); off: units are ignored.
    compare_units: bool = False
    #: When two correct samples of a query count as one: `text` (normalised), `equations`
    #: (RFT: same sequence of equations), `none`.
    dedup: Literal["text", "equations", "none"] = "text"
    #: `sft`: one record per kept correct sample; `dpo`: prompt/chosen/rejected pairs.
    emit: Literal["sft", "dpo"] = "sft"
    #: DPO: pairs per query (each correct and each incorrect sample is used once).
    max_pairs: int = 1
    #: Which correct samples to keep when there are more than the target: the first ones
    #: sampled, or a seeded random choice.
    keep: Literal["first", "random"] = "first"
    #: Input column that names a difficulty bucket for the stats (e.g. `level`); without it
    #: buckets come from measured fail rates when known, else everything is one bucket.
    bucket_column: str | None = None
    verify_workers: int = 4
    #: Code verifier: `strong` refuses to run responses where only a weak sandbox tier works
    #: (no namespaces; code running as root could write host files); `weak` runs, warned.
    isolation: IsolationSetting = "strong"

    def __post_init__(self) -> None:
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {prompt}")
        if self.isolation not in ISOLATION_SETTINGS:
            raise ValueError(f"isolation must be 'strong' or 'weak', got {self.isolation!r}")
        if self.max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.verifier not in ("math", "code"):
            raise ValueError(f"verifier must be 'math' or 'code', got {self.verifier!r}")


@dataclass(frozen=True, kw_only=True)
class RejectionConfig(SolveConfig):
    """Vanilla rejection sampling: the same number of samples for every query."""

    #: Samples per query per round.
    k: int = 4
    rounds: int = 1
    #: Keep at most this many distinct correct samples per query (None: all of them).
    max_correct: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or self.rounds < 1:
            raise ValueError(f"k and rounds must be >= 1, got k={self.k}, rounds={self.rounds}")
        if self.max_correct is not None and self.max_correct < 1:
            raise ValueError(f"max_correct must be >= 1, got {self.max_correct}")


class VanillaPolicy:
    """k samples for every query in each of `rounds` rounds (fewer once max_correct is met)."""

    def __init__(self, k: int, rounds: int, max_correct: int | None) -> None:
        self.k, self.rounds, self.max_correct = k, rounds, max_correct

    def wants(self, query_id: str, counter: Counter, requests: int) -> int:
        if requests >= self.rounds:
            return 0
        counter.target = self.max_correct
        if self.max_correct is None or counter.correct < self.max_correct:
            return self.k
        return 0

    def after(self, query_id: str, counter: Counter, requests: int) -> None:
        return None


# ---- shared stage body ----------------------------------------------------------------------

#: Columns a verified-sampling stage writes on its rows (besides the record columns).
SAMPLE_COLUMNS: dict[str, pl.DataType] = {
    "sample_round": pl.Int64(),
    "sample_index": pl.Int64(),
    "sample_seed": pl.Int64(),
    "temperature": pl.Float64(),
    "top_p": pl.Float64(),
    "max_tokens": pl.Int64(),
    "finish_reason": pl.String(),
    "output_tokens": pl.Int64(),
    "verdict_extracted": pl.String(),
    "verdict_reason": pl.String(),
    "query_trials": pl.Int64(),
    "query_correct": pl.Int64(),
    "query_raw_correct": pl.Int64(),
    "query_target": pl.Int64(),
    "fail_rate": pl.Float64(),
    "difficulty": pl.String(),
}
PAIR_COLUMNS: dict[str, pl.DataType] = {
    "chosen": pl.String(),
    "rejected": pl.String(),
    "rejected_extracted": pl.String(),
    "rejected_reason": pl.String(),
    "rejected_finish_reason": pl.String(),
    "rejected_seed": pl.Int64(),
}
_NOT_PASSED = frozenset({*CORE_COLUMNS, ROW_COLUMN, DROP_REASON, "embedding"})


def build_verifier(cfg: SolveConfig) -> Verifier:
    """The configured verifier."""
    if cfg.verifier == "math":
        return get_verifier(
            "math", allow_last_number=cfg.allow_last_number, compare_units=cfg.compare_units
        )
    return get_verifier(cfg.verifier)


def user_turn(cfg: SolveConfig, prompt: str) -> list[Message]:
    """The conversation sent to the model for one query (system turn optional)."""
    head: list[Message] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return [*head, {"role": "user", "content": cfg.prompt_template.replace("{prompt}", prompt)}]


@dataclass(frozen=True, kw_only=True)
class BucketStats(ExtraStats):
    """One difficulty bucket's queries and samples; coverage and means follow from the sums."""

    queries: int = summed()
    trials: int = summed()
    correct: int = summed()
    #: Queries with at least one correct sample.
    covered: int = summed()
    kept: int = summed()
    kept_tokens: int = summed()
    sample_tokens: int = summed()

    def derived(self) -> dict[str, Any]:
        """Share of queries covered, and the mean lengths of kept and of all samples."""
        return {
            "coverage": _ratio(self.covered, self.queries, digits=4),
            "mean_response_tokens": _ratio(self.kept_tokens, self.kept, digits=1),
            "mean_sample_tokens": _ratio(self.sample_tokens, self.trials, digits=1),
        }


def _ratio(part: float, whole: float, *, digits: int) -> float:
    """`part / whole` rounded, 0.0 for an empty whole."""
    return round(part / whole, digits) if whole else 0.0


@dataclass(frozen=True, kw_only=True)
class SamplerStats(ExtraStats):
    """Stats of `rejection` and `dart`: per difficulty bucket, rounds of the loop, calls."""

    buckets: dict[str, BucketStats] = by_key(BucketStats)
    #: Samples by verdict reason (equal, not_equal, no_answer, ambiguous, truncated...).
    verdicts: dict[str, int] = counts()
    #: Rounds of the sampling loop: the stage took as many as its longest part.
    rounds: int = most()
    calls: int = summed()

    def to_dict(self) -> dict[str, Any]:
        """`ExtraStats.to_dict` with the buckets easiest first (numeric names by value)."""
        out = super().to_dict()
        out["buckets"] = {k: out["buckets"][k] for k in sorted(out["buckets"], key=_bucket_order)}
        return out


def _bucket_order(name: str) -> tuple[int, float | str]:
    """Sort key of bucket names: numeric ones by value first, then the others by name."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


class VerifiedSampler(Map):
    """Base of `rejection` and `dart`: render queries, run the loop, emit rows and stats."""

    Stats: ClassVar[type[ExtraStats] | None] = SamplerStats
    uses_engine: ClassVar[bool] = True
    unhashed: ClassVar[frozenset[str]] = frozenset({"verify_workers", "isolation"})

    def requires(self) -> tuple[str, ...]:
        return ("id", "prompt", "reference")

    def produces(self) -> tuple[str, ...]:
        cols = ["parent_id", "verdict_reason", "query_trials", "query_correct", "query_raw_correct"]
        if self.solve_config.emit == "dpo":
            cols += ["chosen", "rejected"]
        return tuple(cols)

    @property
    def solve_config(self) -> SolveConfig:
        assert isinstance(self.config, SolveConfig)
        return self.config

    def policy(self, rows: Sequence[Mapping[str, Any]]) -> Any:
        """The allocation policy for these query rows."""
        raise NotImplementedError

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        cfg = self.solve_config
        if cfg.verifier == "code":  # runs model-written code: before any model time is spent
            require_isolation(self.name, cfg.isolation)
        engine = ctx.engine()
        usable, rejected = usable_queries(batch.to_dicts())
        queries = [
            Query(
                id=row["id"],
                prompt_text=engine.chat_prompt(user_turn(cfg, row["prompt"])),
                reference=row["reference"],
            )
            for row in usable
        ]
        bar = round_bar(self.name, ctx)

        def progress(state: LoopState) -> None:
            covered = sum(1 for c in state.counters.values() if c.correct > 0)
            trials = sum(c.trials for c in state.counters.values())
            bar.update(1)
            bar.set_postfix(trials=trials, covered=f"{covered}/{len(queries)}")

        policy = self.policy(usable)
        state = run_loop(
            queries,
            policy,
            engine=engine,
            verifier=build_verifier(cfg),
            spec=SamplingSpec(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                stop=cfg.stop,
            ),
            seed_for=lambda qid, r: ctx.derive_seed(qid, r),
            dedup=cfg.dedup,
            state_dir=ctx.state_dir,
            verify_workers=cfg.verify_workers,
            progress=progress,
        )
        bar.close()
        out, dropped, kept = self._emit(usable, state, ctx, model=engine.model_id)
        rejected.extend(dropped)
        stats = bucket_stats(
            usable, state, kept, bucket_of=self._bucket_fn(state), calls=state.calls
        )
        ctx.extra_stats.update(stats.to_dict())
        ctx.extra_stats.update(self.provenance(policy))
        return with_rejected(out, rejected)

    def provenance(self, policy: Any) -> dict[str, Any]:
        """Extra stats saying where the policy's inputs came from (none for plain sampling)."""
        return {}

    # ---- output -----------------------------------------------------------------------
    def _bucket_fn(self, state: LoopState) -> Any:
        column = self.solve_config.bucket_column

        def bucket(row: Mapping[str, Any]) -> str:
            if column is not None:
                if column not in row:
                    raise ValueError(
                        f"stage {self.name!r}: bucket_column {column!r} is not an input column"
                    )
                return str(row[column])
            rate = state.counters[row["id"]].fail_rate
            return fail_rate_bucket(rate) if rate is not None else "all"

        return bucket

    def _emit(
        self, rows: Sequence[dict[str, Any]], state: LoopState, ctx: StageContext, *, model: str
    ) -> tuple[pl.DataFrame, list[dict[str, Any]], dict[str, list[Sample]]]:
        cfg = self.solve_config
        by_query = samples_by_query(state)
        bucket = self._bucket_fn(state)
        records: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        kept_by_query: dict[str, list[Sample]] = {}
        extra_schema: dict[str, pl.DataType] = dict(SAMPLE_COLUMNS)
        if cfg.emit == "dpo":
            extra_schema.update(PAIR_COLUMNS)
        for row in rows:
            qid = row["id"]
            counter = state.counters[qid]
            samples = by_query.get(qid, [])
            kept = choose_correct(samples, counter.target, cfg.keep, ctx.derive_seed("keep", qid))
            kept_by_query[qid] = kept
            passed = {k: v for k, v in row.items() if k not in _NOT_PASSED}
            query_info = {
                "query_trials": counter.trials,
                "query_correct": counter.correct,
                "query_raw_correct": counter.raw_correct,
                "query_target": counter.target,
                "fail_rate": counter.fail_rate,
                "difficulty": bucket(row),
            }
            convo = user_turn(cfg, row["prompt"])
            made = (
                _sft_rows(convo, row, kept, cfg, model, passed, query_info)
                if cfg.emit == "sft"
                else _dpo_rows(convo, row, kept, samples, cfg, model, passed, query_info)
            )
            if made:
                records.extend(made)
            else:
                reason = "no_correct_sample" if not kept else "no_incorrect_sample"
                dropped.append({**row, **query_info, DROP_REASON: reason})
        for name, dtype in self._passthrough_schema(rows).items():
            extra_schema.setdefault(name, dtype)
        return records_frame(records, extra_schema), dropped, kept_by_query

    @staticmethod
    def _passthrough_schema(rows: Sequence[Mapping[str, Any]]) -> dict[str, pl.DataType]:
        if not rows:
            return {}
        frame = pl.DataFrame(list(rows), infer_schema_length=None)
        return {k: v for k, v in frame.schema.items() if k not in _NOT_PASSED}


def _sample_fields(s: Sample, cfg: SolveConfig) -> dict[str, Any]:
    return {
        "sample_round": s.round,
        "sample_index": s.index,
        "sample_seed": s.seed,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "finish_reason": s.finish_reason,
        "output_tokens": s.output_tokens,
        "verdict_extracted": s.extracted,
        "verdict_reason": s.reason,
    }


def _sft_rows(
    convo: list[Message],
    row: Mapping[str, Any],
    kept: Sequence[Sample],
    cfg: SolveConfig,
    model: str,
    passed: Mapping[str, Any],
    query_info: Mapping[str, Any],
) -> list[dict[str, Any]]:
    return [
        make_record(
            [*convo, {"role": "assistant", "content": s.text}],
            source=row["source"],
            reference=row["reference"],
            parent_id=row["id"],
            model=model,
            **passed,
            **query_info,
            **_sample_fields(s, cfg),
        )
        for s in kept
    ]


def _dpo_rows(
    convo: list[Message],
    row: Mapping[str, Any],
    kept: Sequence[Sample],
    samples: Sequence[Sample],
    cfg: SolveConfig,
    model: str,
    passed: Mapping[str, Any],
    query_info: Mapping[str, Any],
) -> list[dict[str, Any]]:
    wrong = incorrect_candidates(samples)
    out = []
    for good, bad in zip(kept[: cfg.max_pairs], wrong[: cfg.max_pairs], strict=False):
        messages = [*convo, {"role": "assistant", "content": good.text}]
        rec = make_record(
            messages,
            source=row["source"],
            reference=row["reference"],
            parent_id=row["id"],
            model=model,
            **passed,
            **query_info,
            **_sample_fields(good, cfg),
            chosen=good.text,
            rejected=bad.text,
            rejected_extracted=bad.extracted,
            rejected_reason=bad.reason,
            rejected_finish_reason=bad.finish_reason,
            rejected_seed=bad.seed,
        )
        # a pair is defined by both answers: two pairs sharing `chosen` get distinct ids
        rec["id"] = record_id(
            [*messages, {"role": "rejected", "content": bad.text}], row["reference"]
        )
        out.append(rec)
    return out


def choose_correct(
    samples: Sequence[Sample], target: int | None, keep: str, seed: int
) -> list[Sample]:
    """The distinct correct samples to emit: all, or `target` of them (first or random)."""
    good = [s for s in samples if s.distinct_correct]
    if target is None or len(good) <= target:
        return good
    if keep == "first":
        return good[:target]
    picked = sorted(random.Random(seed).sample(range(len(good)), target))
    return [good[i] for i in picked]


def incorrect_candidates(samples: Sequence[Sample]) -> list[Sample]:
    """Distinct incorrect samples for DPO's `rejected`, finished answers before truncated."""
    seen: set[str] = set()
    out: list[Sample] = []
    for s in sorted(
        (s for s in samples if not s.correct), key=lambda s: s.finish_reason == "length"
    ):
        key = " ".join(s.text.lower().split())
        if key and key not in seen:
            seen.add(key)
            out.append(s)
    return out


# ---- statistics -----------------------------------------------------------------------------

FAIL_RATE_BUCKETS = ((0.25, "fail<0.25"), (0.5, "fail<0.5"), (0.75, "fail<0.75"), (1.0, "fail<1"))


def fail_rate_bucket(rate: float) -> str:
    """A coarse difficulty bucket from a fail rate (1.0: never solved while probing)."""
    for bound, name in FAIL_RATE_BUCKETS:
        if rate < bound:
            return name
    return "fail=1"


def bucket_stats(
    rows: Sequence[Mapping[str, Any]],
    state: LoopState,
    kept: Mapping[str, Sequence[Sample]],
    *,
    bucket_of: Any,
    calls: int,
) -> SamplerStats:
    """One part's statistics: each bucket's queries and samples, samples by verdict reason,
    the rounds, the calls."""
    by_query = samples_by_query(state)
    per_bucket: dict[str, list[BucketStats]] = {}
    for row in rows:
        c: Counter = state.counters[row["id"]]
        mine = kept.get(row["id"], ())
        per_bucket.setdefault(bucket_of(row), []).append(
            BucketStats(
                queries=1,
                trials=c.trials,
                correct=c.correct,
                covered=1 if c.correct > 0 else 0,
                kept=len(mine),
                kept_tokens=sum(s.output_tokens for s in mine),
                sample_tokens=sum(s.output_tokens for s in by_query.get(row["id"], [])),
            )
        )
    buckets = {name: BucketStats.merge(items) for name, items in per_bucket.items()}
    verdicts: dict[str, int] = {}
    for sample in state.samples:
        verdicts[sample.reason] = verdicts.get(sample.reason, 0) + 1
    return SamplerStats(buckets=buckets, verdicts=verdicts, rounds=state.rounds, calls=calls)


class RejectionSample(VerifiedSampler):
    """Rejection sampling (RFT): k samples per query per round, verified, deduped; SFT rows or DPO
    pairs."""

    name: ClassVar[str] = "rejection"
    #: 2: rows carry `query_raw_correct` (every correct sample, duplicates included).
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "synth"
    citation: ClassVar[str | None] = (
        "Yuan et al., 2023. Scaling Relationship on Learning Mathematical Reasoning with "
        "Large Language Models (RFT). arXiv:2308.01825"
    )
    Config: ClassVar[type[StageConfig]] = RejectionConfig

    def policy(self, rows: Sequence[Mapping[str, Any]]) -> VanillaPolicy:
        cfg = self.config
        assert isinstance(cfg, RejectionConfig)
        return VanillaPolicy(cfg.k, cfg.rounds, cfg.max_correct)
