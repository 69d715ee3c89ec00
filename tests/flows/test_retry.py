"""Retries: transient failures are retried with backoff, others fail their part at once.

The flow tests run the real Prefect flow (ephemeral API, threads runner) on an engine-free
recipe; a stage's `process` is wrapped in-process to fail on one part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from gristmill.engines.base import ServerError, TransientError, is_transient
from gristmill.filters.heuristics import Heuristics
from gristmill.flows.recipe import run_recipe
from gristmill.flows.retry import RetryPolicy
from gristmill.pipelines.stage import StageContext

RecipeFactory = Callable[..., Path]
FAST = RetryPolicy(retries=2, delay_s=0.05, jitter=0.0)
PROCESS = Heuristics.process


@pytest.mark.parametrize(
    "exc",
    [
        ServerError("HTTP 503", kind="generate", status=503),
        ServerError("HTTP 429", kind="generate", status=429),
        ServerError(
            "generate request to http://x/v1/completions still failing after 4 attempts; "
            "last error: HTTP 502",
            kind="generate",
            transient=True,
        ),
        ServerError(
            "generate request to http://x/v1/completions failed: ProxyError: 502",
            kind="generate",
            transient=True,
        ),
        TimeoutError("slow"),
        ConnectionResetError("reset"),
        TransientError("try later"),
    ],
)
def test_transient_errors(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ServerError("HTTP 400: prompt too long", kind="generate", status=400),
        ServerError("HTTP 501", kind="generate", status=501),
        ServerError("generate: response has no completion token counts", kind="generate"),
        ValueError("bad record"),
        KeyError("prompt"),
        RuntimeError("bug"),
    ],
)
def test_permanent_errors(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_transient_cause_is_found_through_the_chain() -> None:
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as inner:
            raise RuntimeError("stage magpie failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_backoff_is_exponential_and_validated() -> None:
    assert RetryPolicy(retries=3, delay_s=2.0).delays() == [2.0, 4.0, 8.0]
    opts = RetryPolicy(retries=0).task_options()
    assert opts["retries"] == 0 and opts["retry_delay_seconds"] == []
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)


class FailingPart:
    """Wrap Heuristics.process: raise `exc` on `part` for its first `times` calls."""

    def __init__(self, part: int, exc: BaseException, times: int) -> None:
        self.part, self.exc, self.times = part, exc, times
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, stage: Heuristics, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        with self._lock:
            self.calls.append(ctx.part_index)
            fail = ctx.part_index == self.part and self.calls.count(self.part) <= self.times
        if fail:
            raise self.exc
        return PROCESS(stage, batch, ctx)


@pytest.fixture
def patch_heuristics(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FailingPart]]:
    def install(part: int, exc: BaseException, times: int) -> FailingPart:
        wrapper = FailingPart(part, exc, times)

        def process(stage: Heuristics, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
            return wrapper(stage, batch, ctx)

        monkeypatch.setattr(Heuristics, "process", process)
        return wrapper

    yield install


def _parts(run: Path) -> dict[str, int]:
    (stage_dir,) = run.glob("01_heuristics-*")
    return {p.name: p.stat().st_mtime_ns for p in sorted(stage_dir.glob("part-*.parquet"))}


def test_transient_failure_is_retried_and_the_run_completes(
    tiny_recipe: RecipeFactory, tmp_path: Path, patch_heuristics: Callable[..., FailingPart]
) -> None:
    failing = patch_heuristics(1, ServerError("HTTP 503", kind="generate", status=503), 1)
    dataset = run_recipe(tiny_recipe(), tmp_path / "run", retry=FAST, show_progress=False)
    assert sorted(failing.calls) == [0, 1, 1, 2], "part 1 ran twice, the others once"
    assert pl.read_parquet(dataset / "data" / "*.parquet").height == 6


def test_permanent_failure_keeps_other_parts_and_rerun_redoes_only_it(
    tiny_recipe: RecipeFactory, tmp_path: Path, patch_heuristics: Callable[..., FailingPart]
) -> None:
    recipe, run = tiny_recipe(), tmp_path / "run"
    failing = patch_heuristics(1, ValueError("row 3: prompt is not a string"), 99)
    with pytest.raises(RuntimeError, match="1 of 3 parts failed") as info:
        run_recipe(recipe, run, retry=FAST, show_progress=False)
    assert isinstance(info.value.__cause__, ValueError), "the part's own error is chained"
    assert sorted(failing.calls) == [0, 1, 2], "a ValueError is not retried"
    kept = _parts(run)
    assert sorted(kept) == ["part-00000.parquet", "part-00002.parquet"]
    assert not list(run.glob("01_heuristics-*/_SUCCESS.json"))
    assert not (run / "dataset").exists()

    rerun = patch_heuristics(1, ValueError("unused"), 0)
    dataset = run_recipe(recipe, run, retry=FAST, show_progress=False)
    assert rerun.calls == [1], "the rerun redoes only the failed part"
    after = _parts(run)
    assert {k: after[k] for k in kept} == kept, "finished parts were not rewritten"
    assert "part-00001.parquet" in after

    again = patch_heuristics(1, ValueError("unused"), 0)
    assert run_recipe(recipe, run, retry=FAST, show_progress=False) == dataset
    assert again.calls == [], "a finished run is not recomputed"

    clean = run_recipe(recipe, tmp_path / "clean", retry=FAST, show_progress=False)
    resumed = pl.read_parquet(dataset / "data" / "*.parquet")
    assert resumed.equals(pl.read_parquet(clean / "data" / "*.parquet"))
