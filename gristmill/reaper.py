"""Kill what a process started once it dies: an engine's helpers, or a whole run's tree.

vLLM runs its engine core and workers in child processes, Prefect its temporary API server
(uvicorn), Dask its nannies and workers. If the parent is SIGKILLed (OOM killer, `kill -9`,
a crashed notebook) they live on as orphans holding memory, ports and CPUs. A tiny watcher
process polls the parent and, once it is gone, kills what it started:

- `watch_children(pids)`: a fixed set (an engine's helpers); the watcher exits early when
  they are all gone, so closing the engine also ends its watcher.
- `watch_tree()`: every descendant of this process, re-listed each poll so the set stays
  current (the run's watcher; `gristmill run` and `serve` start one).
- `watch_children_matching(text)`: the children whose command line holds `text`; a flow run
  from Python (whose process, and other children, are the caller's) watches Prefect's
  temporary server this way.

Processes are matched by pid and start time, so a reused pid is never hit, and only
descendants are touched: a Prefect server the user runs themselves is not ours. At the
kill the watcher stops (SIGSTOP) the processes and then their descendants, until nothing
new appears, then SIGKILLs them all: nothing it freezes can start a process it would miss.
Multiprocessing's shared helpers (resource tracker, forkserver) are killed last, after a
short grace that lets the tracker unlink the shared memory the dead left behind. A process
that the parent itself starts within one poll of its death can be missed.

This file is also the watcher: the parent runs it as a script (`python -P reaper.py ...`),
so everything at module level must stay standard library plus psutil.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

#: Process-wide helpers that multiprocessing starts on first use and keeps until the process
#: exits; one may appear while an engine starts, but it is not the engine's to watch or kill.
SHARED_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")

#: How long the shared helpers get to exit on their own once everything else is killed.
HELPER_GRACE_S = 2.0

_SCRIPT = str(Path(__file__).resolve())
_tree_watcher: subprocess.Popen[bytes] | None = None


def child_pids() -> set[int]:
    """Pids of every descendant of this process, except multiprocessing's shared helpers."""
    return {p.pid for p in psutil.Process().children(recursive=True) if not is_shared_helper(p)}


def watch_children(pids: Iterable[int], *, poll_s: float = 1.0) -> subprocess.Popen[bytes] | None:
    """Start a watcher that SIGKILLs `pids` once this process is gone; None if none alive."""
    specs = []
    for pid in sorted(set(pids)):
        try:
            specs.append(f"{pid}:{psutil.Process(pid).create_time()!r}")
        except psutil.Error:
            continue
    return _start("children", specs, poll_s) if specs else None


def watch_tree(*, poll_s: float = 0.5) -> subprocess.Popen[bytes]:
    """Start (once per process) a watcher that SIGKILLs all our descendants once we are gone."""
    global _tree_watcher
    if _tree_watcher is None or _tree_watcher.poll() is not None:
        _tree_watcher = _start("tree", [], poll_s)
    return _tree_watcher


def watching_tree() -> bool:
    """Whether this process's tree watcher (`watch_tree`) is running."""
    return _tree_watcher is not None and _tree_watcher.poll() is None


_watched_children: set[tuple[int, float]] = set()


def watch_children_matching(text: str) -> subprocess.Popen[bytes] | None:
    """Start a watcher (`watch_children`) for the children of this process whose command line
    contains `text` and that no earlier call watched; None when there is none."""
    found = set()
    for proc in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            key = (proc.pid, proc.create_time())
            if key not in _watched_children and any(text in a for a in _cmdline(proc)):
                found.add(key)
    if not found:
        return None
    _watched_children.update(found)
    return watch_children(pid for pid, _ in found)


def is_shared_helper(proc: psutil.Process) -> bool:
    """Whether `proc` is one of multiprocessing's process-wide helpers."""
    return any(h in arg for arg in _cmdline(proc) for h in SHARED_HELPERS)


def is_watcher(proc: psutil.Process) -> bool:
    """Whether `proc` is a watcher started by this module (watchers never kill watchers)."""
    return _SCRIPT in _cmdline(proc)


def _start(mode: str, specs: list[str], poll_s: float) -> subprocess.Popen[bytes]:
    me = psutil.Process()
    parent = [str(me.pid), repr(me.create_time())]
    return subprocess.Popen(
        [sys.executable, "-P", _SCRIPT, mode, *parent, str(poll_s), *specs],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # outlives a SIGKILL of our whole process group too
    )


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


# ---- the watcher process -------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """The watcher: `MODE PARENT_PID PARENT_CREATED POLL_S [PID:CREATED ...]`."""
    mode, pid, created, poll = argv[0], int(argv[1]), float(argv[2]), float(argv[3])
    parent = _process(pid, created)
    given = (spec.split(":") for spec in argv[4:])
    watched = {p for p in (_process(int(p), float(c)) for p, c in given) if p is not None}
    while parent is not None and _alive(parent):
        if mode == "tree":
            watched = {p for p in watched if _alive(p)} | {
                p for p in descendants([parent]) if not is_watcher(p)
            }
        elif not any(_alive(p) for p in watched):
            return 0
        time.sleep(poll)
    reap(watched)
    return 0


def reap(procs: Iterable[psutil.Process], *, grace_s: float = HELPER_GRACE_S) -> None:
    """Stop `procs` and everything they started, then SIGKILL them; shared helpers last."""
    seen = set(procs)
    stopped: set[psutil.Process] = set()
    while True:
        seen |= {p for p in descendants(seen) if not is_watcher(p)}
        todo = {p for p in seen - stopped if not is_shared_helper(p)}
        if not todo:
            break
        for proc in todo:
            _signal(proc, signal.SIGSTOP)
        stopped |= todo
    for proc in stopped:
        _signal(proc, signal.SIGKILL)
    _, helpers = psutil.wait_procs([p for p in seen - stopped if _alive(p)], timeout=grace_s)
    for proc in helpers:
        _signal(proc, signal.SIGKILL)


def descendants(roots: Iterable[psutil.Process]) -> set[psutil.Process]:
    """Every live descendant of `roots` (one pass over the process table)."""
    kids: dict[int, list[psutil.Process]] = defaultdict(list)
    for proc in psutil.process_iter(["ppid"]):
        kids[proc.info["ppid"]].append(proc)
    found: set[psutil.Process] = set()
    todo = [r.pid for r in roots if _alive(r)]
    while todo:
        for kid in kids.get(todo.pop(), ()):
            if kid not in found and _alive(kid):
                found.add(kid)
                todo.append(kid.pid)
    return found


def _process(pid: int, created: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        return proc if proc.create_time() == created else None
    except psutil.Error:
        return None


def _alive(proc: psutil.Process) -> bool:
    """Running, the same process (not a reused pid), and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.Error, OSError):  # psutil refuses a reused pid
        proc.send_signal(sig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
