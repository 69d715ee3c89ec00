"""START's hint-infer loop without round barriers: each trajectory moves on by itself.

`hint_infer.run_hint_loop` (deterministic mode) sends every live trajectory's next request
as one `generate` call, then runs the round's Python cells, then starts the next round.
Here each trajectory's request is submitted on its own (`MeteredEngine.submit`); when it is
back, the trajectory advances (`hint_infer._advance`: a hint, a finished answer, or a code
cell), its cell goes to the sandbox pool while every other trajectory keeps generating, and
its next request is submitted as soon as the cell's output is appended. A trajectory's k-th
request has the seed of the barrier loop's round k, so both modes ask the same requests.

A trajectory is saved whenever it is consistent (its step done, its cell's output
appended), as one line of the part's `hint_flow.jsonl`; a resumed run takes each
trajectory's last line, so finished trajectories are never generated again and a live one
resumes at its next request (a cell cut off by a crash runs again).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from gristmill.engines.base import Completion, Sampling
from gristmill.pipelines.stage import MeteredEngine
from gristmill.sandbox import SandboxPool
from gristmill.synth.hint_infer import (
    MIN_ROUND_TOKENS,
    Baseline,
    LoopSettings,
    LoopState,
    Problem,
    SeedFor,
    ToolCall,
    Trajectory,
    _advance,
    _Cell,
    cell_output,
    load_loop_state,
    new_state,
    next_request,
    problem_ids,
    run_hint_loop,
)

log = logging.getLogger("gristmill.hint_infer")

LOG_FILE = "hint_flow.jsonl"


@dataclass(frozen=True)
class _Generating:
    """A trajectory's request in flight, and which budget would have cut it short."""

    trajectory: Trajectory
    bound: str


@dataclass(frozen=True)
class _Running:
    """A trajectory's code cell in the sandbox."""

    cell: _Cell


@dataclass(frozen=True)
class _Greedy:
    """A problem's greedy baseline request."""

    problem: Problem


def run_hint_flow(
    problems: Sequence[Problem],
    *,
    engine: MeteredEngine,
    settings: LoopSettings,
    pool: SandboxPool,
    seed_for: SeedFor,
    state_dir: Path | None = None,
    progress: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Run the hint-infer loop trajectory by trajectory until every one has finished."""
    s = settings
    ids, by_id = problem_ids(problems)
    state = _load(state_dir, ids, s.samples) or new_state(problems, s.samples)
    out = _open(state_dir, ids, state)
    pending: dict[Future[Any], _Generating | _Running | _Greedy] = {}

    def ask(t: Trajectory) -> None:
        """Submit the trajectory's next request, or finish it when a budget is spent."""
        if not t.live:
            return
        if t.rounds >= s.max_rounds:
            t.finish = "max_rounds"
            return
        request = next_request(s, t, by_id[t.query_id], engine.count_tokens, seed_for)
        if request is not None:
            future = engine.submit(request.prompt, request.sampling)
            pending[future] = _Generating(t, request.bound)

    def commit(t: Trajectory) -> None:
        """The trajectory is consistent again: save it, report, and ask its next request."""
        state.rounds = max(state.rounds, t.rounds)
        if out is not None:
            _append(out, {"trajectory": asdict(t)})
        if progress is not None:
            progress(state)
        ask(t)

    try:
        for t in state.trajectories:
            ask(t)
        for p in problems if s.baseline else ():
            if p.id not in state.baselines:
                _greedy(s, p, engine, seed_for, pending, state)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                match job:
                    case _Generating(trajectory=t, bound=bound):
                        c: Completion = future.result()[0]
                        state.calls += 1
                        cell = _advance(s, t, c, bound, t.rounds, seed_for, engine.count_tokens)
                        if cell is None:
                            commit(t)
                        else:
                            pending[_submit_cell(cell, by_id, pool)] = _Running(cell)
                    case _Running(cell=cell):
                        _append_output(cell, future.result(), s.max_output_chars)
                        commit(cell.trajectory)
                    case _Greedy(problem=p):
                        c = future.result()[0]
                        state.calls += 1
                        base = Baseline(
                            text=c.text,
                            finish_reason=c.finish_reason,
                            output_tokens=c.output_tokens,
                        )
                        state.baselines[p.id] = base
                        if out is not None:
                            _append(out, {"baseline": p.id, **asdict(base)})
        for t in state.trajectories:  # finished at submission time, never committed since
            if out is not None and t.finish is not None:
                _append(out, {"trajectory": asdict(t)})
    finally:
        if out is not None:
            out.close()
    return state


def run_hint_steps(
    problems: Sequence[Problem], *, engine: MeteredEngine, **options: Any
) -> LoopState:
    """`run_hint_flow` where the engine takes requests one by one, else the round loop."""
    if engine.continuous:
        return run_hint_flow(problems, engine=engine, **options)
    if options.get("state_dir") is not None and (options["state_dir"] / LOG_FILE).exists():
        raise RuntimeError(
            f"{options['state_dir']}: this part was begun without round barriers "
            "(deterministic: false); resume it that way, or remove the folder"
        )
    return run_hint_loop(problems, engine=engine, **options)


def _greedy(
    s: LoopSettings,
    p: Problem,
    engine: MeteredEngine,
    seed_for: SeedFor,
    pending: dict[Future[Any], _Generating | _Running | _Greedy],
    state: LoopState,
) -> None:
    ctx_left = s.context_tokens - engine.count_tokens(p.prompt_text)
    if ctx_left < MIN_ROUND_TOKENS:
        state.baselines[p.id] = Baseline(text="", finish_reason="context", output_tokens=0)
        return
    sampling = Sampling(
        temperature=0.0, max_tokens=min(ctx_left, s.max_tokens), seed=seed_for(p.id, "greedy")
    )
    pending[engine.submit(p.prompt_text, sampling)] = _Greedy(p)


def _submit_cell(cell: _Cell, problems: dict[str, Problem], pool: SandboxPool) -> Future[Any]:
    """Run the cell after the problem's prelude and the trajectory's earlier good cells."""
    t = cell.trajectory
    earlier = [c.code for c in t.tool_calls if c.status == "ok"]
    return pool.submit(cell.code, prelude=[*problems[t.query_id].prelude, *earlier])


def _append_output(cell: _Cell, result: Any, limit: int) -> None:
    """The cell's ```output block on its trajectory, and the tool call it records."""
    t = cell.trajectory
    output = cell_output(result, limit)
    position = len(t.text)
    t.text += f"```output\n{output}\n```\n" if output else "```output\n```\n"
    t.tool_calls.append(
        ToolCall(
            code=cell.code,
            status=result.status,
            output=output,
            seconds=round(result.seconds, 3),
            position=position,
            round=t.rounds - 1,  # the request that wrote the cell
        )
    )


def _load(state_dir: Path | None, ids: Sequence[str], samples: int) -> LoopState | None:
    """A part's saved trajectories: the log's last line of each (a fresh one for those that
    saved no step yet), or a round-mode state."""
    if state_dir is None:
        return None
    path = state_dir / LOG_FILE
    if not path.exists():
        rounds = load_loop_state(state_dir, ids)  # begun in deterministic mode
        if rounds is not None:
            log.info("hint_infer: going on from round %d without barriers", rounds.rounds)
        return rounds
    lines = path.read_text(encoding="utf-8").splitlines()
    if json.loads(lines[0]).get("query_ids") != list(ids):
        raise RuntimeError(
            f"{state_dir}: saved hint_infer state is for other problems; remove the folder "
            "to start this part again"
        )
    latest: dict[tuple[str, int], Trajectory] = {}
    baselines: dict[str, Baseline] = {}
    for line in lines[1:]:
        entry = json.loads(line)
        if "trajectory" in entry:
            t = Trajectory.from_json(entry["trajectory"])
            latest[(t.query_id, t.sample)] = t
        else:
            pid = entry.pop("baseline")
            baselines[pid] = Baseline(**entry)
    trajectories = [
        latest.get((qid, j)) or Trajectory(query_id=qid, sample=j)
        for qid in ids
        for j in range(samples)
    ]
    state = LoopState(
        rounds=max((t.rounds for t in trajectories), default=0),
        calls=sum(t.rounds for t in trajectories) + len(baselines),
        trajectories=trajectories,
        baselines=baselines,
    )
    log.info("hint_infer: resuming %d trajectories", len(trajectories))
    return state


def _open(state_dir: Path | None, ids: Sequence[str], state: LoopState) -> TextIO | None:
    """The part's trajectory log, opened for appending. A new log starts with its header and
    every trajectory as it is now (a round-mode state carried over); a line a crash cut off
    is dropped first."""
    if state_dir is None:
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOG_FILE
    if not path.exists():
        lines = [json.dumps({"query_ids": list(ids)})]
        lines += [json.dumps({"trajectory": asdict(t)}) for t in state.trajectories if t.rounds]
        lines += [json.dumps({"baseline": k, **asdict(b)}) for k, b in state.baselines.items()]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(path)
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return path.open("a", encoding="utf-8")


def _append(out: TextIO, entry: dict[str, Any]) -> None:
    out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    out.flush()
