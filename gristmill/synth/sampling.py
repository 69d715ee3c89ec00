"""The verified-sampling loop shared by rejection sampling and DART, in rounds.

An allocation policy says, per query, how many samples its next request asks for (from that
query's own counters and how many requests it has had). This module's `run_rounds` is the
deterministic mode: each round sends every unfinished query's request as ONE `generate`
call (one request per query with `n` samples and a seed derived from the query id and the
round), verifies every sample against the query's reference, and updates the per-query
counters. After each round the new samples and the counters are written to the part's state
folder, so a crashed run resumes from the last finished round: no query is sampled again
from zero, no round is sampled twice, and the seeds make the resumed run's samples the same
as an uninterrupted run's. `synth.continuous` runs the same policy without round barriers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl
from tqdm import tqdm

from gristmill.engines.base import Completion, Sampling
from gristmill.pipelines.checkpoint import atomic_write_parquet, read_loop_state, write_loop_state
from gristmill.pipelines.stage import MeteredEngine, StageContext
from gristmill.records import DROP_REASON
from gristmill.verify.base import Verdict, Verifier, verify_many

log = logging.getLogger("gristmill.sampling")

STATE_FILE = "state.json"
#: The continuous loop's per-request log (see `synth.continuous`).
LOG_FILE = "requests.jsonl"


@dataclass(frozen=True, kw_only=True)
class Query:
    """One problem to sample: its id, the rendered prompt text and the reference answer."""

    id: str
    prompt_text: str
    reference: str


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One verified sample of one query."""

    query_id: str
    round: int
    index: int
    seed: int
    text: str
    finish_reason: str
    output_tokens: int
    correct: bool
    extracted: str | None
    reason: str
    #: Correct, finished and not a duplicate of an earlier correct sample of its query.
    distinct_correct: bool


@dataclass
class Counter:
    """Per-query counters, persisted with every round."""

    trials: int = 0
    correct: int = 0  # distinct correct samples
    raw_correct: int = 0  # correct samples, duplicates included (for fail rates)
    target: int | None = None
    fail_rate: float | None = None


@dataclass
class LoopState:
    """Everything a resumed run needs: rounds done, counters, and every sample so far."""

    rounds: int = 0
    counters: dict[str, Counter] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    calls: int = 0


class Policy(Protocol):
    """Decides, query by query, how many samples the query's next request asks for.

    `requests` is how many requests of that query have been counted so far (its round
    number). Both loops ask the same questions in the same order per query, so a query's
    k-th request has the same size and seed in either mode.
    """

    def wants(self, query_id: str, counter: Counter, requests: int) -> int:
        """Samples for the query's next request; 0 when the query is finished."""
        ...

    def after(self, query_id: str, counter: Counter, requests: int) -> None:
        """Called once the query's `requests`-th request has been counted."""
        ...


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """The sampling settings every request of the loop uses (seed and n set per request)."""

    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()


# ---- dedup keys -----------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_EQUATION = re.compile(
    r"(?:\d[\d,]*(?:\.\d+)?|[a-zA-Z])(?:\s*[-+*/×÷x^]\s*(?:\d[\d,]*(?:\.\d+)?|[a-zA-Z]|\())+"
    r"[^=\n]*?=\s*-?\d[\d,]*(?:\.\d+)?"
)


def normalized_text(text: str) -> str:
    """Lower-cased text with runs of whitespace collapsed: the plain dedup key."""
    return _SPACE.sub(" ", text.strip().lower())


def equation_key(text: str) -> str:
    """RFT's dedup key: the sequence of equations in a reasoning path (spaces and thousands
    separators removed); a path without equations falls back to its normalized text."""
    eqs = [_SPACE.sub("", m.group(0)).replace(",", "") for m in _EQUATION.finditer(text)]
    return "|".join(eqs) if eqs else normalized_text(text)


def dedup_key(text: str, mode: str) -> str:
    """The key under which two correct samples of a query count as the same sample."""
    match mode:
        case "text":
            return normalized_text(text)
        case "equations":
            return equation_key(text)
        case _:
            raise ValueError(f"unknown dedup mode {mode!r}; expected text or equations")


# ---- persistence ----------------------------------------------------------------------------


def _samples_file(state_dir: Path, round_index: int) -> Path:
    return state_dir / f"samples-r{round_index:04d}.parquet"


def save_round(
    state_dir: Path, state: LoopState, new: Sequence[Sample], ids: Sequence[str]
) -> None:
    """Persist one finished round: its samples first, then the counters that point at it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(
        [asdict(s) for s in new],
        schema={
            "query_id": pl.String(),
            "round": pl.Int64(),
            "index": pl.Int64(),
            "seed": pl.Int64(),
            "text": pl.String(),
            "finish_reason": pl.String(),
            "output_tokens": pl.Int64(),
            "correct": pl.Boolean(),
            "extracted": pl.String(),
            "reason": pl.String(),
            "distinct_correct": pl.Boolean(),
        },
    )
    atomic_write_parquet(frame, _samples_file(state_dir, state.rounds - 1))
    write_loop_state(
        state_dir / STATE_FILE,
        ids,
        rounds=state.rounds,
        calls=state.calls,
        counters={k: asdict(v) for k, v in state.counters.items()},
    )


def load_state(state_dir: Path | None, ids: Sequence[str]) -> LoopState | None:
    """The state of an interrupted run of the same queries, or None to start fresh."""
    if state_dir is None:
        return None
    data = read_loop_state(state_dir / STATE_FILE, ids, "sampling")
    if data is None:
        return None
    samples: list[Sample] = []
    for r in range(int(data["rounds"])):
        path = _samples_file(state_dir, r)
        if not path.exists():
            raise RuntimeError(
                f"{state_dir}: state says {data['rounds']} rounds but {path} is missing"
            )
        samples.extend(Sample(**row) for row in pl.read_parquet(path).iter_rows(named=True))
    return LoopState(
        rounds=int(data["rounds"]),
        counters={k: Counter(**v) for k, v in data["counters"].items()},
        samples=samples,
        calls=int(data.get("calls", 0)),
    )


# ---- what a stage feeds the loop ------------------------------------------------------------


def usable_queries(
    rows: Sequence[dict[str, Any]], check: Callable[[dict[str, Any]], str | None] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows to sample for, and the others with their `drop_reason`: `no_reference`, the
    reason `check` returns, or `duplicate_query` for an id seen earlier in the part."""
    usable: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in rows:
        if row.get("reference") is None:
            reason: str | None = "no_reference"
        elif check is not None and (reason := check(row)) is not None:
            pass
        elif row["id"] in seen:
            reason = "duplicate_query"
        else:
            seen.add(row["id"])
            usable.append(row)
            continue
        rejected.append({**row, DROP_REASON: reason})
    return usable, rejected


def with_rejected(out: pl.DataFrame, rejected: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """A stage's output rows followed by the input rows it set aside (with `drop_reason`)."""
    if not rejected:
        return out
    return pl.concat(
        [out, pl.DataFrame(rejected, infer_schema_length=None)], how="diagonal_relaxed"
    )


def round_bar(stage: str, ctx: StageContext) -> tqdm[Any]:
    """A progress bar counting a part's rounds (hidden when the run shows no progress)."""
    return tqdm(
        desc=f"{stage} part {ctx.part_index}",
        unit="round",
        disable=not ctx.show_progress,
        leave=False,
    )


# ---- the loop -------------------------------------------------------------------------------


def run_rounds(
    queries: Sequence[Query],
    policy: Policy,
    *,
    engine: MeteredEngine,
    verifier: Verifier,
    spec: SamplingSpec,
    seed_for: Callable[[str, int], int],
    dedup: str = "text",
    state_dir: Path | None = None,
    verify_workers: int = 4,
    progress: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Sample, verify and count round by round until the policy asks for nothing more."""
    if state_dir is not None and (state_dir / LOG_FILE).exists():
        raise RuntimeError(
            f"{state_dir}: this part was begun without round barriers (deterministic: false); "
            "resume it that way, or remove the folder to start the part again"
        )
    ids = distinct_ids(queries)
    by_id = {q.id: q for q in queries}
    state = load_state(state_dir, ids)
    if state is None:
        state = LoopState(counters={q.id: Counter() for q in queries})
    else:
        log.info("resuming after round %d (%d samples so far)", state.rounds, len(state.samples))
    seen = seen_keys(state, ids, dedup)
    while True:
        asked = {qid: policy.wants(qid, state.counters[qid], state.rounds) for qid in ids}
        order = [qid for qid in ids if asked[qid] > 0]
        if not order:
            return state
        seeds = [seed_for(qid, state.rounds) for qid in order]
        params = [
            request_sampling(spec, asked[qid], seed) for qid, seed in zip(order, seeds, strict=True)
        ]
        outs = engine.generate([by_id[qid].prompt_text for qid in order], params)
        jobs = [
            (qid, seed, j, c)
            for qid, seed, cands in zip(order, seeds, outs, strict=True)
            for j, c in enumerate(cands)
        ]
        verdicts = verify_many(
            verifier, [(c.text, by_id[qid].reference) for qid, _, _, c in jobs], verify_workers
        )
        new: list[Sample] = []
        for qid, seed, cands in zip(order, seeds, outs, strict=True):
            mine, verdicts = verdicts[: len(cands)], verdicts[len(cands) :]
            new += count_samples(
                state.counters[qid], seen[qid], qid, state.rounds, seed, cands, mine, dedup
            )
        state.samples.extend(new)
        state.rounds += 1
        state.calls += 1
        for qid in order:
            policy.after(qid, state.counters[qid], state.rounds)
        if state_dir is not None:
            save_round(state_dir, state, new, ids)
        if progress is not None:
            progress(state)


def distinct_ids(queries: Sequence[Query]) -> list[str]:
    """The queries' ids in order; repeated ids are an error."""
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"queries must have distinct ids; repeated: {dupes[:5]}")
    return ids


def seen_keys(state: LoopState, ids: Sequence[str], dedup: str) -> dict[str, set[str]]:
    """Per query, the dedup keys of its distinct correct samples so far."""
    seen: dict[str, set[str]] = {qid: set() for qid in ids}
    for s in state.samples:
        if s.distinct_correct and dedup != "none":
            seen[s.query_id].add(dedup_key(s.text, dedup))
    return seen


def request_sampling(spec: SamplingSpec, n: int, seed: int) -> Sampling:
    """One query's request: `n` samples from `seed` with the loop's settings."""
    return Sampling(
        n=n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        stop=spec.stop,
        seed=seed,
    )


def count_samples(
    counter: Counter,
    seen: set[str],
    query_id: str,
    round_index: int,
    seed: int,
    completions: Sequence[Completion],
    verdicts: Sequence[Verdict],
    dedup: str,
) -> list[Sample]:
    """One request's completions as Samples, counted into the query's counter (a truncated
    answer never counts as correct; a correct one counts as distinct once per dedup key)."""
    new: list[Sample] = []
    for j, (c, v) in enumerate(zip(completions, verdicts, strict=True)):
        counter.trials += 1
        truncated = c.finish_reason == "length"
        ok = v.correct and not truncated
        distinct = False
        if ok:
            counter.raw_correct += 1
            key = None if dedup == "none" else dedup_key(c.text, dedup)
            if key is None or key not in seen:
                if key is not None:
                    seen.add(key)
                counter.correct += 1
                distinct = True
        new.append(
            Sample(
                query_id=query_id,
                round=round_index,
                index=j,
                seed=seed + j,  # vLLM seeds the j-th of n samples with seed + j
                text=c.text,
                finish_reason=c.finish_reason,
                output_tokens=c.output_tokens,
                correct=ok,
                extracted=v.extracted,
                reason="truncated" if truncated and v.correct else v.reason,
                distinct_correct=distinct,
            )
        )
    return new


def samples_by_query(state: LoopState) -> dict[str, list[Sample]]:
    """Samples grouped by query, in sampling order (round, then index)."""
    out: dict[str, list[Sample]] = {}
    for s in sorted(state.samples, key=lambda s: (s.round, s.index)):
        out.setdefault(s.query_id, []).append(s)
    return out


def counters_json(counters: Mapping[str, Counter]) -> str:
    """Counters as compact JSON (for logs and tests)."""
    return json.dumps({k: asdict(v) for k, v in counters.items()}, sort_keys=True)


def extra_of(row: Mapping[str, Any], exclude: Sequence[str]) -> dict[str, Any]:
    """An input row's own extra columns (level, tags...) to carry onto derived records."""
    return {k: v for k, v in row.items() if k not in exclude}
