"""What of the host a namespaced cell sees: the interpreter, the standard library, the
site-packages and system libraries it loads, and nothing else (no checkout, no data, no home).

Computed once per process in the parent and handed to the launcher as `rootfs.build` steps:
read-only binds of the needed folders at their own paths, the symlinks on the way to them
(`/lib -> usr/lib`), and empty tmpfs masks over hidden folders that lie inside a needed one
(a checkout under /usr/local, say), with needed folders inside those masks bound again.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gristmill

logger = logging.getLogger("gristmill.sandbox")

#: System folders holding the shared libraries and tools a cell may load or run.
SYSTEM_DIRS = (
    "/bin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/usr/bin",
    "/usr/lib",
    "/usr/lib32",
    "/usr/lib64",
    "/usr/libx32",
    "/usr/local/bin",
    "/usr/local/lib",
)
#: Single files the dynamic loader reads.
SYSTEM_FILES = ("/etc/ld.so.cache",)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The cell's view of the host (namespace isolation) and what a plain uid can reach."""

    #: `rootfs.build` steps, in order.
    mounts: tuple[tuple[str, ...], ...]
    #: Host folders masked because they lie inside an exposed Python prefix.
    hidden: tuple[str, ...]
    #: Whether an unprivileged uid can reach the interpreter on the host as it is.
    reachable: bool


_lock = threading.Lock()
_cache: list[Layout] = []


def host_layout() -> Layout:
    """This host's layout, computed on first use."""
    with _lock:
        if not _cache:
            _cache.append(compute_layout())
        return _cache[0]


def compute_layout() -> Layout:
    """Work out the binds, symlinks and masks for this interpreter on this host."""
    prefixes = [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]
    wanted = [p for p in prefixes if p and os.path.isdir(p)]
    wanted.append(os.path.dirname(sys.executable))
    wanted.append(os.path.dirname(os.path.realpath(sys.executable)))
    wanted += [p for p in SYSTEM_DIRS if os.path.isdir(p)]
    wanted += [p for p in SYSTEM_FILES if os.path.isfile(p)]
    links: dict[str, str] = {}
    binds: set[str] = set()
    for path in wanted:
        chain, real = _symlink_chain(path)
        links.update(chain)
        binds.add(real)
    imports = set()
    for entry in cell_sys_path():
        real = os.path.realpath(entry)
        if os.path.isdir(real) and any(_inside(real, b) for b in binds):
            imports.add(real)
        elif os.path.exists(real):
            logger.debug("sandbox: import path entry %s stays hidden from cells", entry)
    binds = set(_outermost(binds))
    python = {os.path.realpath(p) for p in prefixes if p and os.path.isdir(p)}
    masks = sorted(
        h
        for h in {os.path.realpath(p) for p in _hidden_candidates() if os.path.isdir(p)}
        if any(_inside(h, p) and h != p for p in python) and h not in imports
    )
    needed = imports | {os.path.realpath(p) for p in wanted}
    rebinds = {p for p in needed if any(_inside(p, m) for m in masks)}
    steps: list[tuple[str, ...]] = [("bind", p) for p in sorted(binds)]
    steps += [("mask", p) for p in masks]
    steps += [("bind", p) for p in _outermost(rebinds)]
    steps += [("link", path, target) for path, target in sorted(links.items())]
    interpreter = {os.path.dirname(os.path.realpath(sys.executable)), *python}
    blocked = {a for p in interpreter for a in _ancestors(p) if not _searchable(a)}
    return Layout(mounts=tuple(steps), hidden=tuple(masks), reachable=not blocked)


def _hidden_candidates() -> list[str]:
    """Folders a cell must never see even when they sit inside an exposed folder."""
    checkout = Path(gristmill.__file__).resolve().parents[1]
    return [
        str(checkout),
        os.getcwd(),
        str(Path.home()),
        tempfile.gettempdir(),
        "/root",
        "/home",
        "/run",
        "/tmp",
        "/var/tmp",
    ]


def cell_sys_path() -> list[str]:
    """The import path a cell's interpreter gets (`python -I`: site-packages, no script dir)."""
    probe = "import json, sys; print(json.dumps(sys.path))"
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, env={}, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"{sys.executable} cannot report its import path: {done.stderr[-500:]}")
    paths = json.loads(done.stdout)
    return [p for p in paths if isinstance(p, str) and p]


def _symlink_chain(path: str) -> tuple[dict[str, str], str]:
    """The symlinks met on the way to `path` (link -> target as written) and its real path."""
    links: dict[str, str] = {}
    current = "/"
    for part in Path(path).parts[1:]:
        step = os.path.join(current, part)
        if os.path.islink(step):
            links[step] = os.readlink(step)
            current = os.path.realpath(step)
        else:
            current = step
    return links, current


def _searchable(folder: str) -> bool:
    """Whether any user may pass through `folder` (its "other" execute bit)."""
    try:
        return bool(os.stat(folder).st_mode & 0o001)
    except OSError:
        return False


def _ancestors(path: str) -> list[str]:
    return [str(p) for p in Path(path).parents if str(p) != "/"]


def _inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not any(q != p and _inside(p, q) for q in paths))
