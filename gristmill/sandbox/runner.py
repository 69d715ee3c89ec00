"""Run one cell: lay out its folder, start the launcher with a plan, collect and classify.

The cell's interpreter starts with `_BOOTSTRAP`. With an epilogue it reads the private
channel (the epilogue and the token that proves it ended) before any cell code runs, replays
the prelude silently, runs the cell as __main__ from cell.py and, only if the cell's code
returned, the epilogue in the same globals, then writes the token to the report pipe. With
tests it first forks (`harness.fork_program`): the child closes the private descriptors and
runs the prelude and the cell, then serves the cell's names; the first process reads the
private channel, runs the tests against those names and writes the token.
"""

from __future__ import annotations

import binascii
import functools
import json
import logging
import marshal
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gristmill.sandbox import cgroup, linux, process
from gristmill.sandbox.launcher import SETUP_FAILED_EXIT, SETUP_FAILED_MARK, Plan
from gristmill.sandbox.layout import host_layout
from gristmill.sandbox.output import Capture
from gristmill.sandbox.results import CellResult, Isolation, Limits, MemoryGuard, Status

logger = logging.getLogger("gristmill.sandbox")

CELL_FILE = "cell.py"
PRELUDE_FILE = "prelude_{}.py"
#: The names the epilogue's and the tests' code carry in tracebacks (never written to files).
EPILOGUE_NAME = "epilogue.py"
TESTS_NAME = "tests.py"
_LAUNCHER = str(Path(__file__).with_name("launcher.py"))
_UID_BASE = 1_000_000_000
_STATUS_BYTES = 4096

# Runs inside the cell's interpreter (`python -I -B -u -c`); tracebacks hide its frames.
# `{start}` either reads the private channel (epilogue: the tests share the program's
# interpreter) or forks the program off the tests' own process (`_FORK`, tests).
_BOOTSTRAP = """\
import os, sys, traceback, types
{hook}
def _cell_excepthook(kind, value, tb):
    while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
        tb = tb.tb_next
    traceback.print_exception(kind, value, tb)
sys.excepthook = _cell_excepthook
def _read_all(fd):
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
{start}
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
{end}
"""

_READ_PRIVATE = "_private = _read_all({private_fd}) if {private_fd} >= 0 else None"

# The epilogue runs in the program's globals; its token comes from `_private`.
_EPILOGUE = """\
if _private is not None:
    import linecache
    _token, _, _source = _private.partition(b"\\n")
    _source = _source.decode("utf-8")
    del _private
    linecache.cache[{name!r}] = (len(_source), None, _source.splitlines(True), {name!r})
    exec(compile(_source, {name!r}, "exec"), _main.__dict__)
    sys.stdout.flush(), sys.stderr.flush()
    os.write({report_fd}, _token)"""

# Tests in their own process (`harness.py`): the child returns here to run the program. The
# harness arrives compiled (marshal, base64): compiling its source would cost every cell ~6 ms.
_FORK = """\
import binascii, marshal
_harness = types.ModuleType("gristmill_harness")
exec(marshal.loads(binascii.a2b_base64({code!r})), _harness.__dict__)
_server = _harness.fork_program(private_fd={private_fd}, report_fd={report_fd}, tests_name={name!r})
del _harness"""

_SERVE = "_server.serve(_main.__dict__)"


@functools.cache
def harness_code() -> str:
    """`harness.py` compiled for this interpreter (the cell runs the same one), marshalled and
    base64-encoded; docstrings and asserts dropped (optimize=2) to keep the bootstrap small."""
    source = Path(__file__).with_name("harness.py").read_text(encoding="utf-8")
    code = compile(source, "<string>", "exec", optimize=2)
    return binascii.b2a_base64(marshal.dumps(code), newline=False).decode("ascii")


_AUDIT_HOOK = """\
def _deny_sockets(event, args):
    if event == "socket.__new__":
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_deny_sockets)"""


class _Channels:
    """The pipes between the parent and one launcher; each descriptor is closed once only
    (a second close could hit a number another thread's cell has reused)."""

    def __init__(self, *, stdin: bool, ending: bool) -> None:
        self._open: set[int] = set()
        self.status = self._pipe()
        self.stdin = self._pipe() if stdin else None
        self.private = self._pipe() if ending else None
        self.report = self._pipe() if ending else None

    def _pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self._open.update((read, write))
        return read, write

    def child_fds(self) -> list[int]:
        """The descriptors the launcher inherits at their own numbers."""
        return [self.status[1], *self.cell_fds()]

    def cell_fds(self) -> list[int]:
        """Those of them only the cell keeps: the private channel's and the report's ends."""
        if self.private is not None and self.report is not None:
            return [self.private[0], self.report[1]]
        return []

    def close(self, fd: int) -> None:
        """Close `fd` unless it is closed already."""
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def close_child_ends(self) -> None:
        """Close the parent's copies of what the launcher inherited."""
        for pair, end in ((self.status, 1), (self.stdin, 0), (self.private, 0), (self.report, 1)):
            if pair is not None:
                self.close(pair[end])

    def close_all(self) -> None:
        for fd in list(self._open):
            self.close(fd)


def run(
    code: str,
    *,
    limits: Limits,
    method: Isolation,
    stdin: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    prelude: Sequence[str] = (),
    epilogue: str | None = None,
    tests: str | None = None,
) -> CellResult:
    """Run one cell with `method` (already known to work); never raises for the cell's code.

    At most one of `epilogue` (in the cell's interpreter) and `tests` (in a process of their
    own) is given (`api.run_cell` says what each means)."""
    if epilogue is not None and tests is not None:
        raise ValueError("a cell takes an epilogue or tests, not both")
    workdir = Path(tempfile.mkdtemp(prefix="gristmill-cell-")).resolve()
    group: cgroup.CellGroup | None = None
    try:
        uid = _cell_uid(method)
        preludes = _write_cell(workdir, code, files, prelude, method, uid)
        guard, group = _memory_guard(limits)
        cell = PreparedCell(
            workdir=workdir,
            preludes=preludes,
            limits=limits,
            method=method,
            uid=uid,
            guard=guard,
            group=group,
            tests=tests is not None,
        )
        return _execute(cell, stdin=stdin, ending=tests if tests is not None else epilogue)
    finally:
        if group is not None:
            cgroup.destroy(group)
        shutil.rmtree(workdir, onerror=_force_remove)


def _memory_guard(limits: Limits) -> tuple[MemoryGuard, cgroup.CellGroup | None]:
    guard = cgroup.memory_guard()
    parent = cgroup.cgroup_parent()
    if guard != "cgroup" or parent is None:
        return guard, None
    try:
        return "cgroup", cgroup.create(parent, limits)
    except OSError as exc:
        logger.warning("sandbox: no cgroup for this cell (%s); watching its memory instead", exc)
        return "rss-watch", None


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
    if method != "namespace-unshare" and not host_layout().reachable:
        return None  # only a namespace can make a private interpreter reachable
    return _UID_BASE + secrets.randbelow(1 << 28)


def _write_cell(
    workdir: Path,
    code: str,
    files: Mapping[str, str | bytes] | None,
    prelude: Sequence[str],
    method: Isolation,
    uid: int | None,
) -> list[str]:
    """Write the cell's files, preludes and code; returns the prelude file names."""
    for name, content in (files or {}).items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    preludes = [PRELUDE_FILE.format(i) for i in range(len(prelude))]
    for name, text in zip(preludes, prelude, strict=True):
        (workdir / name).write_text(text, encoding="utf-8")
    (workdir / CELL_FILE).write_text(code, encoding="utf-8")
    if uid is not None and method != "namespace-unshare":
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, uid, uid, follow_symlinks=False)
    return preludes


@dataclass(frozen=True, kw_only=True)
class PreparedCell:
    """A cell whose folder is written and whose memory guard is chosen, ready to launch."""

    workdir: Path
    preludes: list[str]
    limits: Limits
    method: Isolation
    uid: int | None
    guard: MemoryGuard
    group: cgroup.CellGroup | None
    #: Whether the ending is tests in their own process (else an epilogue, or nothing).
    tests: bool = False


def _plan(cell: PreparedCell, channels: _Channels) -> Plan:
    """The launcher's instructions for `cell` (JSON-able, standard-library side)."""
    workdir, limits, method, group = cell.workdir, cell.limits, cell.method, cell.group
    private_fd = channels.private[0] if channels.private is not None else -1
    report_fd = channels.report[1] if channels.report is not None else -1
    if cell.tests:
        start = _FORK.format(
            code=harness_code(), private_fd=private_fd, report_fd=report_fd, name=TESTS_NAME
        )
        end = _SERVE
    else:
        start = _READ_PRIVATE.format(private_fd=private_fd)
        end = _EPILOGUE.format(name=EPILOGUE_NAME, report_fd=report_fd)
    bootstrap = _BOOTSTRAP.format(
        hook=_AUDIT_HOOK if method == "socket-denied-audit" else "",
        start=start,
        preludes=cell.preludes,
        cell=CELL_FILE,
        end=end,
    )
    namespaced = method == "namespace-unshare"
    return Plan(
        method=method,
        workdir=str(workdir),
        argv=[sys.executable, "-I", "-B", "-u", "-c", bootstrap],
        env=_cell_env(workdir),
        uid=cell.uid,
        cpu_s=limits.cpu_s,
        memory_mb=limits.memory_mb,
        file_size_mb=limits.file_size_mb,
        max_processes=limits.max_processes,
        max_open_files=limits.max_open_files,
        tmpfs_mb=limits.tmpfs_mb,
        tmpfs_files=limits.tmpfs_files,
        mounts=[list(step) for step in host_layout().mounts] if namespaced else [],
        seccomp=_seccomp_mode(method),
        cgroup=str(group.path) if group is not None else None,
        memory_watch=cell.guard == "rss-watch",
        status_fd=channels.status[1],
        cell_fds=channels.cell_fds(),
    )


def _seccomp_mode(method: Isolation) -> str:
    if method == "socket-denied-seccomp":
        return "sockets"
    if method == "namespace-unshare" and linux.syscalls() is not None:
        return "vsock"
    return "off"


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


def _execute(cell: PreparedCell, *, stdin: str | None, ending: str | None) -> CellResult:
    """Launch `cell`, pump its pipes to the deadline, and classify how it ended."""
    workdir, limits, method, uid = cell.workdir, cell.limits, cell.method, cell.uid
    guard, group = cell.guard, cell.group
    token = secrets.token_hex(16).encode()
    channels = _Channels(stdin=stdin is not None, ending=ending is not None)
    try:
        plan = _plan(cell, channels)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", _LAUNCHER, json.dumps(asdict(plan))],
                stdin=channels.stdin[0] if channels.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=plan.env,
                pass_fds=channels.child_fds(),
                start_new_session=True,
            )
        except OSError as exc:
            return _failed_start(plan, guard, exc, time.monotonic() - start)
        channels.close_child_ends()
        with proc:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = Capture(limits.output_bytes), Capture(limits.output_bytes)
            status_capture, report = Capture(_STATUS_BYTES), Capture(len(token) + 1)
            readers = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
            readers[channels.status[0]] = status_capture
            writers: dict[int, bytes] = {}
            if channels.stdin is not None:
                writers[channels.stdin[1]] = (stdin or "").encode()
            if channels.private is not None and channels.report is not None:
                writers[channels.private[1]] = token + b"\n" + (ending or "").encode()
                readers[channels.report[0]] = report
            timed_out = process.pump(
                proc.pid,
                readers=readers,
                writers=writers,
                deadline=start + limits.timeout_s,
                graceful=method != "namespace-unshare",
                close=channels.close,
            )
            try:
                _, wait_status, usage = os.wait4(proc.pid, 0)
            except ChildProcessError:  # someone else reaped it (SIGCHLD ignored, waitpid(-1))
                wait_status, usage = None, resource.getrusage(resource.RUSAGE_CHILDREN)
            returncode = os.waitstatus_to_exitcode(wait_status) if wait_status is not None else 255
            proc.returncode = returncode
        seconds = time.monotonic() - start
    finally:
        channels.close_all()
    final = _status(status_capture.raw())
    if uid is not None and method != "namespace-unshare" and not final.get("clean", False):
        process.kill_uid(uid)  # the launcher could not vouch for every process being gone
    cpu = usage.ru_utime + usage.ru_stime if wait_status is not None else 0.0
    over = _memory_breach(limits, guard, group, final)
    status_, reason, sig = classify(returncode, timed_out, cpu, err.text(), limits, over)
    if wait_status is None and not timed_out:
        status_, reason = "error", "exit status lost: the process was reaped elsewhere"
    return CellResult(
        status=status_,
        stdout=out.text(),
        stderr=err.text(),
        exit_code=returncode if returncode >= 0 and not timed_out else None,
        signal=sig,
        seconds=round(seconds, 3),
        cpu_seconds=round(cpu, 3),
        network=method,
        memory=guard,
        truncated=bool(out.omitted or err.omitted),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        reason=reason,
        completed=_proved(report, token) if ending is not None else None,
    )


def _proved(report: Capture, token: bytes) -> bool:
    """Whether the report pipe carried exactly the token and nothing else."""
    return report.total == len(token) and report.raw() == token


def _status(raw: bytes) -> dict[str, Any]:
    """The launcher's final JSON status; empty when it did not get to write one."""
    try:
        value = json.loads(raw.decode()) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _memory_breach(
    limits: Limits, guard: MemoryGuard, group: cgroup.CellGroup | None, final: Mapping[str, Any]
) -> str | None:
    """Why the cell's total memory ended it, or None when it did not."""
    whole = f"memory limit of {limits.memory_mb} MiB for the whole cell"
    if group is not None and group.oom_kills() > 0:
        peak = group.peak_bytes()
        held = f": its processes held {peak >> 20} MiB" if peak is not None else ""
        return f"{whole} (cgroup{held})"
    if guard == "rss-watch" and final.get("memory_exceeded"):
        return (
            f"{whole} (rss-watch: its processes held {int(final.get('peak_bytes', 0)) >> 20} MiB)"
        )
    return None


def _failed_start(plan: Plan, guard: MemoryGuard, exc: OSError, seconds: float) -> CellResult:
    return CellResult(
        status="error",
        stdout="",
        stderr="",
        exit_code=None,
        signal=None,
        seconds=round(seconds, 3),
        cpu_seconds=0.0,
        network=plan.method,
        memory=guard,
        truncated=False,
        stdout_bytes=0,
        stderr_bytes=0,
        reason=f"sandbox could not start: {exc}",
    )


_LAST_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")


def classify(
    returncode: int,
    timed_out: bool,
    cpu: float,
    stderr: str,
    limits: Limits,
    memory_breach: str | None = None,
) -> tuple[Status, str | None, str | None]:
    """(status, reason, signal name) from how the launcher ended and the end of stderr."""
    sig = _signal_name(-returncode) if returncode < 0 else None
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s:g} s", sig
    if memory_breach is not None:
        return "killed", memory_breach, sig
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
