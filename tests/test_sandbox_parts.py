"""The sandbox's parts on their own: cgroup discovery on a fake hierarchy, the seccomp
program, output escaping, the layout a cell sees and the weak-tier opt-in."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from gristmill.sandbox import (
    Limits,
    WeakIsolationError,
    escape_controls,
    probes,
    require_isolation,
)
from gristmill.sandbox import cgroup as cg
from gristmill.sandbox.layout import compute_layout
from gristmill.sandbox.linux import SetupError, Syscalls, filter_program, syscalls
from gristmill.sandbox.output import Capture
from gristmill.sandbox.runner import classify

REPO = Path(__file__).resolve().parents[1]


# --- cgroup v2 -----------------------------------------------------------------------------


def _fake_hierarchy(tmp_path: Path, delegated: str) -> tuple[Path, Path, Path]:
    """A cgroup2 mount at tmp/cg with us in /app.slice/me.scope; `delegated` names the
    folder whose cgroup.subtree_control lists memory."""
    mount = tmp_path / "cg"
    scope = mount / "app.slice" / "me.scope"
    scope.mkdir(parents=True)
    for folder in (mount, mount / "app.slice", scope):
        (folder / "cgroup.subtree_control").write_text("")
    (mount / delegated / "cgroup.subtree_control").write_text("cpu memory pids\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        f"30 22 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    membership = tmp_path / "cgroup"
    membership.write_text("0::/app.slice/me.scope\n")
    return mount, mountinfo, membership


def test_cgroup_parent_is_the_nearest_folder_delegating_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount, mountinfo, membership = _fake_hierarchy(tmp_path, "app.slice")
    monkeypatch.setattr(cg, "_can_use", lambda folder: True)  # a real one moves a process
    assert cg.find_parent(mountinfo, membership) == mount / "app.slice"


def test_no_cgroup_parent_without_a_delegated_memory_controller(tmp_path: Path) -> None:
    mount, mountinfo, membership = _fake_hierarchy(tmp_path, ".")
    (mount / "cgroup.subtree_control").write_text("cpu pids\n")  # like a hybrid-mode host
    assert cg.find_parent(mountinfo, membership) is None
    assert cg.find_parent(tmp_path / "missing", membership) is None


def test_cell_cgroup_limits_and_events(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    group = cg.create(parent, Limits(memory_mb=256, max_processes=8))
    assert group.path.parent == parent and group.path.name.startswith("gristmill-cell-")
    assert (group.path / "memory.max").read_text() == str(256 << 20)
    (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 2\n")
    (group.path / "memory.peak").write_text(str(300 << 20))
    assert group.oom_kills() == 2 and group.peak_bytes() == 300 << 20


def test_memory_guard_here() -> None:
    guard = cg.memory_guard()
    assert guard in ("cgroup", "rss-watch", "rlimit")
    if sys.platform.startswith("linux"):
        assert guard == ("cgroup" if cg.cgroup_parent() is not None else "rss-watch")


def test_whole_cell_memory_breach_is_classified() -> None:
    reason = "memory limit of 256 MiB for the whole cell (rss-watch: its processes held 300 MiB)"
    limits = Limits(memory_mb=256)
    assert classify(-9, False, 0.1, "", limits, reason) == ("killed", reason, "SIGKILL")
    assert classify(-9, True, 0.1, "", limits, reason)[0] == "timeout"


# --- seccomp program -----------------------------------------------------------------------


@pytest.mark.parametrize("all_sockets", [False, True])
def test_seccomp_program_assembles(all_sockets: bool) -> None:
    numbers = Syscalls(
        0xC000003E, 41, 56, 435, 272, 308, 155, (425, 426, 427), (319, 447, 29, 68, 64)
    )
    program = filter_program(numbers, all_sockets=all_sockets)
    assert program[0] == (0x20, 0, 0, 4)  # loads the architecture first
    for i, (code, jt, jf, _) in enumerate(program):
        if code & 0x07 == 0x05:  # a jump: both targets inside the program
            assert i + 1 + max(jt, jf) < len(program)
    assert program[-1][0] == 0x06  # ends in a return
    returns = {k for code, _, _, k in program if code == 0x06}
    assert returns == {0x7FFF0000, 0x00050001, 0x0005000D, 0x00050026}
    checked = {k for code, _, _, k in program if code == 0x15}  # every number it compares
    assert {319, 447, 29, 68, 64} <= checked  # memfd and SysV IPC: ENOSYS


def test_known_architectures() -> None:
    if os.uname().machine in ("x86_64", "aarch64"):
        assert syscalls() is not None
    assert issubclass(SetupError, Exception)


# --- output --------------------------------------------------------------------------------


def test_control_characters_are_escaped_tab_and_newline_kept() -> None:
    assert escape_controls("a\x1b[2Jb\x07\r\x00\x7f\x9b\tc\n") == (
        "a\\x1b[2Jb\\x07\\x0d\\x00\\x7f\\x9b\tc\n"
    )
    capture = Capture(4)
    capture.add(b"\x1b[31m123456789\x1b[0m")
    assert "\x1b" not in capture.text() and capture.text().startswith("\\x1b[31")


# --- what a cell sees ----------------------------------------------------------------------


def test_layout_exposes_python_and_system_libraries_only() -> None:
    layout = compute_layout()
    bound = [step[1] for step in layout.mounts if step[0] == "bind"]
    assert os.path.realpath(sys.base_prefix) in bound
    assert not any(str(REPO) == b or str(REPO).startswith(b + "/") for b in bound), bound
    assert not any(b in ("/", "/home", "/root", "/work", "/srv", "/var") for b in bound)
    for step in layout.mounts:
        assert step[0] in ("bind", "mask", "link") and step[1].startswith("/")


# --- the weak-tier opt-in ------------------------------------------------------------------


def test_a_weak_tier_needs_an_explicit_opt_in(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(probes, "isolation", lambda: "socket-denied-seccomp")
    monkeypatch.setitem(probes._results, "namespace-unshare", "probe ended error (unshare)")
    with pytest.raises(WeakIsolationError) as refused:
        require_isolation("hint_infer", "strong")
    message = str(refused.value)
    assert "'hint_infer'" in message and "'socket-denied-seccomp'" in message
    assert "isolation: weak" in message
    with caplog.at_level(logging.WARNING, logger="gristmill.sandbox"):
        assert require_isolation("hint_infer", "weak") == "socket-denied-seccomp"
    assert "weak 'socket-denied-seccomp' sandbox" in caplog.text
    with pytest.raises(ValueError, match="isolation must be"):
        require_isolation("hint_infer", "loose")  # type: ignore[arg-type]


def test_the_strong_tier_needs_no_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probes, "isolation", lambda: "namespace-unshare")
    assert require_isolation("rejection", "strong") == "namespace-unshare"
