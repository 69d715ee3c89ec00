"""The cell's supervisor: wait for the cell, hold its processes to a memory budget, and kill
every process it leaves behind.

Runs inside the launcher (`launcher.py`), so it imports only the standard library. In the
namespace tier the supervisor is PID 1 of the cell's PID namespace, where /proc lists only
the cell's processes; in the weaker tiers it is the launcher itself, made a child subreaper
so that orphaned processes (double forks, setsid) are re-parented to it and stay findable.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Seconds between memory checks while a budget is set, and between reaps without one.
WATCH_INTERVAL_S = 0.025
IDLE_INTERVAL_S = 0.1
#: Longest the final clean-up keeps killing processes that keep appearing.
CLEANUP_S = 2.0


@dataclass(frozen=True)
class Outcome:
    """How the supervised cell ended."""

    #: Wait status of the cell's first process (os.waitpid's second value).
    status: int
    #: Whether the supervisor killed the cell for holding more memory than the budget.
    memory_exceeded: bool
    #: Largest total resident memory seen across the cell's processes, bytes.
    peak_bytes: int
    #: Processes still running after the cell's first process ended (all killed).
    leftovers: int
    #: Whether every process of the cell is known to be gone.
    clean: bool


def namespace_pids() -> list[int]:
    """Every process of this PID namespace but the caller (its /proc shows no others)."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def kill_namespace(_pids: list[int]) -> None:
    """From PID 1 of a PID namespace, SIGKILL every other process in it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def kill_each(pids: list[int]) -> None:
    """SIGKILL each of `pids`, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Descendants:
    """The caller's descendant processes, from /proc; the full scan is cached for `every_s`
    (reading every process's stat file is slow on a busy host)."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self._root = os.getpid()
        self._at = float("-inf")
        self._pids: list[int] = []

    def __call__(self, fresh: bool = False) -> list[int]:
        now = time.monotonic()
        if fresh or now - self._at >= self.every_s:
            self._pids = _descendants(self._root)
            self._at = now
        return self._pids


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def resident_bytes(pids: list[int]) -> int:
    """Summed resident memory of `pids` (shared pages count once per process)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def proportional_bytes(pids: list[int]) -> int:
    """Summed proportional memory (PSS) of `pids`: shared pages split between their users.

    Slower than `resident_bytes`; used to confirm a breach before killing the cell.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            return resident_bytes(pids)  # no smaps_rollup (Linux < 4.14): resident it is
    return total


def supervise(
    child: int,
    *,
    budget: int | None,
    processes: Callable[[], list[int]],
    kill: Callable[[list[int]], None],
    stopping: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Wait for `child`, reaping every other process that ends; kill everything when the
    cell's memory passes `budget` bytes or `stopping()` turns true (the parent's deadline),
    and whatever is left once `child` has ended."""
    status: int | None = None
    exceeded = stopped = False
    peak = 0
    pidfd = _pidfd(child)
    interval = WATCH_INTERVAL_S if budget is not None else IDLE_INTERVAL_S
    try:
        while status is None:
            if pidfd is not None:
                select.select([pidfd], [], [], interval)
            else:
                time.sleep(interval)
            status = _reap(child)
            if status is None and stopping() and not stopped:
                stopped = True
                kill(_fresh(processes))
            elif status is None and budget is not None and not exceeded:
                pids = processes()
                used = resident_bytes(pids)
                peak = max(peak, used)
                if used > budget and proportional_bytes(pids) > budget:
                    exceeded = True
                    kill(pids)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    leftovers, clean = cleanup(processes, kill)
    return Outcome(status, exceeded, peak, leftovers, clean)


def cleanup(
    processes: Callable[[], list[int]], kill: Callable[[list[int]], None]
) -> tuple[int, bool]:
    """Kill and reap every remaining process: (how many there were, whether all are gone)."""
    leftovers: set[int] = set()
    deadline = time.monotonic() + CLEANUP_S
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) != (0, 0):
                continue  # reaped one; look again before killing anything
        except ChildProcessError:
            return len(leftovers), True  # no children means no descendants at all
        if time.monotonic() > deadline:
            return len(leftovers), False
        pids = _fresh(processes)
        leftovers.update(pids)
        kill(pids)
        time.sleep(0.005)


def _fresh(processes: Callable[[], list[int]]) -> list[int]:
    """`processes()` without its cache when it has one."""
    if isinstance(processes, Descendants):
        return processes(fresh=True)
    return processes()


def _reap(child: int) -> int | None:
    """Reap every ended child; the wait status of `child` if it was among them."""
    found = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid == 0:
            return found
        if pid == child:
            found = status


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` ends (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
