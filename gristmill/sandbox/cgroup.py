"""A cgroup v2 per cell where the host already delegates the memory controller to us.

The cell's launcher joins its own cgroup before anything else, so every process the cell
starts is in it: memory.max (with memory.swap.max 0 and memory.oom.group 1) bounds the
whole cell and pids.max its process count; cgroup.kill ends every process at the end. This
module never enables a controller or moves an existing process: where no cgroup with
`memory` in its cgroup.subtree_control is writable, `memory_guard()` falls back to the
supervisor's resident-memory watch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gristmill.sandbox.results import Limits, MemoryGuard

logger = logging.getLogger("gristmill.sandbox")

_PREFIX = "gristmill-cell-"
_lock = threading.Lock()
_parents: list[Path | None] = []


@dataclass(frozen=True)
class CellGroup:
    """One cell's cgroup folder."""

    path: Path

    def oom_kills(self) -> int:
        """Processes the kernel killed for passing memory.max (memory.events `oom_kill`)."""
        return _events(self.path / "memory.events").get("oom_kill", 0)

    def peak_bytes(self) -> int | None:
        """Most memory the cell held at once (memory.peak, Linux 5.19+), if known."""
        try:
            return int((self.path / "memory.peak").read_text())
        except (OSError, ValueError):
            return None


def memory_guard() -> MemoryGuard:
    """How cells' total memory is bounded on this host (probed once per process)."""
    if cgroup_parent() is not None:
        return "cgroup"
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/statm"):
        return "rss-watch"
    return "rlimit"


def cgroup_parent() -> Path | None:
    """The cgroup v2 folder cells' cgroups are made in, or None where there is none."""
    with _lock:
        if not _parents:
            _parents.append(find_parent())
        return _parents[0]


def find_parent(
    mountinfo: Path = Path("/proc/self/mountinfo"), membership: Path = Path("/proc/self/cgroup")
) -> Path | None:
    """Our cgroup or its nearest ancestor where `memory` is delegated to children and we may
    create one and move a process into it; None (and why, logged) where none qualifies."""
    found = _cgroup2_mount(mountinfo)
    own = _own_cgroup(membership)
    if found is None or own is None or not _inside(Path(own), Path(found[1])):
        logger.info("sandbox: no cgroup v2 hierarchy of ours here; memory is watched per cell")
        return None
    mount, root = found
    folder = mount / os.path.relpath(own, root)
    for candidate in [folder, *folder.parents]:
        if not _inside(candidate, mount):
            break
        if _delegates_memory(candidate) and _can_use(candidate):
            _remove_stale(candidate)
            return candidate
    logger.info(
        "sandbox: no writable cgroup v2 under %s delegates the memory controller; "
        "memory is watched per cell",
        folder,
    )
    return None


def create(parent: Path, limits: Limits) -> CellGroup:
    """A fresh cgroup for one cell with its memory and process limits set."""
    path = parent / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    path.mkdir()
    group = CellGroup(path)
    try:
        (path / "memory.max").write_text(str(limits.memory_mb << 20))
        _write_if_present(path / "memory.swap.max", "0")
        _write_if_present(path / "memory.oom.group", "1")
        _write_if_present(path / "pids.max", str(limits.max_processes + 4))
    except OSError:
        destroy(group)
        raise
    return group


def destroy(group: CellGroup) -> None:
    """Kill every process left in the cell's cgroup and remove it."""
    path = group.path
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if not _populated(path):
            break
        if not _write_if_present(path / "cgroup.kill", "1"):  # Linux < 5.14: one by one
            for pid in _procs(path):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    logger.warning("sandbox: could not remove cgroup %s", path)


def _cgroup2_mount(mountinfo: Path) -> tuple[Path, str] | None:
    """(mount point, the hierarchy's folder shown there) of the cgroup v2 mount."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split(" ")
        if right.split(" ", 1)[0] == "cgroup2" and len(fields) > 4:
            return Path(fields[4]), fields[3]
    return None


def _own_cgroup(membership: Path) -> str | None:
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line.removeprefix("0::")
    return None


def _delegates_memory(folder: Path) -> bool:
    try:
        enabled = (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False
    return "memory" in enabled and os.access(folder, os.W_OK)


def _can_use(parent: Path) -> bool:
    """Whether we can make a child cgroup with memory.max and move a process into it."""
    path = parent / f"{_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError:
        return False
    try:
        (path / "memory.max").write_text("max")
        join = "import os, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))"
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", join, str(path / "cgroup.procs")],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        destroy(CellGroup(path))


def _remove_stale(parent: Path) -> None:
    """Remove empty cell cgroups left by gristmill processes that are gone."""
    for path in parent.glob(f"{_PREFIX}*"):
        owner = path.name.removeprefix(_PREFIX).removeprefix("probe-").split("-")[0]
        if owner.isdigit() and not _alive(int(owner)) and not _populated(path):
            try:
                path.rmdir()
            except OSError:
                continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _events(path: Path) -> dict[str, int]:
    try:
        pairs = [line.split() for line in path.read_text().splitlines()]
    except OSError:
        return {}
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}


def _populated(path: Path) -> bool:
    events = _events(path / "cgroup.events")
    if "populated" in events:
        return events["populated"] == 1
    return bool(_procs(path))


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _write_if_present(path: Path, value: str) -> bool:
    """Write `value` to a control file that may not exist on this kernel; whether it did."""
    if not path.exists():
        return False
    path.write_text(value)
    return True


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
