"""The launcher: started as `python -I -S -B launcher.py PLAN_JSON`, it builds the sandbox the
plan describes, runs the cell under a supervisor and ends the way the cell ended.

Standard library only (it and the modules it imports, `linux`, `rootfs` and `supervise`,
run before any sandbox exists; `python -I` puts no project folder on the import path, so they
are imported from this file's own folder). At the end it writes one JSON object to the plan's
status descriptor: whether the memory budget was broken, the peak and the leftovers killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

if __package__:
    from gristmill.sandbox import linux, rootfs, supervise
else:  # run as a script: `python -I` leaves this folder off the import path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import linux  # type: ignore[no-redef]
    import rootfs  # type: ignore[no-redef]
    import supervise  # type: ignore[no-redef]

#: Exit code and stderr prefix of a launcher that could not set the sandbox up.
SETUP_FAILED_EXIT = 125
SETUP_FAILED_MARK = "gristmill-sandbox: setup failed:"
_MIB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything the launcher needs, passed to it as JSON on its command line (no secrets)."""

    method: str
    workdir: str
    argv: list[str]
    env: dict[str, str]
    #: A one-off unprivileged uid for the cell, or None to keep the launcher's.
    uid: int | None
    cpu_s: int
    memory_mb: int
    file_size_mb: int
    max_processes: int
    max_open_files: int
    tmpfs_mb: int
    tmpfs_files: int
    #: Namespace tier: the new root's steps (`rootfs.build`).
    mounts: list[list[str]]
    #: Syscall filter: "off", "vsock" (namespace tier) or "sockets" (every socket denied).
    seccomp: str
    #: A cgroup v2 folder to join first (its memory.max bounds the whole cell), or None.
    cgroup: str | None
    #: Whether the supervisor kills the cell when its processes' memory passes memory_mb.
    memory_watch: bool
    #: Descriptor for the final JSON status (never inherited by the cell).
    status_fd: int
    #: Descriptors only the cell may hold (its private channel and report pipe): the launcher
    #: and the namespace's init close their copies once the cell is forked, so no process of
    #: the cell can take them from one of those two (through /proc/PID/fd, say).
    cell_fds: list[int]


def main(argv: list[str]) -> int:
    """Set the sandbox up as the plan says, run the cell, and end the way it ended."""
    if len(argv) != 2:
        print("usage: launcher.py PLAN_JSON (started by gristmill.sandbox)", file=sys.stderr)
        return 2
    plan = Plan(**json.loads(argv[1]))
    os.set_inheritable(plan.status_fd, False)
    try:
        if plan.cgroup is not None:
            Path(plan.cgroup, "cgroup.procs").write_text(str(os.getpid()))
        if plan.method == "namespace-unshare":
            return _launch_namespaced(plan)
        return _launch_plain(plan)
    except (OSError, linux.SetupError) as exc:
        print(f"{SETUP_FAILED_MARK} {exc}", file=sys.stderr)
        return SETUP_FAILED_EXIT


def _launch_namespaced(plan: Plan) -> int:
    """Enter new namespaces, fork their init, and end the way the cell ended."""
    uid, gid = os.geteuid(), os.getegid()
    flags = (
        linux.CLONE_NEWNS
        | linux.CLONE_NEWNET
        | linux.CLONE_NEWPID
        | linux.CLONE_NEWIPC
        | linux.CLONE_NEWUTS
    )
    if uid != 0:
        flags |= linux.CLONE_NEWUSER
    linux.unshare(flags)
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
    _close(plan.cell_fds)
    _, status = os.waitpid(init, 0)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    if message.startswith("error:"):
        raise linux.SetupError(message.removeprefix("error:"))
    if message:
        outcome = supervise.Outcome(**json.loads(message))
        _report(plan, outcome)
        status = outcome.status
    return _end_like(status)


def _namespace_init(plan: Plan, report: int) -> NoReturn:
    """PID 1 of the cell's namespaces: build the root, run and supervise the cell, report."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)  # the cell may not read this process's memory
        rootfs.build(
            workdir=plan.workdir,
            mounts=plan.mounts,
            owner=plan.uid if plan.uid is not None else os.getuid(),
            chown=plan.uid is not None,
            tmpfs_mb=plan.tmpfs_mb,
            tmpfs_files=plan.tmpfs_files,
        )
        nproc = plan.max_processes + (0 if plan.uid is not None else 2)
        child = _fork_cell(plan, nproc)
        _close(plan.cell_fds)
        outcome = supervise.supervise(
            child,
            budget=_budget(plan),
            processes=supervise.namespace_pids,
            kill=supervise.kill_namespace,
        )
        os.write(report, json.dumps(asdict(outcome)).encode())
        os._exit(0)
    except BaseException as exc:  # a forked child must never return into our code
        os.write(report, f"error:{exc}".encode())
        os._exit(SETUP_FAILED_EXIT)


def _launch_plain(plan: Plan) -> int:
    """No namespaces: a one-off uid when possible, the syscall filter, and this process as
    the subreaper that supervises the cell and kills whatever it leaves behind."""
    if plan.uid is not None or os.geteuid() == 0:
        nproc = plan.max_processes
    else:
        nproc = _tasks_of_uid(os.geteuid()) + plan.max_processes
    if not sys.platform.startswith("linux"):  # no /proc, no subreaper: the cell replaces us
        _become_cell(plan, nproc)
        os.execve(plan.argv[0], plan.argv, plan.env)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, _frame: stop.append(number))
    child = _fork_cell(plan, nproc)
    _close(plan.cell_fds)
    outcome = supervise.supervise(
        child,
        budget=_budget(plan),
        processes=supervise.Descendants(),
        kill=supervise.kill_each,
        stopping=lambda: bool(stop),
    )
    _report(plan, outcome)
    return _end_like(outcome.status)


def _fork_cell(plan: Plan, nproc: int) -> int:
    """Fork the process that becomes the cell; returns its pid."""
    child = os.fork()
    if child == 0:
        try:
            _become_cell(plan, nproc)
            os.execve(plan.argv[0], plan.argv, plan.env)
        except BaseException as exc:  # a forked child must never return into our code
            os.write(2, f"{SETUP_FAILED_MARK} {exc}\n".encode())
            os._exit(SETUP_FAILED_EXIT)
    return child


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _become_cell(plan: Plan, nproc: int) -> None:
    """Final steps in the process that becomes the cell: limits, identity, no privileges."""
    os.chdir(plan.workdir)
    _set_limits(plan, nproc)
    if plan.uid is not None:
        os.setgroups([])
        os.setgid(plan.uid)
        os.setuid(plan.uid)
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if plan.seccomp != "off":
        linux.install_filter(all_sockets=plan.seccomp == "sockets")


def _set_limits(plan: Plan, nproc: int) -> None:
    limits = {
        resource.RLIMIT_CPU: (plan.cpu_s, plan.cpu_s + 1),
        resource.RLIMIT_AS: (plan.memory_mb * _MIB, plan.memory_mb * _MIB),
        resource.RLIMIT_FSIZE: (plan.file_size_mb * _MIB, plan.file_size_mb * _MIB),
        resource.RLIMIT_NOFILE: (plan.max_open_files, plan.max_open_files),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, value in limits.items():
        try:
            resource.setrlimit(kind, value)
        except (ValueError, OSError) as exc:
            raise linux.SetupError(f"setrlimit {kind}: {exc}") from exc


def _budget(plan: Plan) -> int | None:
    return plan.memory_mb * _MIB if plan.memory_watch else None


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


def _report(plan: Plan, outcome: supervise.Outcome) -> None:
    """The final status for the parent: everything but the wait status, which it has."""
    fields = asdict(outcome)
    del fields["status"]
    with contextlib.suppress(OSError):  # the parent has gone: nobody is left to tell
        os.write(plan.status_fd, json.dumps(fields).encode())
        os.close(plan.status_fd)


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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
