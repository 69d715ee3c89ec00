"""Run untrusted, model-written Python in a separate, limited process without network.

Every cell is a fresh process: wall-clock, CPU, address-space, file-size, open-file and process
limits; an empty environment; its own temporary working directory, removed afterwards; stdout
and stderr kept head + tail. No state is carried from one cell to the next: `prelude` replays
earlier cells (output discarded, errors ignored) when a caller wants notebook-like state.

Isolation, strongest first; `isolation()` probes once per process and names the one in use:

- "namespace-unshare": new mount, network, PID, IPC and UTS namespaces from unshare(2) (the
  kernel facility behind the `unshare` tool and bubblewrap), plus a user namespace when not
  root. Only a down loopback interface; the whole filesystem read-only except three small
  private tmpfs mounts (the working directory, holding a copy of the cell's files, /tmp and
  /dev/shm), so nothing reaches the host's disk; /root, /home, /run and the host's temporary
  directory hidden; a fresh /proc; as root the code runs as a one-off unprivileged uid, so the
  process limit holds; nothing outlives the cell because the namespace dies with it.
- "socket-denied-seccomp": namespaces refused (e.g. an unprivileged container): a seccomp
  filter makes socket(2) fail with EACCES. As root the code gets a one-off uid only when that
  uid can reach the interpreter; otherwise writes and process counts are not confined.
- "socket-denied-audit": seccomp unavailable too: a Python audit hook refuses to create
  sockets; code that calls libc through ctypes gets past it.

This file is also the launcher: the parent runs it as a script (`python -I -S sandbox.py
PLAN`), so everything at module level must stay standard-library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import platform
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, get_args

logger = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout", "killed"]
Isolation = Literal["namespace-unshare", "socket-denied-seccomp", "socket-denied-audit"]
ISOLATIONS: tuple[Isolation, ...] = get_args(Isolation)

#: Exit code and stderr prefix of a launcher that could not set the sandbox up.
SETUP_FAILED_EXIT = 125
SETUP_FAILED_MARK = "gristmill-sandbox: setup failed:"


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits for one cell; the defaults suit a tool call or a unit-test run."""

    #: Wall-clock seconds from process start until everything is killed.
    timeout_s: float = 10.0
    #: CPU seconds (RLIMIT_CPU): SIGXCPU at this, SIGKILL one second later.
    cpu_s: int = 10
    #: Address space of the cell's process (RLIMIT_AS), MiB.
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

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive number, got {value!r}")
            if field.name != "timeout_s" and not isinstance(value, int):
                raise ValueError(f"Limits.{field.name} must be an int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CellResult:
    """What one cell did: how it ended, its (truncated) output and why it stopped."""

    #: ok: exit 0; error: non-zero exit or exception; timeout: wall clock; killed: hit a limit.
    status: Status
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
    #: Whether stdout or stderr lost bytes in the middle.
    truncated: bool
    stdout_bytes: int
    stderr_bytes: int
    #: Short explanation: "exit code 1: ZeroDivisionError: ...", "cpu limit", "memory limit", ...
    reason: str | None

    @property
    def ok(self) -> bool:
        """True when the cell exited with status 0."""
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------
# Parent side: choose an isolation, lay out the cell, run it, capture output, classify.
# ---------------------------------------------------------------------------------------------

_CELL_FILE = "cell.py"
_PRELUDE_FILE = "prelude_{}.py"
_MASKED_DIRS = ("/root", "/home", "/run", "/tmp", "/var/tmp", "/dev/shm")
_WRITABLE_TMPFS = ("/tmp", "/dev/shm")
_UID_BASE = 1_000_000_000

# Runs inside the cell's interpreter: replays the prelude with output discarded, then the cell
# as __main__ from a file in the working directory; tracebacks hide this bootstrap's frames.
_BOOTSTRAP = """\
import os, sys, traceback, types
{hook}
def _cell_excepthook(kind, value, tb):
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    traceback.print_exception(kind, value, tb)
sys.excepthook = _cell_excepthook
sys.path.insert(0, os.getcwd())
_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = _main
def _cell_source(name):
    with open(name, encoding="utf-8") as f:
        return compile(f.read(), name, "exec")
_quiet = os.open(os.devnull, os.O_WRONLY)
for _name in {preludes!r}:
    _saved = (os.dup(1), os.dup(2))
    os.dup2(_quiet, 1), os.dup2(_quiet, 2)
    try:
        exec(_cell_source(_name), _main.__dict__)
    except BaseException:
        pass
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(_saved[0], 1), os.dup2(_saved[1], 2)
        os.close(_saved[0]), os.close(_saved[1])
os.close(_quiet)
_main.__file__ = os.path.abspath({cell!r})
sys.argv = [_main.__file__]
exec(_cell_source({cell!r}), _main.__dict__)
"""

_AUDIT_HOOK = """\
def _deny_sockets(event, args):
    if event == "socket.__new__":
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_deny_sockets)"""

_PROBES: dict[Isolation, tuple[str, str]] = {
    "namespace-unshare": (
        "import socket\nprint(sorted(name for _, name in socket.if_nameindex()))\n",
        "['lo']\n",
    ),
    "socket-denied-seccomp": (
        "import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    print('denied')\n",
        "denied\n",
    ),
    "socket-denied-audit": (
        "import socket\ntry:\n    socket.socket()\nexcept PermissionError:\n    print('denied')\n",
        "denied\n",
    ),
}

_probe_lock = threading.Lock()
_probe_results: dict[Isolation, str | None] = {}


def probe_isolation(method: Isolation) -> str | None:
    """None when `method` works on this machine, else why not; probed once per process."""
    if method not in ISOLATIONS:
        raise ValueError(f"unknown isolation {method!r}; expected one of {ISOLATIONS}")
    with _probe_lock:
        if method not in _probe_results:
            reason = _probe_results[method] = _probe(method)
            if reason is not None:
                logger.warning("sandbox: %s isolation unavailable: %s", method, reason)
        return _probe_results[method]


def _probe(method: Isolation) -> str | None:
    if method != "socket-denied-audit" and not sys.platform.startswith("linux"):
        return f"{method} needs Linux"
    if method == "socket-denied-seccomp" and _seccomp_numbers() is None:
        return f"no seccomp filter for machine {platform.machine()!r}"
    code, expected = _PROBES[method]
    result = _run(code, limits=Limits(timeout_s=60, cpu_s=30), method=method)
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


def run_cell(
    code: str,
    *,
    limits: Limits = Limits(),
    stdin: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    prelude: Sequence[str] = (),
    method: Isolation | None = None,
) -> CellResult:
    """Run `code` as a fresh sandboxed Python script; never raises for anything the code does.

    `files` are written into the working directory first (relative paths); `prelude` cells run
    before `code` in the same globals with their output discarded and exceptions ignored;
    `method` forces an isolation (ValueError when it does not work here).
    """
    _check_cell_args(code, stdin, files, prelude)
    if method is None:
        method = isolation()
    else:
        reason = probe_isolation(method)
        if reason is not None:
            raise ValueError(f"isolation {method!r} does not work here: {reason}")
    return _run(code, limits=limits, stdin=stdin, files=files, prelude=prelude, method=method)


class SandboxPool:
    """Runs many cells in parallel, each in its own sandbox; results keep the input order."""

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        limits: Limits = Limits(),
        method: Isolation | None = None,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.limits = limits
        self.method = method
        self.max_workers = max_workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")

    def submit(
        self,
        code: str,
        *,
        stdin: str | None = None,
        files: Mapping[str, str | bytes] | None = None,
        prelude: Sequence[str] = (),
        limits: Limits | None = None,
    ) -> Future[CellResult]:
        """Queue one cell; the future's result is its CellResult."""
        _check_cell_args(code, stdin, files, prelude)
        return self._executor.submit(
            run_cell,
            code,
            limits=limits or self.limits,
            stdin=stdin,
            files=files,
            prelude=prelude,
            method=self.method,
        )

    def run_many(
        self,
        codes: Sequence[str],
        *,
        stdins: Sequence[str | None] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        limits: Limits | None = None,
    ) -> list[CellResult]:
        """Run every code in parallel (at most max_workers at once); results in input order."""
        if isinstance(codes, str):
            raise TypeError("run_many takes a sequence of code strings, not one string")
        if stdins is not None and len(stdins) != len(codes):
            raise ValueError(f"{len(stdins)} stdins for {len(codes)} codes")
        inputs = stdins if stdins is not None else [None] * len(codes)
        futures = [
            self.submit(code, stdin=given, files=files, limits=limits)
            for code, given in zip(codes, inputs, strict=True)
        ]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Wait for running cells and stop the worker threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_cell_args(
    code: object,
    stdin: object,
    files: Mapping[str, str | bytes] | None,
    prelude: Sequence[str],
) -> None:
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be str or None, got {type(stdin).__name__}")
    if isinstance(prelude, str) or not all(isinstance(p, str) for p in prelude):
        raise TypeError("prelude must be a sequence of code strings")
    reserved = {_CELL_FILE} | {_PRELUDE_FILE.format(i) for i in range(len(prelude))}
    for name, content in (files or {}).items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name in reserved:
            raise ValueError(f"files: {name!r} must be a relative path inside the cell's folder")
        if not isinstance(content, str | bytes):
            raise TypeError(f"files[{name!r}] must be str or bytes")


def _run(
    code: str,
    *,
    limits: Limits,
    method: Isolation,
    stdin: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    prelude: Sequence[str] = (),
) -> CellResult:
    workdir = Path(tempfile.mkdtemp(prefix="gristmill-cell-")).resolve()
    try:
        uid = _cell_uid(method)
        plan = _write_cell(workdir, code, files, prelude, limits, method, uid)
        return _execute(plan, limits, stdin)
    finally:
        shutil.rmtree(workdir, onerror=_force_remove)


def _force_remove(func: Any, path: str, exc_info: Any) -> None:
    """rmtree error hook: a cell may leave read-only folders behind; open them up and retry."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError as exc:
        logger.warning("sandbox: could not remove %s: %s", path, exc)


def _cell_uid(method: Isolation) -> int | None:
    """A one-off unprivileged uid for the cell when we are root and that uid can run Python."""
    if os.geteuid() != 0:
        return None
    if method != "namespace-unshare" and not _host_layout().reachable:
        return None  # only a namespace can make a private interpreter reachable
    return _UID_BASE + secrets.randbelow(1 << 28)


@dataclass(frozen=True, kw_only=True)
class _Layout:
    """Where the host keeps things the cell must or must not see (namespace isolation)."""

    masks: tuple[str, ...]
    exposed: tuple[str, ...]
    #: Whether an unprivileged uid can reach the interpreter without any masking.
    reachable: bool


_layout_lock = threading.Lock()
_layout_cache: list[_Layout] = []


def _host_layout() -> _Layout:
    with _layout_lock:
        if not _layout_cache:
            _layout_cache.append(_compute_layout())
        return _layout_cache[0]


def _compute_layout() -> _Layout:
    masks = {
        os.path.realpath(p)
        for p in (*_MASKED_DIRS, str(Path.home()), tempfile.gettempdir())
        if os.path.isdir(p)
    }
    needed = {
        os.path.realpath(p)
        for p in (
            sys.prefix,
            sys.exec_prefix,
            sys.base_prefix,
            sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)),
            *_cell_sys_path(),
        )
        if p and os.path.isdir(p)
    }
    blocked = {a for p in needed for a in _ancestors(p) if not os.stat(a).st_mode & 0o001}
    masks = set(_outermost(masks | blocked))
    exposed = {
        p
        for p in needed
        if any(_inside(p, m) for m in masks) and not any(_inside(m, p) for m in masks)
    }
    return _Layout(
        masks=tuple(sorted(masks)),
        exposed=tuple(sorted(_outermost(exposed))),
        reachable=not blocked,
    )


def _cell_sys_path() -> list[str]:
    """The import path a cell's interpreter gets (`python -I`: site-packages, no script dir)."""
    probe = "import json, sys; print(json.dumps(sys.path))"
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, env={}, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"{sys.executable} cannot report its import path: {done.stderr[-500:]}")
    paths = json.loads(done.stdout)
    return [p for p in paths if isinstance(p, str)]


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parents
    return [str(p) for p in parts if str(p) != "/"]


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not any(q != p and _inside(p, q) for q in paths))


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """Everything the launcher needs, passed to it as JSON on its command line."""

    method: str
    workdir: str
    argv: list[str]
    env: dict[str, str]
    uid: int | None
    cpu_s: int
    memory_mb: int
    file_size_mb: int
    max_processes: int
    max_open_files: int
    tmpfs_mb: int
    masks: list[str]
    exposed: list[str]
    writable: list[str]


def _write_cell(
    workdir: Path,
    code: str,
    files: Mapping[str, str | bytes] | None,
    prelude: Sequence[str],
    limits: Limits,
    method: Isolation,
    uid: int | None,
) -> _Plan:
    for name, content in (files or {}).items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
    preludes = [_PRELUDE_FILE.format(i) for i in range(len(prelude))]
    for name, text in zip(preludes, prelude, strict=True):
        (workdir / name).write_text(text, encoding="utf-8")
    (workdir / _CELL_FILE).write_text(code, encoding="utf-8")
    if uid is not None and method != "namespace-unshare":
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, uid, uid, follow_symlinks=False)
    hook = _AUDIT_HOOK if method == "socket-denied-audit" else ""
    bootstrap = _BOOTSTRAP.format(hook=hook, preludes=preludes, cell=_CELL_FILE)
    layout = _host_layout()
    writable = [str(workdir), *(m for m in layout.masks if m in _WRITABLE_TMPFS)]
    return _Plan(
        method=method,
        workdir=str(workdir),
        argv=[sys.executable, "-I", "-B", "-u", "-c", bootstrap],
        env=_cell_env(workdir),
        uid=uid,
        cpu_s=limits.cpu_s,
        memory_mb=limits.memory_mb,
        file_size_mb=limits.file_size_mb,
        max_processes=limits.max_processes,
        max_open_files=limits.max_open_files,
        tmpfs_mb=limits.tmpfs_mb,
        masks=list(layout.masks),
        exposed=list(layout.exposed),
        writable=writable,
    )


def _cell_env(workdir: Path) -> dict[str, str]:
    """The whole environment a cell sees: nothing inherited from the host."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


class _Capture:
    """Keeps the first and last `keep` bytes of a stream and counts the rest."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.keep:
                del self.tail[: len(self.tail) - self.keep]

    @property
    def omitted(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        if not self.omitted:
            return (self.head + self.tail).decode("utf-8", "replace")
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        return f"{head}\n[... {self.omitted} bytes omitted ...]\n{tail}"


def _execute(plan: _Plan, limits: Limits, stdin: str | None) -> CellResult:
    argv = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(vars(plan))]
    # Outside a namespace nothing else ends the cell's stray processes: kill its uid's.
    kill_uid = plan.uid if plan.method != "namespace-unshare" else None
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=plan.workdir,
            env=plan.env,
            start_new_session=True,
        )
    except OSError as exc:
        return _failed_start(plan, exc, time.monotonic() - start)
    with proc:
        out, err = _Capture(limits.output_bytes), _Capture(limits.output_bytes)
        timed_out = _pump(proc, stdin, out, err, start + limits.timeout_s, kill_uid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except ChildProcessError:  # someone else reaped it (SIGCHLD ignored, waitpid(-1), ...)
            status, usage = None, resource.getrusage(resource.RUSAGE_CHILDREN)
        returncode = os.waitstatus_to_exitcode(status) if status is not None else 255
        proc.returncode = returncode
    seconds = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime if status is not None else 0.0
    status_, reason, sig = _classify(returncode, timed_out, cpu, err.text(), limits)
    if status is None and not timed_out:
        status_, reason = "error", "exit status lost: the process was reaped elsewhere"
    return CellResult(
        status=status_,
        stdout=out.text(),
        stderr=err.text(),
        exit_code=returncode if returncode >= 0 and not timed_out else None,
        signal=sig,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu, 3),
        network=plan.method,
        truncated=bool(out.omitted or err.omitted),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        reason=reason,
    )


def _failed_start(plan: _Plan, exc: OSError, seconds: float) -> CellResult:
    return CellResult(
        status="error",
        stdout="",
        stderr="",
        exit_code=None,
        signal=None,
        seconds=round(seconds, 3),
        cpu_seconds=0.0,
        network=plan.method,
        truncated=False,
        stdout_bytes=0,
        stderr_bytes=0,
        reason=f"sandbox could not start: {exc}",
    )


def _pump(
    proc: subprocess.Popen[bytes],
    stdin: str | None,
    out: _Capture,
    err: _Capture,
    deadline: float,
    kill_uid: int | None,
) -> bool:
    """Feed stdin and drain both pipes until the cell has ended or hit its deadline.

    Returns whether the deadline was hit. The launcher is left unreaped for the caller.
    """
    assert proc.stdout is not None and proc.stderr is not None
    pending = memoryview(stdin.encode()) if stdin is not None else memoryview(b"")
    timed_out = exited = False
    drain_until = float("inf")  # after the end, output still in flight gets this long
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE, None)
        while True:
            now = time.monotonic()
            if not exited and _has_exited(proc.pid):
                exited = True
                _kill_cell(proc.pid, kill_uid)
                drain_until = min(drain_until, now + 1.0)
            elif not exited and not timed_out and now >= deadline:
                timed_out = True
                _kill_cell(proc.pid, kill_uid)
                drain_until = now + 2.0
            reading = any(key.data is not None for key in selector.get_map().values())
            if (exited and not reading) or now >= drain_until:
                break
            wait = min(drain_until, deadline if not timed_out else drain_until) - now
            cap = 0.05 if reading else 0.005
            for key, _ in selector.select(min(max(wait, 0.0), cap)):
                if key.data is None:
                    pending = _feed(selector, key.fileobj, pending)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fileobj)
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    return timed_out


def _feed(selector: selectors.BaseSelector, pipe: Any, pending: memoryview) -> memoryview:
    """Write the next piece of stdin; close the pipe when all is written or the cell left."""
    try:
        written = os.write(pipe.fileno(), pending[: 1 << 16]) if pending else 0
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        written = len(pending)
    pending = pending[written:]
    if not pending:
        selector.unregister(pipe)
        pipe.close()
    return pending


def _has_exited(pid: int) -> bool:
    """Whether the launcher has ended, without reaping it (so its group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_cell(pgid: int, kill_uid: int | None) -> None:
    """SIGKILL the cell's process group and, when given, every process of its one-off uid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if kill_uid is not None:
        _kill_uid(kill_uid)


def _kill_uid(uid: int) -> None:
    """kill(-1) as `uid` ends every process that uid owns (stragglers outside a namespace)."""
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


_LAST_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def _classify(
    returncode: int, timed_out: bool, cpu: float, stderr: str, limits: Limits
) -> tuple[Status, str | None, str | None]:
    """(status, reason, signal name) from how the launcher ended and the end of stderr."""
    sig = _signal_name(-returncode) if returncode < 0 else None
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s:g} s", sig
    if sig is not None:
        if sig == "SIGXCPU" or (sig == "SIGKILL" and cpu >= limits.cpu_s):
            return "killed", f"cpu limit of {limits.cpu_s} s", sig
        if sig == "SIGXFSZ":
            return "killed", f"file size limit of {limits.file_size_mb} MiB", sig
        return "killed", f"killed by {sig}", sig
    if returncode == 0:
        return "ok", None, None
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if returncode == SETUP_FAILED_EXIT and SETUP_FAILED_MARK in stderr:
        return "error", last[:300], None
    match = _LAST_EXCEPTION.match(last)
    name = match.group(1) if match else ""
    if name.endswith("MemoryError"):
        return "killed", f"memory limit of {limits.memory_mb} MiB: {last[:200]}", None
    if name == "BlockingIOError" and "Errno 11" in last:
        return "killed", f"process limit of {limits.max_processes}: {last[:200]}", None
    if "[Errno 27]" in last:
        return "killed", f"file size limit of {limits.file_size_mb} MiB: {last[:200]}", None
    detail = f": {last[:300]}" if match else ""
    return "error", f"exit code {returncode}{detail}", None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------------------------------------
# Launcher side: runs as `python -I -S sandbox.py PLAN` in the child, before the cell's code.
# ---------------------------------------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (added in Linux 5.12)
_PR_SET_PDEATHSIG = 1
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint16),
        ("filter", ctypes.POINTER(_SockFilter)),
    ]


class _SetupError(Exception):
    """The sandbox could not be built; reported to the parent, never the cell's fault."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise _SetupError(f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = _libc()
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    result = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(result, f"mount {target}")


def _mount_setattr(path: str, *, set_flags: int = 0, clear_flags: int = 0, recursive: bool) -> None:
    attr = _MountAttr(set_flags, clear_flags, 0, 0)
    result = _libc().syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(path.encode()),
        ctypes.c_uint(_AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, f"mount_setattr {path}")


def _prctl(option: int, arg: int) -> None:
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    _check(libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


def _seccomp_numbers() -> tuple[int, int, int] | None:
    """(audit arch, socket, io_uring_setup) syscall numbers for this machine, if known."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return 0xC000003E, 41, 425
    if machine in ("aarch64", "arm64"):
        return 0xC00000B7, 198, 425
    return None


def _deny_sockets() -> None:
    """Install a seccomp filter: socket(2) and io_uring_setup fail with EACCES, here and in
    every process started from here on."""
    numbers = _seccomp_numbers()
    if numbers is None:
        raise _SetupError(f"no seccomp filter for machine {platform.machine()!r}")
    arch, nr_socket, nr_io_uring = numbers
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 13  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES
    program = [
        (load, 0, 0, 4),  # architecture
        (jeq, 0, 5, arch),  # another ABI (e.g. 32-bit calls): deny
        (load, 0, 0, 0),  # syscall number
        (jge, 3, 0, 0x40000000),  # x32 ABI
        (jeq, 2, 0, nr_socket),
        (jeq, 1, 0, nr_io_uring),
        (ret, 0, 0, allow),
        (ret, 0, 0, deny),
    ]
    filters = (_SockFilter * len(program))(*(_SockFilter(*op) for op in program))
    fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    libc = _libc()
    libc.prctl.argtypes = [
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _check(
        libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "seccomp filter",
    )


def _set_limits(plan: _Plan, nproc: int) -> None:
    mib = 1 << 20
    limits = {
        resource.RLIMIT_CPU: (plan.cpu_s, plan.cpu_s + 1),
        resource.RLIMIT_AS: (plan.memory_mb * mib, plan.memory_mb * mib),
        resource.RLIMIT_FSIZE: (plan.file_size_mb * mib, plan.file_size_mb * mib),
        resource.RLIMIT_NOFILE: (plan.max_open_files, plan.max_open_files),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, value in limits.items():
        try:
            resource.setrlimit(kind, value)
        except (ValueError, OSError) as exc:
            raise _SetupError(f"setrlimit {kind}: {exc}") from exc


def _tasks_of_uid(uid: int) -> int:
    """Threads owned by `uid` right now (what RLIMIT_NPROC counts outside a user namespace)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    count += len(os.listdir(f"{entry.path}/task"))
            except OSError:
                continue
    return count


def _become_cell(plan: _Plan, nproc: int) -> None:
    """Final steps in the process that becomes the cell: limits, identity, no privileges."""
    os.chdir(plan.workdir)
    _set_limits(plan, nproc)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _exec_cell(plan: _Plan) -> NoReturn:
    os.execve(plan.argv[0], plan.argv, plan.env)


def _prepare_filesystem(plan: _Plan) -> None:
    """In a fresh mount namespace: hide host folders, make everything read-only, and give the
    cell a size-limited tmpfs working directory holding a copy of the files written for it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    exposed = [p for p in plan.exposed if os.path.isdir(p)]
    handles = {p: os.open(p, os.O_PATH) for p in exposed}
    prepared = os.open(plan.workdir, os.O_RDONLY | os.O_DIRECTORY)
    for mask in plan.masks:
        writable = mask in plan.writable
        options = f"size={plan.tmpfs_mb}m,mode=1777" if writable else "size=1m,mode=755"
        _mount("tmpfs", mask, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    for path in exposed:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{handles[path]}", path, None, _MS_BIND | _MS_REC)
        os.close(handles[path])
    owner = plan.uid if plan.uid is not None else os.getuid()
    os.makedirs(plan.workdir, exist_ok=True)
    options = f"size={plan.tmpfs_mb}m,mode=700,uid={owner},gid={owner}"
    _mount("tmpfs", plan.workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    shutil.copytree(f"/proc/self/fd/{prepared}", plan.workdir, symlinks=True, dirs_exist_ok=True)
    os.close(prepared)
    if plan.uid is not None:
        for root, dirs, files in os.walk(plan.workdir):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), owner, owner, follow_symlinks=False)
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except _SetupError:  # e.g. a container with a partly masked /proc: show none at all
        _mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=555")
    _mount_setattr("/", set_flags=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, recursive=True)
    for path in plan.writable:
        _mount_setattr(path, clear_flags=_MOUNT_ATTR_RDONLY, recursive=False)


def _namespace_init(plan: _Plan, report: int) -> NoReturn:
    """PID 1 of the cell's namespaces: build the filesystem, run the cell, report its status."""
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _prepare_filesystem(plan)
        nproc = plan.max_processes + (0 if plan.uid is not None else 2)
        child = os.fork()
        if child == 0:
            try:
                _become_cell(plan, nproc)
                _exec_cell(plan)
            except BaseException as exc:  # a forked child must never return into our code
                os.write(2, f"{SETUP_FAILED_MARK} {exc}\n".encode())
                os._exit(SETUP_FAILED_EXIT)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                break
        os.write(report, f"status:{status}".encode())
        os._exit(0)
    except BaseException as exc:  # a forked child must never return into our code
        os.write(report, f"error:{exc}".encode())
        os._exit(SETUP_FAILED_EXIT)


def _launch_namespaced(plan: _Plan) -> int:
    """Enter new namespaces, fork their init, and end the way the cell ended."""
    uid, gid = os.geteuid(), os.getegid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if uid != 0:
        flags |= _CLONE_NEWUSER
    _check(_libc().unshare(flags), "unshare")
    if uid != 0:  # keep our own ids inside; the cell loses every capability when it execs
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    read_end, write_end = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(read_end)
        _namespace_init(plan, write_end)
    os.close(write_end)
    _, status = os.waitpid(init, 0)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    if message.startswith("error:"):
        raise _SetupError(message.removeprefix("error:"))
    if message.startswith("status:"):
        status = int(message.removeprefix("status:"))
    return _end_like(status)


def _end_like(status: int) -> int:
    """Exit code for an exited child; for a signalled one, die of the same signal."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        return 128 + number
    return os.waitstatus_to_exitcode(status)


def _launch_plain(plan: _Plan) -> NoReturn:
    """No namespaces: limits, a one-off uid when possible, sockets denied, then exec."""
    if plan.uid is not None or os.geteuid() == 0:
        nproc = plan.max_processes
    else:
        nproc = _tasks_of_uid(os.geteuid()) + plan.max_processes
    _become_cell(plan, nproc)
    if plan.method == "socket-denied-seccomp":
        _deny_sockets()
    _exec_cell(plan)


def _launcher_main(argv: list[str]) -> int:
    """Entry point of the child: set the sandbox up as the plan says, then become the cell."""
    if len(argv) != 2:
        print("usage: sandbox.py PLAN_JSON (started by gristmill.sandbox)", file=sys.stderr)
        return 2
    plan = _Plan(**json.loads(argv[1]))
    try:
        if plan.method == "namespace-unshare":
            return _launch_namespaced(plan)
        _launch_plain(plan)
    except (OSError, _SetupError) as exc:
        print(f"{SETUP_FAILED_MARK} {exc}", file=sys.stderr)
        return SETUP_FAILED_EXIT


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv))
