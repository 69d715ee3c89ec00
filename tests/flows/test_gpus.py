"""`--gpus-per-worker`: which devices each local Dask worker process is given (CI has no
GPU: the visible devices come from CUDA_VISIBLE_DEVICES, which is what vLLM reads too)."""

from __future__ import annotations

import os

import pytest

from gristmill.flows.gpus import gpu_slices, visible_gpus
from gristmill.flows.options import add_runner_arguments, runner_from_args
from gristmill.flows.runners import RunnerSpec, make_task_runner, prepare_runner


def test_slices_are_consecutive_groups() -> None:
    assert gpu_slices(["0", "1", "2", "3"], 2, 2) == ["0,1", "2,3"]
    assert gpu_slices(["0", "1", "2", "3"], 3, 1) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="2 workers × 2 GPUs need 4 GPUs, but 3 are visible"):
        gpu_slices(["0", "1", "2"], 2, 2)


def test_visible_devices_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def test_the_option_needs_local_dask_workers() -> None:
    with pytest.raises(ValueError, match="needs runner 'dask' with local workers"):
        RunnerSpec(kind="threads", gpus_per_worker=1)
    with pytest.raises(ValueError, match="needs runner 'dask' with local workers"):
        RunnerSpec(kind="dask", address="tcp://x:8786", gpus_per_worker=1)
    import argparse

    parser = argparse.ArgumentParser()
    add_runner_arguments(parser)
    args = parser.parse_args(["--runner", "dask", "--workers", "2", "--gpus-per-worker", "1"])
    assert runner_from_args(args).gpus_per_worker == 1


def test_each_local_worker_gets_its_own_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    spec = RunnerSpec(kind="dask", workers=2, gpus_per_worker=1)
    with make_task_runner(spec) as runner:
        prepare_runner(runner, spec)
        client = runner.client  # type: ignore[attr-defined]
        seen = client.run(
            lambda dask_worker: (dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES"))
        )
    assert sorted(seen.values()) == [(0, "4"), (1, "7")]


def _devices_of(dask_worker: object) -> tuple[object, str | None]:
    """What a worker process sees: its name and its CUDA_VISIBLE_DEVICES."""
    return getattr(dask_worker, "name", None), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_too_few_devices_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    spec = RunnerSpec(kind="dask", workers=2, gpus_per_worker=1)
    with make_task_runner(spec) as runner, pytest.raises(ValueError, match="need 2 GPUs"):
        prepare_runner(runner, spec)
