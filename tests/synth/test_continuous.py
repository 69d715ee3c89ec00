"""Verified sampling without round barriers, on a scripted engine that takes requests one by
one and answers them out of order: the same requests and rows as the round loop, queries
moving on by themselves, and resume from the per-request log (the real engine is in
tests/engines/test_vllm_continuous.py)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from test_dart import SKILL, ScriptedEngine, ctx, queries

from gristmill.engines.base import Completion, Sampling
from gristmill.pipelines.stage import Stage, StageContext
from gristmill.synth.dart import Dart, DartConfig
from gristmill.synth.rejection import RejectionConfig, RejectionSample
from gristmill.synth.sampling import LOG_FILE, STATE_FILE


@dataclass(kw_only=True)
class SubmittingEngine(ScriptedEngine):
    """The scripted solver with `submit`: each request answers on its own thread after its
    question's latency, so results come back out of order, as from a continuous batch."""

    latency: dict[str, float] = field(default_factory=dict)
    fail_on_submit: int | None = None
    events: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, prompt: str, sampling: Sampling) -> Future[list[Completion]]:
        q = next(k for k in SKILL if k in prompt)
        assert sampling.seed is not None
        with self._lock:
            submits = sum(1 for e in self.events if e[0] == "submit")
            if self.fail_on_submit is not None and submits == self.fail_on_submit:
                raise RuntimeError("engine died (scripted)")
            self.events.append(("submit", q, sampling.seed))
        future: Future[list[Completion]] = Future()

        def answer() -> None:
            time.sleep(self.latency.get(q, 0.0))
            result = self.generate([prompt], sampling)[0]
            with self._lock:
                self.events.append(("done", q, sampling.seed))
            future.set_result(result)

        threading.Thread(target=answer, daemon=True).start()
        return future

    def requests(self) -> list[tuple[str, int]]:
        return [(q, seed) for kind, q, seed in self.events if kind == "submit"]


def _run(stage: Stage, tmp_path: Path, engine: ScriptedEngine, *, continuous: bool) -> pl.DataFrame:
    context: StageContext = ctx(tmp_path, engine)
    context.continuous = continuous
    return stage.process(queries(), context).sort("id")


def _round_requests(engine: ScriptedEngine) -> list[tuple[str, int]]:
    return [
        (next(k for k in SKILL if k in p), s.seed or 0) for call in engine.calls for p, s in call
    ]


STAGES = {
    "uniform": lambda: Dart(
        DartConfig(strategy="uniform", k_u=3, samples_per_round=2, max_trials=8)
    ),
    "prop2diff": lambda: Dart(
        DartConfig(strategy="prop2diff", k_p=4, probe_samples=4, samples_per_round=2, max_trials=12)
    ),
    "rejection": lambda: RejectionSample(RejectionConfig(k=3, rounds=3, max_correct=2)),
}


@pytest.mark.parametrize("name", list(STAGES))
def test_same_requests_and_rows_as_the_round_loop(tmp_path: Path, name: str) -> None:
    rounds = ScriptedEngine()
    barrier = _run(STAGES[name](), tmp_path / "rounds", rounds, continuous=False)
    engine = SubmittingEngine(latency={"q-easy": 0.0, "q-mid": 0.01, "q-hard": 0.03})
    flowing = _run(STAGES[name](), tmp_path / "flow", engine, continuous=True)
    assert sorted(engine.requests()) == sorted(_round_requests(rounds))
    assert len(engine.requests()) == len(set(engine.requests()))  # no request asked twice
    assert flowing.drop("created_at", strict=False).equals(barrier.drop("created_at", strict=False))


def test_a_query_moves_on_while_a_slow_one_is_still_generating(tmp_path: Path) -> None:
    engine = SubmittingEngine(latency={"q-never": 0.5})
    stage = Dart(DartConfig(strategy="uniform", k_u=3, samples_per_round=1, max_trials=4))
    _run(stage, tmp_path, engine, continuous=True)
    first_slow_done = engine.events.index(("done", "q-never", _first_seed(engine, "q-never")))
    easy_submits = [i for i, e in enumerate(engine.events) if e[:2] == ("submit", "q-easy")]
    # all three of q-easy's requests went out before q-never's first one was back
    assert len(easy_submits) == 3
    assert easy_submits[-1] < first_slow_done


def _first_seed(engine: SubmittingEngine, q: str) -> int:
    return next(seed for kind, name, seed in engine.events if kind == "submit" and name == q)


def test_killed_mid_part_resumes_without_asking_a_request_twice(tmp_path: Path) -> None:
    clean_engine = SubmittingEngine()
    clean = _run(STAGES["prop2diff"](), tmp_path / "clean", clean_engine, continuous=True)
    dying = SubmittingEngine(fail_on_submit=7)
    with pytest.raises(RuntimeError, match="engine died"):
        _run(STAGES["prop2diff"](), tmp_path / "run", dying, continuous=True)
    time.sleep(0.1)  # let the requests in flight at the crash finish (their results are lost)
    log = tmp_path / "run" / "state" / "part-00000" / LOG_FILE
    before = _counted(log)
    counted = len(before)
    assert 0 < counted < 7
    again = SubmittingEngine()
    resumed = _run(STAGES["prop2diff"](), tmp_path / "run", again, continuous=True)
    assert resumed.drop("created_at", strict=False).equals(clean.drop("created_at", strict=False))
    # only the requests the log had not counted were asked again
    assert len(again.requests()) == len(clean_engine.requests()) - counted
    assert not set(again.requests()) & set(before)
    assert sorted(again.requests() + before) == sorted(clean_engine.requests())


def _counted(log: Path) -> list[tuple[str, int]]:
    """(question, request seed) of every request the log counted."""
    names = dict(zip(queries()["id"], SKILL, strict=True))
    entries = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return [(names[e["query_id"]], e["samples"][0]["seed"]) for e in entries]


def test_a_line_cut_off_by_a_crash_is_asked_again(tmp_path: Path) -> None:
    clean = _run(STAGES["uniform"](), tmp_path / "clean", SubmittingEngine(), continuous=True)
    dying = SubmittingEngine(fail_on_submit=6)
    with pytest.raises(RuntimeError):
        _run(STAGES["uniform"](), tmp_path / "run", dying, continuous=True)
    time.sleep(0.1)
    log = tmp_path / "run" / "state" / "part-00000" / LOG_FILE
    text = log.read_text()
    log.write_text(text[: len(text) - 20])  # the last line half written
    resumed = _run(STAGES["uniform"](), tmp_path / "run", SubmittingEngine(), continuous=True)
    assert resumed.drop("created_at", strict=False).equals(clean.drop("created_at", strict=False))


def test_a_part_begun_in_rounds_goes_on_without_barriers(tmp_path: Path) -> None:
    clean_engine = ScriptedEngine()
    clean = _run(STAGES["prop2diff"](), tmp_path / "clean", clean_engine, continuous=False)
    first = ScriptedEngine(fail_on_call=2)  # two rounds saved, the third dies
    with pytest.raises(RuntimeError):
        _run(STAGES["prop2diff"](), tmp_path / "run", first, continuous=False)
    assert (tmp_path / "run" / "state" / "part-00000" / STATE_FILE).exists()
    engine = SubmittingEngine()
    resumed = _run(STAGES["prop2diff"](), tmp_path / "run", engine, continuous=True)
    assert resumed.drop("created_at", strict=False).equals(clean.drop("created_at", strict=False))
    done = _round_requests(first)
    assert not set(engine.requests()) & set(done)
    assert sorted(engine.requests() + done) == sorted(_round_requests(clean_engine))


def test_a_part_begun_without_barriers_refuses_to_resume_in_rounds(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _run(STAGES["uniform"](), tmp_path, SubmittingEngine(fail_on_submit=5), continuous=True)
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="begun without round barriers"):
        _run(STAGES["uniform"](), tmp_path, ScriptedEngine(), continuous=False)
