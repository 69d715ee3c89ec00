"""Attacks on the sandbox, one per class the integrity issue named: contained or breached.

Each attack is a cell that prints `BREACH ...` when it gets what it is after; a few are judged
from the host side (a canary's content in the output, an escape byte, a process still alive
after the cell). Runs on whichever checkout `PYTHONPATH` points at, through `run_cell` and
`Limits` fields every checkout has, so the same attacks measure a before and an after:

    PYTHONPATH=$PWD .venv/bin/python bench/sandbox_attacks.py
    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/sandbox_attacks.py

Prints one line per attack: its class, the isolation and memory guard in force, the verdict
and the cell's reason. It never asserts; tests/test_sandbox.py holds the assertions.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gristmill import sandbox

CANARY = "gristmill-canary-7f3a"
#: Planted where the cells' working folders are made; removed when the bench ends.
PARENT_CANARY = Path(tempfile.gettempdir()) / "gristmill-attack-canary.txt"

MEMORY_BOMB = """
import os, time
r, w = os.pipe()
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(180 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(w, b"x")
        time.sleep(2)
        os._exit(0)
    kids.append(pid)
got = b""
while len(got) < 4:
    got += os.read(r, 4)
print("BREACH 4 processes hold 180 MiB each at once")
for pid in kids:
    os.waitpid(pid, 0)
"""

READ_FILE = """
import sys
for path in sys.argv[1:] or {paths!r}:
    try:
        print("BREACH read", path, open(path).read())  # the canary's content, not its name
    except OSError as exc:
        print("refused", path, type(exc).__name__)
"""

MOUNTINFO = """
for line in open("/proc/self/mountinfo"):
    fields, _, fs = line.partition(" - ")
    if fields.split()[4] == "/" and not fs.startswith("tmpfs"):
        print("BREACH the host's root filesystem is mounted at /:", fs.split()[0])
"""

NESTED_USERNS = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) == 0:
    print("BREACH unshare(CLONE_NEWUSER) succeeded")
"""

IO_URING = """
import ctypes, platform
nr = {"x86_64": 425, "aarch64": 425}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(nr, 4, params)
if fd >= 0:
    print("BREACH io_uring_setup gave fd", fd)
"""

VSOCK = """
import socket
try:
    s = socket.socket(40, socket.SOCK_STREAM)
    print("BREACH AF_VSOCK socket created")
except OSError as exc:
    print("refused", exc)
"""

INODES = """
import os
n = 0
try:
    while n < 100_000:
        open(f"/tmp/f{n}", "w").close()
        n += 1
    print("BREACH made", n, "files")
except OSError as exc:
    print("stopped at", n, exc)
"""

ESCAPES = 'print("\\x1b[2J\\x1b]0;pwned\\x07title")'

LEFTOVER = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open({pidfile!r}, "w").write(str(os.getpid()))
        time.sleep(30)
    os._exit(0)
time.sleep(0.5)
"""

HOST_WRITE = """
try:
    open({path!r}, "w").write("written")
    print("BREACH wrote", {path!r})
except OSError as exc:
    print("refused", exc)
"""


@dataclass(frozen=True)
class Attack:
    """One attack: its class, the cell, the limits it runs under and how to judge it."""

    name: str
    code: str
    limits: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    #: Extra host-side verdict: True when the attack got through.
    breached: Callable[[Any], bool] | None = None


def _alive(pidfile: Path) -> bool:
    """Whether the process whose pid the cell wrote into `pidfile` still runs (then kill it)."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def attacks(work: Path) -> list[Attack]:
    """The attacks, with canaries and pid files under `work` (inside the checkout)."""
    canary = work / "canary.txt"
    canary.write_text(CANARY)
    PARENT_CANARY.write_text(CANARY)
    has_canary: Callable[[Any], bool] = lambda r: CANARY in r.stdout  # noqa: E731
    weak = "socket-denied-seccomp"
    host_file = work / "weak-host-write.txt"
    out: list[Attack] = [
        Attack("memory: 4 x 180 MiB under memory_mb=256", MEMORY_BOMB, {"memory_mb": 256}),
        Attack(
            "host files: canary in the checkout",
            READ_FILE.replace("{paths!r}", repr([str(canary)])),
            breached=has_canary,
        ),
        Attack(
            "host files: canary in the cells' temp folder",
            READ_FILE.replace("{paths!r}", repr([str(PARENT_CANARY)])),
            breached=has_canary,
        ),
        Attack("host files: /proc/self/mountinfo shows the host's root", MOUNTINFO),
        Attack("syscalls: nested unshare(CLONE_NEWUSER)", NESTED_USERNS),
        Attack("syscalls: io_uring_setup", IO_URING),
        Attack("sockets: AF_VSOCK", VSOCK),
        Attack("tmpfs: 100k files in /tmp", INODES, {"timeout_s": 30.0}),
        Attack(
            "output: raw terminal escapes",
            ESCAPES,
            breached=lambda r: "\x1b" in r.stdout or "\x07" in r.stdout,
        ),
    ]
    for method in (None, weak):
        pidfile = work / f"leftover-{method or 'default'}.pid"
        out.append(
            Attack(
                f"processes: setsid + double fork left running ({method or 'default tier'})",
                LEFTOVER.replace("{pidfile!r}", repr(str(pidfile))),
                method=method,
                breached=lambda r, p=pidfile: (time.sleep(1.0), _alive(p))[1],
            )
        )
    out.append(
        Attack(
            f"weak tier: root cell writes a host file ({weak})",
            HOST_WRITE.replace("{path!r}", repr(str(host_file))),
            method=weak,
            breached=lambda r: host_file.exists(),
        )
    )
    return out


def verdict(attack: Attack, result: Any) -> str:
    """`breached` when the cell printed BREACH or the host-side check says so."""
    if "BREACH" in result.stdout or (attack.breached is not None and attack.breached(result)):
        return "breached"
    return "contained"


def main() -> None:
    """Run every attack once and print a line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print(f"sandbox from {sandbox.__file__}")
    print(f"isolations here: {', '.join(sandbox.available_isolations())}")
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".attacks-") as tmp:
        try:
            run_all(Path(tmp))
        finally:
            PARENT_CANARY.unlink(missing_ok=True)


def run_all(work: Path) -> None:
    """Run every attack with its files under `work` and print its line."""
    work.chmod(0o755)  # world-readable, as a checkout's folders are
    for attack in attacks(work):
        kwargs: dict[str, Any] = {"limits": sandbox.Limits(**attack.limits)}
        if attack.method is not None:
            kwargs["method"] = attack.method
        try:
            result = sandbox.run_cell(attack.code, **kwargs)
        except ValueError as exc:
            print(f"{attack.name:<62} n/a ({exc})")
            continue
        guard = getattr(result, "memory", "-")
        reason = (result.reason or result.status)[:60]
        print(
            f"{attack.name:<62} {result.network:<22} {guard:<9} "
            f"{verdict(attack, result):<9} {reason}"
        )


if __name__ == "__main__":
    main()
