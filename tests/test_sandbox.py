"""The sandbox runs real cells in real child processes; each attack must be contained."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from gristmill.sandbox import (
    ISOLATIONS,
    Limits,
    SandboxPool,
    available_isolations,
    isolation,
    probe_isolation,
    run_cell,
)

BEST = isolation()
NAMESPACED = BEST == "namespace-unshare"
needs_namespace = pytest.mark.skipif(
    not NAMESPACED, reason=f"only namespace isolation confines this; here: {BEST}"
)
# Small limits keep the attack tests fast.
SMALL = Limits(timeout_s=3, cpu_s=2, memory_mb=256, max_processes=16, output_bytes=1024)


def _host_pids_with(marker: str) -> list[int]:
    """Host processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_runs_code_and_captures_output() -> None:
    result = run_cell("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\n")
    assert result.status == "ok" and result.ok
    assert (result.stdout, result.stderr) == ("hello\n", "warn\n")
    assert result.exit_code == 0 and result.signal is None and result.reason is None
    assert result.network == BEST and not result.truncated
    assert result.stdout_bytes == 6 and result.stderr_bytes == 5


def test_exception_is_an_error_with_a_clean_traceback() -> None:
    result = run_cell("x = 1\ny = x / 0\n")
    assert result.status == "error" and result.exit_code == 1
    assert result.reason == "exit code 1: ZeroDivisionError: division by zero"
    assert 'File "cell.py", line 2, in <module>' in result.stderr
    assert "<string>" not in result.stderr  # the bootstrap's frames are hidden


def test_exit_code_and_syntax_error() -> None:
    assert run_cell("raise SystemExit(3)").exit_code == 3
    bad = run_cell("def f(:\n")
    assert bad.status == "error" and "SyntaxError" in (bad.reason or "")


def test_stdin_files_and_imports_from_the_working_directory() -> None:
    code = (
        "import sys, helper\n"
        "print(sys.stdin.read().upper(), open('data/in.txt').read(), helper.twice(21))\n"
    )
    files = {"data/in.txt": "from a file", "helper.py": "def twice(x):\n    return 2 * x\n"}
    result = run_cell(code, stdin="from stdin", files=files)
    assert result.stdout == "FROM STDIN from a file 42\n", result.stderr


def test_third_party_packages_are_importable() -> None:
    result = run_cell("import numpy as np\nprint(int(np.arange(5).sum()))\n")
    assert result.stdout == "10\n", result.stderr


def test_prelude_replays_state_silently() -> None:
    prelude = ["x = 41\nprint('noise')", "raise ValueError('ignored like a failed notebook cell')"]
    result = run_cell("print(x + 1)", prelude=prelude)
    assert (result.status, result.stdout, result.stderr) == ("ok", "42\n", "")


def test_cells_share_no_state_and_working_directories_are_removed() -> None:
    first = run_cell("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())\n")
    second = run_cell("import os\nprint(os.path.exists('left.txt'), 'x' in globals())\n")
    assert first.ok and second.stdout == "False False\n"
    assert not Path(first.stdout.strip()).exists()


@needs_namespace
def test_writable_space_is_a_small_private_tmpfs() -> None:
    code = """
import os
try:
    with open("fill.bin", "wb") as f:
        for _ in range(8):
            f.write(os.urandom(2**20))
except OSError as exc:
    print("full", exc.errno)
print(os.statvfs(".").f_blocks * os.statvfs(".").f_frsize // 2**20)
"""
    result = run_cell(code, limits=Limits(tmpfs_mb=4))
    assert result.stdout.splitlines() == ["full 28", "4"], result.stderr  # ENOSPC at 4 MiB


def test_output_keeps_head_and_tail() -> None:
    code = "print('HEAD' + 'x' * 100_000 + 'TAIL')"
    result = run_cell(code, limits=Limits(output_bytes=1000))
    assert result.ok and result.truncated
    assert result.stdout.startswith("HEADxxx") and result.stdout.endswith("xxxTAIL\n")
    assert result.stdout_bytes == 100_009
    assert f"[... {100_009 - 2000} bytes omitted ...]" in result.stdout
    assert len(result.stdout) < 2100


def test_misuse_raises() -> None:
    with pytest.raises(TypeError):
        run_cell(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relative path"):
        run_cell("pass", files={"../escape.txt": "x"})
    with pytest.raises(ValueError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ValueError, match="unknown isolation"):
        run_cell("pass", method="chroot")  # type: ignore[arg-type]


# --- attacks ------------------------------------------------------------------------------


def test_infinite_loop_hits_the_wall_clock_limit() -> None:
    limits = Limits(timeout_s=1.5, cpu_s=30)
    result = run_cell("print('started', flush=True)\nwhile True:\n    pass\n", limits=limits)
    assert result.status == "timeout" and result.reason == "wall-clock limit of 1.5 s"
    assert result.exit_code is None and result.stdout == "started\n"
    assert 1.5 <= result.seconds < 4.5


def test_busy_loop_hits_the_cpu_limit() -> None:
    result = run_cell("while True:\n    pass\n", limits=Limits(timeout_s=20, cpu_s=1))
    assert result.status == "killed" and result.signal == "SIGXCPU"
    assert result.reason == "cpu limit of 1 s"
    assert result.cpu_seconds >= 0.9 and result.seconds < 10


@needs_namespace
def test_fork_bomb_is_capped_and_leaves_nothing_behind() -> None:
    marker = f"{time.time_ns() % 10**9}.25"
    code = f"""
import os
children = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        print("refused:", exc.errno)
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{marker}"])
    children += 1
print("children", children)
"""
    result = run_cell(code, limits=SMALL)
    assert result.ok, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "refused: 11"  # EAGAIN from RLIMIT_NPROC
    children = int(lines[1].split()[1])
    assert 0 < children < SMALL.max_processes
    assert _host_pids_with(f"sleep\0{marker}") == []  # the namespace took them all down


@needs_namespace
def test_endless_fork_bomb_is_stopped() -> None:
    code = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    started = time.monotonic()
    result = run_cell(code, limits=SMALL)
    assert result.status in ("timeout", "killed"), result
    assert time.monotonic() - started < SMALL.timeout_s + 5
    assert run_cell("print('still fine')").stdout == "still fine\n"


def test_memory_bomb_hits_the_address_space_limit() -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))\n"
    result = run_cell(code, limits=SMALL)
    assert result.status == "killed", result
    assert (result.reason or "").startswith("memory limit of 256 MiB: MemoryError")


def test_big_file_hits_the_file_size_limit() -> None:
    code = "open('big.bin', 'wb').write(b'x' * (3 * 2**20))\n"
    result = run_cell(code, limits=Limits(file_size_mb=1))
    assert result.status == "killed", result
    assert (result.reason or "").startswith("file size limit of 1 MiB")


@needs_namespace
def test_writes_outside_the_working_directory_fail(tmp_path: Path) -> None:
    # World-writable targets, so only the sandbox (not file permissions) can stop the writes.
    parent_tmp = tmp_path / "parent"
    parent_tmp.mkdir(mode=0o777)
    parent_tmp.chmod(0o777)
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as repo_dir:
        os.chmod(repo_dir, 0o777)
        targets = [parent_tmp / "owned.txt", Path(repo_dir) / "owned.txt", Path("/owned.txt")]
        code = "import os\n"
        for target in targets:
            code += (
                f"try:\n    open({str(target)!r}, 'w').write('pwned')\n    print('wrote')\n"
                "except OSError as exc:\n    print(type(exc).__name__)\n"
            )
        code += "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n"
        result = run_cell(code, limits=SMALL)
        assert result.ok, result.stderr
        assert "wrote" not in result.stdout
        assert result.stdout.splitlines()[-1] == "fine"
        assert not any(t.exists() for t in targets)


@needs_namespace
def test_parent_environment_is_not_visible_even_through_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"s3cret-{time.time_ns()}"
    monkeypatch.setenv("GRISTMILL_TEST_SECRET", secret)
    code = f"""
import os
print(dict(os.environ))
for pid in ("self", "1", "{os.getpid()}"):
    try:
        print(open(f"/proc/{{pid}}/environ").read())
    except OSError as exc:
        print(pid, type(exc).__name__)
"""
    result = run_cell(code, limits=SMALL)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "GRISTMILL_TEST_SECRET" not in result.stdout


def test_socket_to_localhost_is_refused() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("connected")
except OSError as exc:
    print("refused", type(exc).__name__)
"""
        result = run_cell(code, limits=SMALL)
        assert result.ok, result.stderr
        assert result.stdout.startswith("refused"), result.stdout
        with pytest.raises(TimeoutError):
            server.accept()


def test_printing_100_mb_keeps_only_head_and_tail() -> None:
    code = (
        "import sys\nchunk = 'x' * 2**20\n"
        "for _ in range(100):\n    sys.stdout.write(chunk)\nprint('END')\n"
    )
    result = run_cell(code, limits=Limits(timeout_s=30, output_bytes=4096))
    assert result.ok, result.stderr
    assert result.stdout_bytes == 100 * 2**20 + 4 and result.truncated
    assert result.stdout.startswith("x" * 4096) and result.stdout.endswith("xxxEND\n")
    assert len(result.stdout) < 2 * 4096 + 100


# --- isolation tiers ----------------------------------------------------------------------


@needs_namespace
def test_namespace_hides_the_host() -> None:
    code = """
import os, socket
print(sorted(name for _, name in socket.if_nameindex()))
print(len([p for p in os.listdir("/proc") if p.isdigit()]) <= 3)
print(os.path.exists(os.environ["HOME"]), os.getuid() != 0)
"""
    result = run_cell(code)
    assert result.stdout.splitlines() == ["['lo']", "True", "True True"], result.stderr


def test_isolations_are_probed_in_order() -> None:
    available = available_isolations()
    assert available and available[0] == BEST
    assert list(available) == [m for m in ISOLATIONS if m in available]
    assert probe_isolation("socket-denied-audit") is None  # works wherever Python does


@pytest.mark.parametrize("method", [m for m in ISOLATIONS if probe_isolation(m) is None])
def test_every_isolation_blocks_sockets_and_environment(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRISTMILL_TEST_SECRET", "tier-secret")
    code = """
import os, socket
print("GRISTMILL_TEST_SECRET" in os.environ)
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    print("connected")
except OSError as exc:
    print("refused", type(exc).__name__)
"""
    result = run_cell(code, limits=SMALL, method=method)  # type: ignore[arg-type]
    assert result.network == method
    assert result.stdout.splitlines()[0] == "False", result.stderr
    assert result.stdout.splitlines()[1].startswith("refused"), result.stdout


# --- pool ---------------------------------------------------------------------------------


def test_pool_runs_cells_in_parallel_in_order() -> None:
    code = "import time\nstart = time.time()\ntime.sleep(1.0)\nprint({i}, start, time.time())\n"
    with SandboxPool(max_workers=4, limits=SMALL) as pool:
        results = pool.run_many([code.format(i=i) for i in range(4)])
    rows = [r.stdout.split() for r in results]
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3], [r.stderr for r in results]
    starts, ends = [float(row[1]) for row in rows], [float(row[2]) for row in rows]
    assert max(starts) < min(ends)  # all four were sleeping at the same moment


def test_pool_takes_stdins_and_rejects_a_bare_string() -> None:
    with SandboxPool(max_workers=2) as pool:
        results = pool.run_many(["print(input() * 2)"] * 3, stdins=["a", "b", "c"])
        assert [r.stdout for r in results] == ["aa\n", "bb\n", "cc\n"]
        with pytest.raises(TypeError):
            pool.run_many("print(1)")
