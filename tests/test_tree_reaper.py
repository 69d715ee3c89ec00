"""The run's watcher kills its whole process tree when the run dies, and only that tree."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gristmill.reaper import reap

#: `python chain.py N` starts `python chain.py N-1` and sleeps: a chain of N processes.
CHAIN = """
import subprocess, sys, time
n = int(sys.argv[1])
if n > 1:
    subprocess.Popen([sys.executable, __file__, str(n - 1)])
time.sleep(600)
"""

#: Starts the tree watcher, multiprocessing's resource tracker and a 3-process chain, says
#: "ready" once the watcher has had time to see them all, then sleeps or exits cleanly.
PARENT = """
import subprocess, sys, time
from multiprocessing import resource_tracker
import psutil
from gristmill.reaper import watch_tree

watch_tree(poll_s=0.1)
resource_tracker.ensure_running()
subprocess.Popen([sys.executable, sys.argv[1], "3"])
while len(psutil.Process().children(recursive=True)) < 5:  # watcher, tracker, chain of 3
    time.sleep(0.05)
time.sleep(0.5)
print("ready", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(600)
"""


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    path = tmp_path / "chain.py"
    path.write_text(CHAIN)
    return path


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.mark.parametrize("then", ["sleep", "exit"])
def test_the_whole_tree_dies_with_its_parent(chain: Path, then: str) -> None:
    """SIGKILLed or exiting cleanly, the parent leaves nothing behind, watcher included."""
    other = subprocess.Popen([sys.executable, str(chain), "1"])
    bystander = psutil.Process(other.pid)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(chain), then], stdout=subprocess.PIPE, text=True
    )
    tree: list[psutil.Process] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "ready\n"
        tree = psutil.Process(parent.pid).children(recursive=True)
        names = [" ".join(_cmdline(p)) for p in tree]
        assert sum("chain.py" in n for n in names) == 3, names
        assert any("resource_tracker" in n for n in names), names
        assert any("gristmill/reaper.py" in n for n in names), names
        if then == "sleep":
            os.kill(parent.pid, signal.SIGKILL)  # only the parent, as the OOM killer would
        parent.wait(timeout=30)
        assert _gone(tree, 10) == [], "every descendant, the watcher too, must be gone"
        assert _alive(bystander), "a process that is not the parent's descendant is left alone"
    finally:
        parent.kill()
        _kill([*tree, bystander])
        parent.wait()
        other.wait()


def test_reap_stops_and_kills_what_the_reaped_started(chain: Path) -> None:
    """Descendants the watcher never saw (started after its last poll) die with their root."""
    head = subprocess.Popen([sys.executable, str(chain), "3"])
    root = psutil.Process(head.pid)
    deadline = time.monotonic() + 30
    while len(root.children(recursive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [root, *root.children(recursive=True)]
    try:
        assert len(tree) == 3
        reap([root], grace_s=0)
        head.wait(timeout=10)
        assert _gone(tree, 10) == []
    finally:
        _kill(tree)
