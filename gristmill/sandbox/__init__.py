"""Run untrusted, model-written Python in a separate, limited process without network.

Every cell is a fresh process tree: wall-clock, CPU, memory, file-size, open-file and process
limits; an empty environment; its own temporary working directory, removed afterwards; stdout
and stderr kept head + tail, with terminal control characters escaped (never stripped: "\\x1b"
becomes the four characters `\\x1b`, see `output.escape_controls`). No state is carried from one
cell to the next: `prelude` replays earlier cells (output discarded, errors ignored) when a
caller wants notebook-like state. Test code can run after the cell and prove, with a token
the cell's code never holds, that it reached its end (`CellResult.completed`): as `tests`, in
a process of their own that reaches the cell's functions through proxies carrying plain values
only (`harness`), so nothing the cell does can fake the proof; or as an `epilogue`, in the
cell's own interpreter and globals, where code that inspects the interpreter can.

Isolation, strongest first; `isolation()` probes once per process and names the one in use
(`CellResult.network`):

- "namespace-unshare": new mount, network, PID, IPC and UTS namespaces from unshare(2), plus
  a user namespace when not root. Only a down loopback interface. The cell's root is a new,
  read-only tmpfs holding just what Python needs (the interpreter, its standard library and
  site-packages, system libraries: `layout.py`), /dev/null and friends, a fresh /proc and
  three private tmpfs mounts capped in size and file count (the working directory, holding a
  copy of the cell's files, /tmp and /dev/shm); the host's root is detached by pivot_root, so
  the checkout, data folders and home are not there at all. As root the code runs as a
  one-off unprivileged uid. A seccomp filter refuses new user namespaces, setns, io_uring
  and AF_VSOCK sockets, and memfd and SysV IPC objects (ENOSYS): memory that no process's
  resident set shows. The namespace's PID 1 supervises the cell and nothing outlives it.
- "socket-denied-seccomp": namespaces refused (e.g. an unprivileged container): the same
  seccomp filter, which also makes socket(2) fail with EACCES. As root the code gets a
  one-off uid only when that uid can reach the interpreter; otherwise it runs as root and
  can write host files.
- "socket-denied-audit": seccomp unavailable too: a Python audit hook refuses to create
  sockets; code that calls libc through ctypes gets past it, and nothing refuses memfd or
  SysV IPC objects (the memory watch does not see them, and SysV ones outlive the cell).

The last two are weak: stages that run model-written code refuse them unless the recipe
says `isolation: weak` (`require_isolation`). In them the launcher is a child subreaper that
kills every process the cell leaves behind (double forks and setsid included).

Memory is bounded for the whole cell (`CellResult.memory`): by a cgroup v2 memory.max where
this host delegates the memory controller to a cgroup we may write ("cgroup"), else by the
supervisor summing the resident memory of the cell's processes every 25 ms and killing them
all past the limit ("rss-watch"), else only per process ("rlimit"); each process's address
space is capped at the same figure too. The watch sees resident memory only, which is why the
filter refuses memfds and SysV IPC; the private tmpfs mounts hold up to `tmpfs_mb` each on
top of `memory_mb` (a cgroup counts them against it).

Modules: `results` (Limits, CellResult), `api` (run_cell, SandboxPool), `probes` (which
isolation works), `runner` (one cell), `process` (pipes, deadline), `output`, `layout` (what
a cell sees), `cgroup`; inside the cell's launcher, standard library only: `launcher`,
`linux` (mounts, prctl, seccomp), `rootfs`, `supervise`; inside the cell's interpreter,
standard library only and handed over as source: `harness` (tests in their own process).
"""

from __future__ import annotations

from gristmill.sandbox.api import SandboxPool, run_cell
from gristmill.sandbox.cgroup import memory_guard
from gristmill.sandbox.launcher import SETUP_FAILED_EXIT, SETUP_FAILED_MARK
from gristmill.sandbox.output import escape_controls
from gristmill.sandbox.probes import (
    ISOLATION_SETTINGS,
    IsolationSetting,
    WeakIsolationError,
    available_isolations,
    isolation,
    probe_isolation,
    require_isolation,
)
from gristmill.sandbox.results import (
    ISOLATIONS,
    MEMORY_GUARDS,
    WEAK_ISOLATIONS,
    CellResult,
    Isolation,
    Limits,
    MemoryGuard,
    Status,
)

__all__ = [
    "ISOLATIONS",
    "ISOLATION_SETTINGS",
    "MEMORY_GUARDS",
    "SETUP_FAILED_EXIT",
    "SETUP_FAILED_MARK",
    "WEAK_ISOLATIONS",
    "CellResult",
    "Isolation",
    "IsolationSetting",
    "Limits",
    "MemoryGuard",
    "SandboxPool",
    "Status",
    "WeakIsolationError",
    "available_isolations",
    "escape_controls",
    "isolation",
    "memory_guard",
    "probe_isolation",
    "require_isolation",
    "run_cell",
]
