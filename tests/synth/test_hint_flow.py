"""START's hint-infer loop without round barriers, on the scripted engine and the real
sandbox: the same requests and rows as the round loop, requests made while another
trajectory's cell runs, and resume from the trajectory log."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from test_hint_infer import ScriptedEngine, context, problems_frame, solver, thinker

from gristmill.engines.base import Completion, Sampling
from gristmill.synth.hint_flow import LOG_FILE
from gristmill.synth.hint_infer import HintInfer, HintInferConfig


@dataclass
class SubmittingEngine(ScriptedEngine):
    """The scripted START model with `submit`: each request answers on its own thread, and
    every submit is timed, to see what was asked while cells ran."""

    delay: float = field(default=0.0, kw_only=True)
    submitted: list[tuple[float, str, int]] = field(default_factory=list, kw_only=True)
    fail_on_submit: int | None = field(default=None, kw_only=True)
    _lock: threading.Lock = field(default_factory=threading.Lock, kw_only=True)

    def submit(self, prompt: str, sampling: Sampling) -> Future[list[Completion]]:
        with self._lock:
            if self.fail_on_submit is not None and len(self.submitted) == self.fail_on_submit:
                raise RuntimeError("engine died (scripted)")
            self.submitted.append((time.monotonic(), prompt, sampling.seed or 0))
        future: Future[list[Completion]] = Future()

        def answer() -> None:
            time.sleep(self.delay)
            future.set_result(self.generate([prompt], sampling)[0])

        threading.Thread(target=answer, daemon=True).start()
        return future


CFG = dict(prefill_code_fence=True, samples=2)


def _run(
    frame: pl.DataFrame, tmp_path: Path, engine: ScriptedEngine, *, continuous: bool, **cfg: object
) -> pl.DataFrame:
    ctx = context(tmp_path, engine)
    ctx.continuous = continuous
    return HintInfer(HintInferConfig(**{**CFG, **cfg})).process(frame, ctx).sort("id")


def _requests(engine: ScriptedEngine) -> list[tuple[str, int]]:
    return sorted((p, s.seed or 0) for call in engine.calls for p, s in call)


def _same(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    drop = ["created_at", "tool_calls"]  # tool calls carry the cells' measured seconds
    return a.drop(drop, strict=False).equals(b.drop(drop, strict=False))


@pytest.mark.parametrize("script", [solver, thinker], ids=["stop", "trigger-and-stop"])
def test_same_requests_and_rows_as_the_round_loop(tmp_path: Path, script: object) -> None:
    frame = problems_frame([(2, 3), (7, 8), (10, 20)])
    rounds = ScriptedEngine(script)  # type: ignore[arg-type]
    barrier = _run(frame, tmp_path / "rounds", rounds, continuous=False)
    flowing = SubmittingEngine(script)  # type: ignore[arg-type]
    flow = _run(frame, tmp_path / "flow", flowing, continuous=True)
    assert _requests(flowing) == _requests(rounds)
    assert _same(flow, barrier)
    assert flow.filter(pl.col("drop_reason").is_null()).height > 0


def test_requests_go_out_while_a_cell_runs(tmp_path: Path) -> None:
    """A slow cell: other trajectories' requests are submitted while it runs."""

    def slow_solver(user: str, so_far: str) -> str:
        if so_far.endswith("```python\n") and "7 + 8" in user:
            return "import time\ntime.sleep(1.0)\nprint(15)\n```\n"
        return solver(user, so_far)

    engine = SubmittingEngine(slow_solver)
    frame = problems_frame([(2, 3), (7, 8)])
    _run(frame, tmp_path, engine, continuous=True, samples=1, baseline=False)
    slow = [t for t, p, _ in engine.submitted if "7 + 8" in p]
    other = [t for t, p, _ in engine.submitted if "2 + 3" in p]
    # 7 + 8's request after its cell waited the cell's 1 s; 2 + 3 went on meanwhile
    gaps = [(a, b) for a, b in itertools.pairwise(slow) if b - a >= 0.9]
    assert len(gaps) == 1, slow
    start, end = gaps[0]
    assert any(start < t < end for t in other), (slow, other)


def test_killed_mid_part_resumes_without_asking_a_request_twice(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3), (7, 8), (10, 20)])
    clean_engine = SubmittingEngine(thinker)
    clean = _run(frame, tmp_path / "clean", clean_engine, continuous=True)
    dying = SubmittingEngine(thinker, fail_on_submit=16)
    with pytest.raises(RuntimeError, match="engine died"):
        _run(frame, tmp_path / "run", dying, continuous=True)
    time.sleep(0.2)
    assert (tmp_path / "run" / "state" / "part-00000" / LOG_FILE).exists()
    again = SubmittingEngine(thinker)
    resumed = _run(frame, tmp_path / "run", again, continuous=True)
    assert _same(resumed, clean)
    # the saved steps were not asked again: the resumed run asked less than a clean one,
    # and together the two runs asked exactly the clean run's requests
    assert 0 < len(_requests(again)) < len(_requests(clean_engine))
    assert set(_requests(dying) + _requests(again)) == set(_requests(clean_engine))


def test_a_part_begun_in_rounds_goes_on_without_barriers(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3), (7, 8)])
    clean = _run(frame, tmp_path / "clean", ScriptedEngine(thinker), continuous=False)
    first = ScriptedEngine(thinker, fail_on_call=2)
    with pytest.raises(RuntimeError):
        _run(frame, tmp_path / "run", first, continuous=False)
    again = SubmittingEngine(thinker)
    resumed = _run(frame, tmp_path / "run", again, continuous=True)
    assert _same(resumed, clean)
    assert not set(_requests(again)) & set(_requests(first))


def test_a_part_begun_without_barriers_refuses_rounds(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3), (7, 8)])
    with pytest.raises(RuntimeError):
        _run(frame, tmp_path, SubmittingEngine(thinker, fail_on_submit=3), continuous=True)
    time.sleep(0.2)
    with pytest.raises(RuntimeError, match="begun without round barriers"):
        _run(frame, tmp_path, ScriptedEngine(thinker), continuous=False)
