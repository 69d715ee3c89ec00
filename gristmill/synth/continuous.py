"""The verified-sampling loop without round barriers: each query moves on by itself.

`run_continuous` asks the same per-query policy as `sampling.run_rounds`, but submits each
query's request on its own (`MeteredEngine.submit`) and, as soon as that request is back,
verifies its samples, counts them and submits the query's next request, while every other
query's request keeps generating in the engine's running batch. A query's k-th request has
the same size and seed as its k-th round in the barrier loop, so both modes ask the engine
for the same (prompt, seed) pairs; which texts come back can differ only through batch
composition.

Every counted request is appended, with the query's counters after it, to the part's
`requests.jsonl` (flushed per line). A resumed run replays that log: finished queries are
not sampled again and an unfinished query resumes at its next request. A line cut off by a
crash is the last one and is dropped; its request is simply asked again, with its seed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from gristmill.engines.base import Completion
from gristmill.pipelines.stage import MeteredEngine
from gristmill.synth.sampling import (
    LOG_FILE,
    STATE_FILE,
    Counter,
    LoopState,
    Policy,
    Query,
    Sample,
    SamplingSpec,
    count_samples,
    distinct_ids,
    load_state,
    request_sampling,
    run_rounds,
    seen_keys,
)
from gristmill.verify.base import Verifier, verify_many

log = logging.getLogger("gristmill.sampling")


def run_continuous(
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
    """Sample, verify and count query by query, each as soon as its last request is back,
    until the policy asks nothing more of any query."""
    ids = distinct_ids(queries)
    by_id = {q.id: q for q in queries}
    out = _open_log(state_dir, ids)
    state, requests = load_log(state_dir, ids)
    seen = seen_keys(state, ids, dedup)
    pending: dict[Future[list[Completion]], tuple[str, int]] = {}

    def ask(qid: str) -> None:
        n = policy.wants(qid, state.counters[qid], requests[qid])
        if n > 0:
            seed = seed_for(qid, requests[qid])
            future = engine.submit(by_id[qid].prompt_text, request_sampling(spec, n, seed))
            pending[future] = (qid, seed)

    try:
        for qid in ids:
            ask(qid)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                qid, seed = pending.pop(future)
                completions = future.result()
                pairs = [(c.text, by_id[qid].reference) for c in completions]
                verdicts = verify_many(verifier, pairs, verify_workers)
                counter = state.counters[qid]
                new = count_samples(
                    counter, seen[qid], qid, requests[qid], seed, completions, verdicts, dedup
                )
                requests[qid] += 1
                policy.after(qid, counter, requests[qid])
                state.samples.extend(new)
                state.calls += 1
                state.rounds = max(state.rounds, requests[qid])
                if out is not None:
                    _append(out, qid, counter, new)
                if progress is not None:
                    progress(state)
                ask(qid)
    finally:
        if out is not None:
            out.close()
    return state


def run_loop(
    queries: Sequence[Query], policy: Policy, *, engine: MeteredEngine, **options: Any
) -> LoopState:
    """`run_continuous` where the engine takes requests one by one, else `run_rounds`."""
    if engine.continuous:
        return run_continuous(queries, policy, engine=engine, **options)
    return run_rounds(queries, policy, engine=engine, **options)


def load_log(state_dir: Path | None, ids: Sequence[str]) -> tuple[LoopState, dict[str, int]]:
    """The state a part's request log holds, and how many requests of each query it
    counted; empty when there is none."""
    requests = dict.fromkeys(ids, 0)
    state = LoopState(counters={qid: Counter() for qid in ids})
    path = None if state_dir is None else state_dir / LOG_FILE
    if path is None or not path.exists():
        return state, requests
    lines = path.read_text(encoding="utf-8").splitlines()
    if json.loads(lines[0]).get("query_ids") != list(ids):
        raise RuntimeError(
            f"{state_dir}: saved sampling state is for other queries; remove the folder to "
            "start this part again"
        )
    for line in lines[1:]:
        entry = json.loads(line)
        qid = entry["query_id"]
        state.counters[qid] = Counter(**entry["counter"])
        state.samples.extend(Sample(**s) for s in entry["samples"])
        requests[qid] += 1
        state.calls += 1
    state.rounds = max(requests.values(), default=0)
    if state.calls:
        log.info("resuming after %d requests (%d samples so far)", state.calls, len(state.samples))
    return state, requests


def _open_log(state_dir: Path | None, ids: Sequence[str]) -> TextIO | None:
    """The part's request log, opened for appending (created with its header line)."""
    if state_dir is None:
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOG_FILE
    if not path.exists():
        if (state_dir / STATE_FILE).exists():
            _convert_rounds(state_dir, ids)
        else:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"query_ids": list(ids)}) + "\n", encoding="utf-8")
            tmp.replace(path)
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # drop a line a crash cut off, before appending
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return path.open("a", encoding="utf-8")


def _convert_rounds(state_dir: Path, ids: Sequence[str]) -> None:
    """Rewrite a deterministic-mode part's rounds as a request log (then continue it)."""
    rounds = load_state(state_dir, ids)
    assert rounds is not None
    by_query: dict[str, list[Sample]] = {}
    for s in rounds.samples:
        by_query.setdefault(s.query_id, []).append(s)
    lines = [json.dumps({"query_ids": list(ids)})]
    for qid in ids:  # per query, its rounds; counters are rebuilt by replaying in order
        mine = sorted(by_query.get(qid, []), key=lambda s: (s.round, s.index))
        for r in sorted({s.round for s in mine}):
            batch = [s for s in mine if s.round == r]
            last = r == max(s.round for s in mine)
            counter = rounds.counters[qid] if last else _counter_upto(mine, r, rounds, qid)
            lines.append(_line(qid, counter, batch))
    tmp = state_dir / (LOG_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(state_dir / LOG_FILE)


def _counter_upto(samples: list[Sample], r: int, rounds: LoopState, qid: str) -> Counter:
    """A query's counters after its round `r` (targets as they are now)."""
    upto = [s for s in samples if s.round <= r]
    final = rounds.counters[qid]
    return Counter(
        trials=len(upto),
        correct=sum(s.distinct_correct for s in upto),
        raw_correct=sum(s.correct for s in upto),
        target=final.target,
        fail_rate=final.fail_rate,
    )


def _line(qid: str, counter: Counter, samples: Sequence[Sample]) -> str:
    entry: dict[str, Any] = {
        "query_id": qid,
        "counter": asdict(counter),
        "samples": [asdict(s) for s in samples],
    }
    return json.dumps(entry, ensure_ascii=False)


def _append(out: TextIO, qid: str, counter: Counter, samples: Sequence[Sample]) -> None:
    out.write(_line(qid, counter, samples) + "\n")
    out.flush()
