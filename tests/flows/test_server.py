"""A real Prefect server: `gristmill serve` deploys a scheduled recipe, runs come back.

Starts `prefect server start` on 127.0.0.1 with its own PREFECT_HOME, serves a tiny
engine-free recipe whose own `schedule:` fires every 20 s, triggers one run by hand, and reads
the runs, their task runs and the deployment's schedule back through the Prefect API. Both
processes are stopped by process id at the end, and nothing they started is left running.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

RecipeFactory = Callable[..., Path]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
INTERVAL_S = 20

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """SIGTERM the process (and its group) by pid, SIGKILL after 15 s; returns leftovers."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        break
    _, alive = psutil.wait_procs(family, timeout=5)
    for p in alive:  # a child that left the group: stop it by its own pid
        p.kill()
    return alive


@pytest.fixture(scope="module")
def prefect_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, str]]]:
    """A `prefect server start` of our own; yields its API URL and a client environment."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    server = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        log,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        leftovers = _stop(server)
        assert not leftovers, f"server processes left running: {leftovers}"


def _wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; serve log:\n{log.read_text()[-4000:]}")


def _task_runs(client: SyncPrefectClient, run: FlowRun) -> dict[str, StateType | None]:
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return {t.name: t.state_type for t in runs}


def test_serve_schedules_and_runs_a_recipe_on_a_real_server(
    prefect_server: tuple[str, dict[str, str]], tiny_recipe: RecipeFactory, tmp_path: Path
) -> None:
    url, env = prefect_server
    recipe = tiny_recipe(schedule={"interval": INTERVAL_S})
    runs_root = tmp_path / "runs"
    log = tmp_path / "serve.log"
    serve = _start(
        [sys.executable, "-m", "gristmill.cli", "serve", str(recipe), "--out-root",
         str(runs_root), "--limit", "2", "--retries", "1"],
        env,
        log,
    )  # fmt: skip
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: url}),
            get_client(sync_client=True) as client,
        ):

            def deployed() -> Any:
                assert serve.poll() is None, f"serve exited:\n{log.read_text()[-4000:]}"
                try:
                    return client.read_deployment_by_name("gristmill-recipe/tiny")
                except Exception:  # not registered yet
                    return None

            deployment = _wait_for("the deployment", deployed, 60, log)
            (schedule,) = deployment.schedules
            assert schedule.active
            assert schedule.schedule.interval == datetime.timedelta(seconds=INTERVAL_S)
            assert deployment.parameters["out_root"] == str(runs_root)
            assert deployment.parameters["retries"] == 1

            manual = run_deployment("gristmill-recipe/tiny", timeout=120, poll_interval=1)
            assert isinstance(manual, FlowRun)
            assert manual.state_type == StateType.COMPLETED, manual.state
            assert not manual.auto_scheduled
            tasks = _task_runs(client, manual)
            parts = {f"01-heuristics-part-{k:05d}" for k in range(3)}
            assert parts | {"02-random"} <= set(tasks), sorted(tasks)
            assert set(tasks.values()) == {StateType.COMPLETED}, tasks

            ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))

            def scheduled_run_done() -> FlowRun | None:
                runs = client.read_flow_runs(deployment_filter=ours)
                done = [r for r in runs if r.auto_scheduled and r.state_type == StateType.COMPLETED]
                return min(done, key=lambda r: r.expected_start_time) if done else None

            scheduled: FlowRun = _wait_for("a scheduled run", scheduled_run_done, 90, log)
            assert set(_task_runs(client, scheduled).values()) == {StateType.COMPLETED}
            upcoming = client.read_flow_runs(deployment_filter=ours)
            assert any(r.state_type == StateType.SCHEDULED for r in upcoming), "next ticks queued"
            print(f"\nscheduled run from the API: {scheduled.name} id={scheduled.id}")
            print(f"  expected_start_time={scheduled.expected_start_time}")
            print(f"  start_time={scheduled.start_time} end_time={scheduled.end_time}")
            print(f"  state={scheduled.state_type} auto_scheduled={scheduled.auto_scheduled}")
            print(f"  task runs={_task_runs(client, scheduled)}")
    finally:
        leftovers = _stop(serve)
        assert not leftovers, f"serve processes left running: {leftovers}"

    folders = {p.name: p for p in (runs_root / "tiny-alpaca").iterdir()}
    for run in (manual, scheduled):
        (name,) = [n for n in folders if n.endswith(str(run.id)[:8])]
        assert (folders[name] / "dataset" / "data").is_dir(), "each run wrote its own dataset"
    stamp = scheduled.expected_start_time
    assert stamp is not None
    utc = stamp.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    assert f"{utc}-{str(scheduled.id)[:8]}" in folders, "folder named after the scheduled time"


def test_prefect_yaml_deploys_every_recipe_to_a_process_pool(
    prefect_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """`prefect deploy --all` reads prefect.yaml as written; the API shows what it made."""
    url, env = prefect_server
    expected = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for cmd in (
        ["work-pool", "create", "gristmill-process", "--type", "process"],
        ["--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run(
            [str(BIN / "prefect"), *cmd], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        for spec in expected:
            made = client.read_deployment_by_name(f"gristmill-recipe/{spec['name']}")
            assert made.work_pool_name == "gristmill-process"
            assert made.entrypoint == "gristmill/flows/recipe.py:recipe_flow"
            assert made.parameters["recipe_path"] == spec["parameters"]["recipe_path"]
            (schedule,) = made.schedules
            want = spec["schedules"][0]
            if "cron" in want:
                assert schedule.schedule.cron == want["cron"]
            else:
                assert schedule.schedule.interval == datetime.timedelta(seconds=want["interval"])
            assert made.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ]
        pool = client.read_work_pool("gristmill-process")
        assert pool.type == "process"
