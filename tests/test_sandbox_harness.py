"""Tests in a process of their own (`run_cell(..., tests=...)`, `gristmill.sandbox.harness`):
plain values across the pipe, the program's names as proxies, and what the program cannot do
to the tests' process."""

from __future__ import annotations

import math
import re

import pytest

from gristmill.sandbox import Limits, isolation, probe_isolation, run_cell
from gristmill.sandbox.harness import (
    NotPlain,
    ProgramException,
    decode,
    encode,
    exports,
    rebuild_exception,
)

BEST = isolation()
needs_namespace = pytest.mark.skipif(
    BEST != "namespace-unshare", reason=f"only namespace isolation hides the tests; here: {BEST}"
)


# --- plain values ----------------------------------------------------------------------------

PLAIN = [
    None,
    True,
    0,
    -7,
    2**5000,
    -(2**3000),
    1.5,
    -0.0,
    math.inf,
    "text \udcff with a lone surrogate",
    b"\x00bytes",
    3 + 4j,
    [1, [2, (3, 4)]],
    (1,),
    (),
    {"a": 1, 2: "b", (3, 4): [5], None: {1.5: frozenset({1})}},
    {1, "two", (3,)},
    frozenset(),
    [{"nested": [[], {}, set()]}],
]


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
def test_plain_values_cross_unchanged_with_their_exact_types(value: object) -> None:
    import json

    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and type(back) is type(value)
    if isinstance(value, list | tuple):
        assert [type(x) for x in back] == [type(x) for x in value]  # type: ignore[attr-defined]


def test_nan_crosses_as_nan() -> None:
    import json

    back = decode(json.loads(json.dumps(encode([math.nan]))))
    assert isinstance(back, list) and math.isnan(back[0])


class _Int(int):
    pass


class _Always:
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = object.__hash__


def _generator() -> object:
    yield 1


@pytest.mark.parametrize(
    "value",
    [_Int(3), _Always(), [1, _Always()], {"k": _Always()}, _generator(), range(3), len, object],
    ids=["int-subclass", "eq-object", "in-list", "in-dict", "generator", "range", "fn", "type"],
)
def test_anything_else_is_refused(value: object) -> None:
    with pytest.raises(NotPlain):
        encode(value)


def test_a_list_holding_itself_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(NotPlain, match="nested too deep"):
        encode(loop)


@pytest.mark.parametrize(
    "data",
    [{"tuple": 1}, {"what": []}, {"a": [], "b": []}, {"dict": [[[1], 2]]}, {"complex": ["1", 2]}],
)
def test_malformed_data_is_not_decoded(data: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode(data)


def test_exports_are_functions_modules_and_plain_values() -> None:
    import os as some_module

    namespace = {
        "f": len,
        "K": [1, (2,)],
        "m": some_module,
        "obj": _Always(),
        "__dunder__": 1,
        "_private": 2,
    }
    assert exports(namespace) == [
        ["f", "call"],
        ["K", "value", [1, {"tuple": [2]}]],
        ["m", "module", "os"],
        ["_private", "value", 2],
    ]


def test_the_programs_exceptions_are_rebuilt_as_builtin_ones_only() -> None:
    error = rebuild_exception(["MyError", "ValueError", "Exception"], "bad input")
    assert type(error) is ValueError and str(error) == "bad input"
    # StopIteration would end a test's `for x in map(candidate, ...)` loop silently.
    stop = rebuild_exception(["StopIteration", "Exception"], "")
    assert type(stop) is ProgramException
    assert type(rebuild_exception(["SystemExit", "BaseException"], "0")) is ProgramException
    assert type(rebuild_exception("junk", None)) is ProgramException
    custom = rebuild_exception(["MyError", "Exception", "BaseException", "object"], "why")
    assert type(custom) is ProgramException and str(custom) == "MyError: why"


# --- cells with tests --------------------------------------------------------------------------


def test_tests_reach_functions_values_and_modules() -> None:
    code = "import math\nK = 3\ndef double(x):\n    return 2 * x\n"
    tests = "assert double(2) == 4\nassert K == 3\nassert math.sqrt(4) == 2\nprint('done')\n"
    result = run_cell(code, tests=tests)
    assert result.ok and result.completed, result.stderr
    assert result.stdout == "done\n"


def test_a_failed_assertion_reads_like_the_epilogues() -> None:
    result = run_cell("def double(x):\n    return x\n", tests="assert double(2) == 4\n")
    assert result.status == "error" and result.completed is False
    assert result.reason == "exit code 1: AssertionError"
    assert 'File "tests.py", line 1, in <module>' in result.stderr


def test_the_programs_exception_reaches_the_tests() -> None:
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    tests = (
        "try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
        "else:\n    raise AssertionError('no error')\nassert f(2) == 2\n"
    )
    assert run_cell(code, tests=tests).completed
    crash = run_cell("def f():\n    return 1 / 0\n", tests="f()\n")
    assert crash.reason == "exit code 1: ZeroDivisionError: division by zero"
    assert 'File "cell.py", line 2, in f' in crash.stderr  # the program's side, printed too


def test_changes_to_list_dict_and_set_arguments_come_back() -> None:
    code = "def f(items, table, seen):\n    items.append(1)\n    table['k'] = 2\n    seen.add(3)\n"
    tests = (
        "a, b, c = [0], {}, set()\nf(a, table=b, seen=c)\n"
        "assert (a, b, c) == ([0, 1], {'k': 2}, {3})\n"
    )
    result = run_cell(code, tests=tests)
    assert result.completed, result.stderr


def test_builtin_names_are_never_taken_from_the_program() -> None:
    code = "def abs(x):\n    return 0\ndef f():\n    return 5\n"
    result = run_cell(code, tests="assert abs(f() - 3) < 1\n")
    assert result.reason == "exit code 1: AssertionError"
    assert run_cell(code, tests="assert __program__['abs'](-2) == 0\n").completed


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            "class Yes:\n    def __eq__(self, o):\n        return True\n"
            "def f():\n    return Yes()\n",
            "f returned a Yes object",
        ),
        ("def f():\n    return (x for x in [1])\n", "f returned a generator object"),
        ("class N(float):\n    pass\ndef f():\n    return [N(1)]\n", "f returned a N object"),
    ],
)
def test_a_value_that_is_not_plain_stops_the_tests(code: str, reason: str) -> None:
    result = run_cell(code, tests="try:\n    assert f() == 1\nexcept BaseException:\n    pass\n")
    assert result.status == "error" and result.completed is False
    assert result.reason == f"exit code 1: gristmill_harness.PlainValuesOnly: {reason}"


def test_the_tests_may_not_send_a_function() -> None:
    result = run_cell("def f(g):\n    return g(1)\n", tests="assert f(lambda x: x) == 1\n")
    assert result.completed is False
    assert "PlainValuesOnly: the tests passed a function object to f" in (result.reason or "")


@pytest.mark.parametrize(
    "ending",
    ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"],
)
def test_a_program_that_exits_cleanly_before_the_tests_does_not_complete(ending: str) -> None:
    result = run_cell(f"def f():\n    return 1\n{ending}\n", tests="print('tests ran')\n")
    assert result.completed is False and "tests ran" not in result.stdout
    assert result.status == "error"
    assert "exited with code 0 before the tests ended" in (result.reason or "")


def test_an_exit_during_a_call_is_mirrored() -> None:
    code = "import os\ndef f():\n    os._exit(3)\n"
    result = run_cell(code, tests="f()\n")
    assert (result.exit_code, result.completed) == (3, False)
    clean = run_cell("import os\ndef f():\n    os._exit(0)\n", tests="f()\n")
    assert clean.status == "error" and clean.completed is False


def test_the_programs_cpu_limit_reads_as_the_cpu_limit() -> None:
    code = "def spin():\n    while True:\n        pass\n"
    result = run_cell(code, tests="spin()\n", limits=Limits(timeout_s=20, cpu_s=1))
    assert result.status == "killed" and result.completed is False
    assert result.reason == "cpu limit of 1 s", (result.reason, result.signal)


def test_tests_and_epilogue_do_not_mix() -> None:
    with pytest.raises(ValueError, match="not both"):
        run_cell("pass", tests="pass", epilogue="pass")
    with pytest.raises(TypeError, match="tests must be str"):
        run_cell("pass", tests=b"pass")  # type: ignore[arg-type]


# --- what the program cannot reach ----------------------------------------------------------

#: Prints what the program can open of every other process in the cell, then leaves a proxy.
_PEEK = r"""
import os
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    for what in ("mem", "environ", "fd", "maps"):
        try:
            if what == "fd":
                os.listdir(f"/proc/{pid}/fd")
            else:
                open(f"/proc/{pid}/{what}", "rb").close()
            print(pid, what, "open")
        except OSError as exc:
            print(pid, what, type(exc).__name__)
def f():
    return 1
"""


@needs_namespace
def test_the_program_cannot_open_the_tests_process() -> None:
    result = run_cell(_PEEK, tests="assert f() == 1\n")
    assert result.completed, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.endswith("PermissionError") for line in lines), lines
    assert {line.split()[0] for line in lines} >= {"1", "2"}  # init and the tests' process


#: Reads the private descriptors' numbers off the bootstrap in its own command line.
_PRIVATE_FDS = r"""
import os, re
cmdline = open("/proc/self/cmdline", "rb").read().decode()
fds = [int(n) for n in re.search(r"private_fd=(\d+), report_fd=(\d+)", cmdline).groups()]
held = [fd for fd in fds if os.path.exists(f"/proc/self/fd/{fd}")]
print("program holds", held)
def launcher():
    return int(open(f"/proc/{os.getppid()}/stat").read().split()[3])
def launcher_holds():
    return [fd for fd in fds if os.path.exists(f"/proc/{launcher()}/fd/{fd}")]
"""


def test_the_program_holds_neither_private_descriptor() -> None:
    result = run_cell(_PRIVATE_FDS + "f = len\n", tests="assert f('a') == 1\n")
    assert result.completed, result.stderr
    assert "program holds []" in result.stdout


@pytest.mark.skipif(
    probe_isolation("socket-denied-seccomp") is not None, reason="no weak tier to look from"
)
def test_the_launcher_keeps_no_copy_of_the_private_descriptors() -> None:
    # Only the weak tiers let a cell see the launcher; it must not hold the token's pipe.
    code = _PRIVATE_FDS + "import sys\nprint('launcher holds', launcher_holds())\n"
    result = run_cell(code, tests="pass\n", method="socket-denied-seccomp")
    if "PermissionError" in result.stderr:
        pytest.skip("this cell may not look at the launcher's descriptors")
    match = re.search(r"launcher holds (\[.*\])", result.stdout)
    assert match is not None, result.stderr
    assert match.group(1) == "[]"
