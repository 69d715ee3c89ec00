"""Which isolations work on this machine (probed once per process, by running a cell), and
the guard that keeps stages running model-written code off the weak ones unless asked."""

from __future__ import annotations

import logging
import platform
import sys
import threading
from typing import Literal

from gristmill.sandbox import linux
from gristmill.sandbox.results import ISOLATIONS, WEAK_ISOLATIONS, Isolation, Limits
from gristmill.sandbox.runner import run

logger = logging.getLogger("gristmill.sandbox")

#: A recipe's `isolation` setting: "strong" needs namespace isolation; "weak" also accepts
#: the seccomp and audit-hook tiers (with a warning).
IsolationSetting = Literal["strong", "weak"]
ISOLATION_SETTINGS: tuple[IsolationSetting, ...] = ("strong", "weak")

_SOCKET_DENIED = (
    "import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    print('denied')\n",
    "denied\n",
)
_PROBES: dict[Isolation, tuple[str, str]] = {
    "namespace-unshare": (
        "import socket\nprint(sorted(name for _, name in socket.if_nameindex()))\n",
        "['lo']\n",
    ),
    "socket-denied-seccomp": _SOCKET_DENIED,
    "socket-denied-audit": _SOCKET_DENIED,
}

_lock = threading.Lock()
_results: dict[Isolation, str | None] = {}


class WeakIsolationError(RuntimeError):
    """A stage that runs model-written code found only a weak isolation and no opt-in."""


def probe_isolation(method: Isolation) -> str | None:
    """None when `method` works on this machine, else why not; probed once per process."""
    if method not in ISOLATIONS:
        raise ValueError(f"unknown isolation {method!r}; expected one of {ISOLATIONS}")
    with _lock:
        if method not in _results:
            reason = _results[method] = _probe(method)
            if reason is not None:
                logger.warning("sandbox: %s isolation unavailable: %s", method, reason)
            elif method == "namespace-unshare" and linux.syscalls() is None:
                logger.warning(
                    "sandbox: no syscall filter for machine %r: namespaced cells may still "
                    "create user namespaces, io_uring instances, vsock sockets, and memfds "
                    "and SysV IPC objects that the memory watch does not see",
                    platform.machine(),
                )
        return _results[method]


def _probe(method: Isolation) -> str | None:
    if method != "socket-denied-audit" and not sys.platform.startswith("linux"):
        return f"{method} needs Linux"
    if method == "socket-denied-seccomp" and linux.syscalls() is None:
        return f"no seccomp filter for machine {platform.machine()!r}"
    code, expected = _PROBES[method]
    result = run(code, limits=Limits(timeout_s=60, cpu_s=30), method=method)
    if result.status == "ok" and result.stdout == expected:
        return None
    detail = (result.stderr.strip().splitlines() or [result.stdout.strip()])[-1:]
    return f"probe ended {result.status} ({result.reason}): {' '.join(detail)[:300]}"


def available_isolations() -> tuple[Isolation, ...]:
    """Every isolation that works here, strongest first."""
    return tuple(m for m in ISOLATIONS if probe_isolation(m) is None)


def isolation() -> Isolation:
    """The strongest isolation that works on this machine (what `run_cell` uses by default)."""
    for method in ISOLATIONS:
        if probe_isolation(method) is None:
            return method
    raise RuntimeError("no sandbox isolation works here, not even running Python in a subprocess")


def require_isolation(stage: str, setting: IsolationSetting) -> Isolation:
    """The isolation a stage that runs model-written code may use here.

    Raises WeakIsolationError when only a weak tier works and the recipe did not opt in
    (`setting` "weak"); logs a warning when it did.
    """
    if setting not in ISOLATION_SETTINGS:
        raise ValueError(f"isolation must be one of {ISOLATION_SETTINGS}, got {setting!r}")
    found = isolation()
    if found not in WEAK_ISOLATIONS:
        return found
    why = probe_isolation("namespace-unshare") or "namespaces are refused"
    if setting != "weak":
        raise WeakIsolationError(
            f"stage {stage!r} runs model-written code, but this machine offers only the weak "
            f"{found!r} sandbox (namespace isolation: {why}); there a cell running as root "
            "can write host files. Set `isolation: weak` in the stage's config to run it "
            "anyway, or run where user namespaces are allowed"
        )
    logger.warning(
        "stage %r: running model-written code in the weak %r sandbox (isolation: weak); "
        "namespace isolation is unavailable: %s",
        stage,
        found,
        why,
    )
    return found
