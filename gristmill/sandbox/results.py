"""What a cell may use (`Limits`) and what it did (`CellResult`), with the names they use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

Status = Literal["ok", "error", "timeout", "killed"]
Isolation = Literal["namespace-unshare", "socket-denied-seccomp", "socket-denied-audit"]
ISOLATIONS: tuple[Isolation, ...] = get_args(Isolation)
#: Tiers used only where namespaces are refused: a cell running as root can write host files.
WEAK_ISOLATIONS: tuple[Isolation, ...] = ("socket-denied-seccomp", "socket-denied-audit")
#: How the cell's total memory is bounded: a cgroup v2 memory.max; the supervisor summing its
#: processes' resident memory; or only each process's address space (RLIMIT_AS).
MemoryGuard = Literal["cgroup", "rss-watch", "rlimit"]
MEMORY_GUARDS: tuple[MemoryGuard, ...] = get_args(MemoryGuard)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits for one cell; the defaults suit a tool call or a unit-test run."""

    #: Wall-clock seconds from process start until everything is killed.
    timeout_s: float = 10.0
    #: CPU seconds of each process (RLIMIT_CPU): SIGXCPU at this, SIGKILL one second later.
    cpu_s: int = 10
    #: Memory of the whole cell, MiB (see CellResult.memory for how), and also the address
    #: space of each of its processes (RLIMIT_AS).
    memory_mb: int = 1024
    #: Largest file the cell may write (RLIMIT_FSIZE), MiB.
    file_size_mb: int = 16
    #: Processes and threads the cell may run at once, itself included (RLIMIT_NPROC).
    max_processes: int = 32
    #: Open file descriptors (RLIMIT_NOFILE).
    max_open_files: int = 256
    #: Bytes kept from the start and again from the end of stdout and of stderr.
    output_bytes: int = 8192
    #: Namespace isolation: size of each in-memory filesystem the cell may write (its working
    #: directory, /tmp and /dev/shm), MiB; bounds what it can store in total.
    tmpfs_mb: int = 64
    #: Namespace isolation: files and folders each of those filesystems may hold (nr_inodes).
    tmpfs_files: int = 4096

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive number, got {value!r}")
            if field.name != "timeout_s" and not isinstance(value, int):
                raise ValueError(f"Limits.{field.name} must be an int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CellResult:
    """What one cell did: how it ended, its (truncated, escaped) output and why it stopped."""

    #: ok: exit 0; error: non-zero exit or exception; timeout: wall clock; killed: hit a limit.
    status: Status
    #: Output with terminal control characters escaped (`output.escape_controls`).
    stdout: str
    stderr: str
    #: The process's exit code; None when a signal or the timeout ended it.
    exit_code: int | None
    #: Name of the signal that ended the process (e.g. "SIGXCPU"), if one did.
    signal: str | None
    #: Wall-clock seconds, sandbox setup included.
    seconds: float
    #: CPU seconds (user + system) of the cell and every process it waited for.
    cpu_seconds: float
    #: The isolation in force (one of ISOLATIONS); says how network access was blocked.
    network: str
    #: How the cell's total memory was bounded (one of MEMORY_GUARDS).
    memory: str
    #: Whether stdout or stderr lost bytes in the middle.
    truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    #: Short explanation: "exit code 1: ZeroDivisionError: ...", "cpu limit", "memory limit", ...
    reason: str | None
    #: With tests or an epilogue: whether they ran to their end, proved by a token the code
    #: never holds (see `run_cell`); None without either.
    completed: bool | None = None

    @property
    def ok(self) -> bool:
        """True when the cell exited with status 0."""
        return self.status == "ok"
