"""Task-runner choice, and the command-line options that pick it."""

from __future__ import annotations

import importlib.util

import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from gristmill.cli import build_parser
from gristmill.flows.options import retry_from_args, runner_from_args
from gristmill.flows.retry import RetryPolicy
from gristmill.flows.runners import RunnerSpec, local_cluster, make_task_runner


def test_threads_is_the_default_and_runs_in_the_flow_process() -> None:
    spec = RunnerSpec()
    runner = make_task_runner(spec)
    assert isinstance(runner, ThreadPoolTaskRunner) and spec.in_flow_process
    assert make_task_runner(RunnerSpec(workers=3))._max_workers == 3  # type: ignore[attr-defined]


def test_dask_local_cluster_and_existing_scheduler() -> None:
    local = make_task_runner(
        RunnerSpec(kind="dask", workers=2, threads_per_worker=3), api_url="http://h:1/api"
    )
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_class is local_cluster
    assert local.cluster_kwargs == {
        "n_workers": 2,
        "threads_per_worker": 3,
        "processes": True,
        "dashboard_address": None,
        "env": {"PREFECT_API_URL": "http://h:1/api"},
    }
    remote = make_task_runner(RunnerSpec(kind="dask", address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    assert not RunnerSpec(kind="dask").in_flow_process


@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is not None, reason="ray installed")
def test_ray_without_prefect_ray_says_what_to_install() -> None:
    with pytest.raises(ImportError, match="pip install prefect-ray"):
        make_task_runner(RunnerSpec(kind="ray"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "spark"}, "runner must be one of"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"threads_per_worker": 0}, "threads per worker"),
        ({"address": "tcp://x:1"}, "needs runner 'dask' or 'ray'"),
    ],
)
def test_bad_runner_specs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunnerSpec(**kwargs)  # type: ignore[arg-type]


def test_run_and_serve_take_the_same_runner_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "run",
            "r.yaml",
            "--out",
            "o",
            "--runner",
            "dask",
            "--workers",
            "2",
            "--threads-per-worker",
            "2",
            "--dask-address",
            "tcp://s:8786",
            "--retries",
            "5",
            "--retry-delay",
            "0.5",
        ]
    )
    assert runner_from_args(args) == RunnerSpec(
        kind="dask", workers=2, threads_per_worker=2, address="tcp://s:8786"
    )
    assert retry_from_args(args) == RetryPolicy(retries=5, delay_s=0.5)
    serve = parser.parse_args(["serve", "a.yaml", "b.yaml", "--cron", "0 3 * * *"])
    assert serve.recipes == ["a.yaml", "b.yaml"] and serve.cron == "0 3 * * *"
    assert serve.out_root == "runs" and serve.interval is None
    assert runner_from_args(serve) == RunnerSpec() and retry_from_args(serve) == RetryPolicy()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "a.yaml", "--cron", "* * * * *", "--interval", "60"])
