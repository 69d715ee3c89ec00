"""`kill -9` of a `gristmill run` leaves no process behind: not Prefect's temporary server
(uvicorn), not multiprocessing's helpers, not the run's watcher itself. The same for a run
started from Python (`recipe.run`), whose process is the caller's.

The run goes through the real command line in its own session, with no PREFECT_API_URL so
Prefect starts its temporary server; an engine-free recipe with a stage that naps per part
is killed mid-stage, the run process only, as the OOM killer would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

NAP_MODULE = '''
import time

import polars as pl

import gristmill as gm


class Nap(gm.Map):
    """Sleeps `seconds` per part, so that a test can kill the run mid-stage."""

    seconds: float = 0.0

    def process(self, batch: pl.DataFrame, ctx: gm.StageContext) -> pl.DataFrame:
        time.sleep(self.seconds)
        return batch
'''


def _start_run(
    recipe: Path, tmp_path: Path, log: BinaryIO, *, python: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    """`gristmill run` (or, with `python`, `gm.Recipe.from_yaml(...).run(...)` in a plain
    interpreter) on the tiny recipe (24 rows, 3 parts) with a first stage that naps 2 s per
    part; the process and its run folder."""
    (tmp_path / "nap_stage.py").write_text(NAP_MODULE)
    mapping = yaml.safe_load(recipe.read_text())
    mapping["stages"].insert(0, {"nap_stage:Nap": {"seconds": 2.0}})
    recipe.write_text(yaml.safe_dump(mapping, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env |= {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]),
        # no profile that names a server (Prefect's home, and its database, stay the usual)
        "PREFECT_PROFILES_PATH": str(tmp_path / "profiles.toml"),
    }
    out = tmp_path / "run"
    command = [sys.executable, "-m", "gristmill.cli", "run", str(recipe), "--out", str(out)]
    command.append("--no-progress")
    if python:
        code = "import gristmill as gm; gm.Recipe.from_yaml({!r}).run({!r}, show_progress=False)"
        command = [sys.executable, "-c", code.format(str(recipe), str(out))]
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    return proc, out


def _wait_mid_stage(proc: subprocess.Popen[bytes], out: Path, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not list(out.glob("01_nap-*/part-00000.parquet")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached its nap stage"
        time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.name()}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and _alive(proc):
                members.append(proc)
    return members


def _survivors(tree: list[psutil.Process], pgid: int, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in tree if _alive(p)] + [p for p in _group(pgid) if p not in tree]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize("python", [False, True], ids=["cli", "python"])
def test_sigkilled_run_leaves_no_process_behind(
    tiny_recipe: Callable[..., Path], tmp_path: Path, python: bool
) -> None:
    """On the threads runner (a Dask run would add a worker process but double the time)."""
    with (tmp_path / "run.log").open("wb") as log:
        proc, out = _start_run(tiny_recipe(), tmp_path, log, python=python)
    tree: list[psutil.Process] = []
    try:
        _wait_mid_stage(proc, out, tmp_path / "run.log")
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = [_describe(p) for p in tree]
        assert any("prefect.server.api.server:create_app" in n for n in names), names
        os.kill(proc.pid, signal.SIGKILL)  # the run process only, not its group
        proc.wait()
        left = _survivors(tree, proc.pid, timeout=10)
        assert not left, f"left running after kill -9: {[_describe(p) for p in left]}"
    finally:
        proc.kill()
        proc.wait()
        for p in [*tree, *_group(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
