"""The cell's own root filesystem: only what Python needs, read-only, plus private tmpfs.

Built in a fresh mount namespace by the cell's PID 1 (`launcher.py`), so it imports only the
standard library. The new root is a small tmpfs holding read-only bind mounts of the paths the
parent chose (`layout.py`: the interpreter, its standard library and site-packages, system
libraries), device nodes, a fresh /proc, and three writable, size- and inode-capped tmpfs
mounts: the working directory (a copy of the cell's files), /tmp and /dev/shm. After
pivot_root the host's filesystem is detached: nothing else of it is reachable.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

if __package__:
    from gristmill.sandbox import linux
else:  # run from the launcher as a script: its folder is the import path
    import linux  # type: ignore[no-redef]

#: Writable scratch mounts besides the working directory.
SCRATCH = ("/tmp", "/dev/shm")  # /tmp first: see build()
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
_FIXED = linux.MS_NOSUID | linux.MS_NODEV


def build(
    *,
    workdir: str,
    mounts: Sequence[Sequence[str]],
    owner: int,
    chown: bool,
    tmpfs_mb: int,
    tmpfs_files: int,
) -> None:
    """Build the new root and switch to it; `mounts` are ["bind", path], ["mask", path] and
    ["link", path, target] steps in order; `owner` owns the working directory."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    os.umask(0o022)
    prepared = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    root = workdir  # shadowed in this mount namespace only; the host's folder stays as it was
    linux.mount("tmpfs", root, "tmpfs", _FIXED, "size=1m,nr_inodes=4096,mode=755")
    # Scratch first: an interpreter that lives under /tmp (a venv in a checkout there) is
    # then bound on top of the private /tmp instead of being covered by it.
    # (/dev/shm goes after the device folder, which is a tmpfs of its own.)
    scratch = f"size={tmpfs_mb}m,nr_inodes={tmpfs_files}"
    for path in SCRATCH[:1]:
        os.makedirs(root + path, exist_ok=True)
        linux.mount("tmpfs", root + path, "tmpfs", _FIXED, f"{scratch},mode=1777")
    for step in mounts:
        _apply(root, step)
    _devices(root)
    for path in SCRATCH[1:]:
        os.makedirs(root + path, exist_ok=True)
        linux.mount("tmpfs", root + path, "tmpfs", _FIXED, f"{scratch},mode=1777")
    os.makedirs(root + workdir, mode=0o755, exist_ok=True)
    linux.mount("tmpfs", root + workdir, "tmpfs", _FIXED, f"{scratch},mode=700,{_ids(owner)}")
    shutil.copytree(f"/proc/self/fd/{prepared}", root + workdir, symlinks=True, dirs_exist_ok=True)
    os.close(prepared)
    if chown:
        _chown_tree(root + workdir, owner)
    _proc(root)
    os.chdir(root)
    linux.pivot_root_here()
    os.chdir("/")
    linux.mount_setattr(
        "/", set_flags=linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID, recursive=True
    )
    for path in (*SCRATCH, workdir):
        linux.mount_setattr(path, clear_flags=linux.MOUNT_ATTR_RDONLY, recursive=False)


def _apply(root: str, step: Sequence[str]) -> None:
    kind, path = step[0], step[1]
    target = root + path
    if kind == "bind":
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        linux.mount(path, target, None, linux.MS_BIND | linux.MS_REC)
    elif kind == "mask":
        linux.mount("tmpfs", target, "tmpfs", _FIXED, "size=64k,nr_inodes=1024,mode=755")
    elif kind == "link":
        if not os.path.lexists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(step[2], target)
    else:
        raise linux.SetupError(f"unknown mount step {list(step)!r}")


def _devices(root: str) -> None:
    """A small /dev: the harmless character devices and the /proc/self/fd links."""
    dev = root + "/dev"
    os.makedirs(dev, exist_ok=True)
    linux.mount("tmpfs", dev, "tmpfs", _FIXED | linux.MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in _DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(f"{dev}/{name}", "a").close()
            linux.mount(f"/dev/{name}", f"{dev}/{name}", None, linux.MS_BIND)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")


def _proc(root: str) -> None:
    """A fresh /proc of the cell's PID namespace, or an empty one where that is refused."""
    os.makedirs(root + "/proc", exist_ok=True)
    flags = _FIXED | linux.MS_NOEXEC
    try:
        linux.mount("proc", root + "/proc", "proc", flags)
    except linux.SetupError:  # e.g. a container with a partly masked /proc: show none at all
        linux.mount("tmpfs", root + "/proc", "tmpfs", flags, "size=4k,mode=555")


def _ids(owner: int) -> str:
    return f"uid={owner},gid={owner}"


def _chown_tree(top: str, owner: int) -> None:
    os.chown(top, owner, owner)
    for folder, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.chown(os.path.join(folder, name), owner, owner, follow_symlinks=False)
