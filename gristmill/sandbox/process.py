"""The parent's side of a running cell: feed its input pipes, drain its output pipes, and
stop it at its deadline."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from gristmill.sandbox.output import Capture

logger = logging.getLogger("gristmill.sandbox")

#: Seconds the launcher gets, after SIGTERM at the deadline, to kill the cell's processes
#: itself before its whole process group is killed.
GRACE_S = 1.0


def pump(
    pid: int,
    *,
    readers: Mapping[int, Capture],
    writers: Mapping[int, bytes],
    deadline: float,
    graceful: bool,
    close: Callable[[int], None] = os.close,
) -> bool:
    """Write each writer's bytes (then close it) and drain every reader until the launcher
    `pid` has ended or passed `deadline`; returns whether the deadline was hit.

    At the deadline the launcher's process group is killed, or with `graceful` the launcher
    first gets SIGTERM and GRACE_S seconds to clean up. The launcher is left unreaped.
    Writers are closed with `close` once written (the reader then sees the end).
    """
    pending = {fd: memoryview(data) for fd, data in writers.items()}
    timed_out = exited = False
    drain_until = kill_at = float("inf")  # after the end, output in flight gets this long
    with selectors.DefaultSelector() as selector:
        for fd, capture in readers.items():
            selector.register(fd, selectors.EVENT_READ, capture)
        for fd in writers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_WRITE, None)
        while True:
            now = time.monotonic()
            if not exited and has_exited(pid):
                exited = True
                kill_group(pid)
                drain_until = min(drain_until, now + 1.0)
            elif not exited and not timed_out and now >= deadline:
                timed_out = True
                if graceful:
                    _signal(pid, signal.SIGTERM)
                    kill_at = now + GRACE_S
                else:
                    kill_group(pid)
                drain_until = now + GRACE_S + 2.0
            elif not exited and now >= kill_at:
                kill_group(pid)
                kill_at = float("inf")
            reading = any(key.data is not None for key in selector.get_map().values())
            if (exited and not reading) or now >= drain_until:
                break
            wait = min(drain_until, kill_at, deadline if not timed_out else drain_until) - now
            cap = 0.05 if reading else 0.005
            for key, _ in selector.select(min(max(wait, 0.0), cap)):
                if key.data is None:
                    pending[key.fd] = _feed(selector, key.fd, pending[key.fd], close)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fd)
        for key in list(selector.get_map().values()):
            if key.data is None:
                selector.unregister(key.fd)
                close(key.fd)
    return timed_out


def _feed(
    selector: selectors.BaseSelector, fd: int, pending: memoryview, close: Callable[[int], None]
) -> memoryview:
    """Write the next piece; close the pipe when all is written or the reader left."""
    try:
        written = os.write(fd, pending[: 1 << 16]) if pending else 0
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        written = len(pending)
    pending = pending[written:]
    if not pending:
        selector.unregister(fd)
        close(fd)
    return pending


def has_exited(pid: int) -> bool:
    """Whether the launcher has ended, without reaping it (so its group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def kill_group(pgid: int) -> None:
    """SIGKILL the launcher's process group (the cell's processes that stayed in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, number)


def kill_uid(uid: int) -> None:
    """kill(-1) as `uid` ends every process that uid owns: the last resort when a launcher
    could not clean up after a cell that ran under a one-off uid."""
    try:
        subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass",
            ],
            user=uid,
            group=uid,
            extra_groups=[],
            env={},
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("sandbox: could not kill leftover processes of uid %d: %s", uid, exc)
