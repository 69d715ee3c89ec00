"""Linux system calls the sandbox needs that Python does not wrap: mounts, prctl, seccomp.

Runs inside the launcher (`launcher.py`), so it imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
AF_VSOCK = 40
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (added in Linux 5.12)
_SECCOMP_MODE_FILTER = 2


class SetupError(Exception):
    """The sandbox could not be built; reported to the parent, never the cell's fault."""


@dataclass(frozen=True)
class Syscalls:
    """One architecture's audit id and the syscall numbers the seccomp filter looks at."""

    arch: int
    socket: int
    clone: int
    clone3: int
    unshare: int
    setns: int
    pivot_root: int
    io_uring: tuple[int, int, int]  # setup, enter, register
    #: memfd_create, memfd_secret, shmget, msgget, semget: memory held outside any process's
    #: resident set (which is all the rss-watch guard sees) and, for SysV IPC, kept after the
    #: cell ends wherever the IPC namespace is the host's.
    hidden_memory: tuple[int, ...]


_SYSCALLS = {
    "x86_64": Syscalls(
        0xC000003E, 41, 56, 435, 272, 308, 155, (425, 426, 427), (319, 447, 29, 68, 64)
    ),
    "aarch64": Syscalls(
        0xC00000B7, 198, 220, 435, 97, 268, 41, (425, 426, 427), (279, 447, 194, 186, 190)
    ),
}
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def syscalls() -> Syscalls | None:
    """This machine's syscall numbers, or None for an architecture the filter does not know."""
    machine = platform.machine().lower()
    return _SYSCALLS.get(_MACHINES.get(machine, machine))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    """Move this process into new namespaces (the CLONE_NEW* `flags`)."""
    _check(_libc().unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); `data` holds filesystem options such as "size=4m,mode=755"."""
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


def umount_detached(target: str) -> None:
    """Lazily unmount `target` and everything below it (umount2 with MNT_DETACH)."""
    libc = _libc()
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _check(libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(path: str, *, set_flags: int = 0, clear_flags: int = 0, recursive: bool) -> None:
    """Change mount flags (MOUNT_ATTR_*) of the mount at `path`, and below it if `recursive`."""
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


def pivot_root_here() -> None:
    """Make the current directory the root and drop the old root (pivot_root(".", "."))."""
    numbers = syscalls()
    if numbers is None:
        raise SetupError(f"no pivot_root number for machine {platform.machine()!r}")
    dot = ctypes.c_char_p(b".")
    _check(_libc().syscall(ctypes.c_long(numbers.pivot_root), dot, dot), "pivot_root")
    umount_detached(".")


def prctl(option: int, arg: int) -> None:
    """prctl(2) with one argument."""
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    _check(libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")


# ---- seccomp ---------------------------------------------------------------------------------

_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_EPERM, _EACCES, _ENOSYS = 1, 13, 38
_ARG0 = 16  # offset of the low 32 bits of args[0] in struct seccomp_data (little-endian)

#: An instruction: (code, jump if true, jump if false, k); jumps name labels or are 0.
Op = tuple[int, str | int, str | int, int]


def filter_program(numbers: Syscalls, *, all_sockets: bool) -> list[tuple[int, int, int, int]]:
    """The seccomp program: deny new user namespaces (unshare/clone with CLONE_NEWUSER, and
    clone3, whose flags a filter cannot read), setns, io_uring and AF_VSOCK sockets (every
    socket when `all_sockets`); memfd and SysV IPC objects fail with ENOSYS, as on a kernel
    built without them; other ABIs (32-bit, x32) are refused outright."""
    check_socket: list[Op | str] = (
        [(_RET, 0, 0, _ERRNO | _EACCES)]
        if all_sockets
        else [(_LD, 0, 0, _ARG0), (_JEQ, "eacces", 0, AF_VSOCK), (_RET, 0, 0, _ALLOW)]
    )
    program: list[Op | str] = [
        (_LD, 0, 0, 4),  # architecture
        (_JEQ, 0, "eperm", numbers.arch),
        (_LD, 0, 0, 0),  # syscall number
        (_JGE, "eperm", 0, 0x40000000),  # x32 ABI
        (_JEQ, "socket", 0, numbers.socket),
        (_JEQ, "flags", 0, numbers.unshare),
        (_JEQ, "flags", 0, numbers.clone),
        (_JEQ, "enosys", 0, numbers.clone3),
        (_JEQ, "eperm", 0, numbers.setns),
        *((_JEQ, "eperm", 0, nr) for nr in numbers.io_uring),
        *((_JEQ, "enosys", 0, nr) for nr in numbers.hidden_memory),
        (_RET, 0, 0, _ALLOW),
        "socket",
        *check_socket,
        "flags",
        (_LD, 0, 0, _ARG0),
        (_JSET, "eperm", 0, CLONE_NEWUSER),
        (_RET, 0, 0, _ALLOW),
        "eacces",
        (_RET, 0, 0, _ERRNO | _EACCES),
        "eperm",
        (_RET, 0, 0, _ERRNO | _EPERM),
        "enosys",
        (_RET, 0, 0, _ERRNO | _ENOSYS),
    ]
    return _assemble(program)


def _assemble(program: list[Op | str]) -> list[tuple[int, int, int, int]]:
    """Resolve label names (the strings between instructions) into relative jumps."""
    labels: dict[str, int] = {}
    ops: list[Op] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(ops)
        else:
            ops.append(item)

    def offset(at: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"seccomp jump to {target!r} out of range: {jump}")
        return jump

    return [(code, offset(i, jt), offset(i, jf), k) for i, (code, jt, jf, k) in enumerate(ops)]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def install_filter(*, all_sockets: bool) -> None:
    """Install the seccomp filter (`filter_program`) for this process and all it starts."""
    numbers = syscalls()
    if numbers is None:
        raise SetupError(f"no seccomp filter for machine {platform.machine()!r}")
    program = filter_program(numbers, all_sockets=all_sockets)
    filters = (_SockFilter * len(program))(*(_SockFilter(*op) for op in program))
    fprog = _SockFprog(len(program), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    libc = _libc()
    libc.prctl.argtypes = [
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    result = libc.prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    _check(result, "seccomp filter")
