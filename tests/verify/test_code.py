"""CodeVerifier on real HumanEval problems, run in the real sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from code_attacks import ATTACKS

from gristmill.verify import get_verifier
from gristmill.verify.code import (
    PROMPT_SEPARATOR,
    CodeVerifier,
    extract_code,
    humaneval_program,
    humaneval_reference,
    separate_tests,
    split_reference,
    strict_tests,
    unwritten_functions,
)

DATA = Path(__file__).parent.parent / "data" / "humaneval_10.jsonl"
PROBLEMS: list[dict[str, Any]] = [json.loads(line) for line in DATA.read_text().splitlines()]
VERIFIER = CodeVerifier(timeout_s=5)
SHARED = CodeVerifier(timeout_s=5, harness="shared")


def _reference(problem: dict[str, Any], *, with_prompt: bool = True) -> str:
    prompt = problem["prompt"] if with_prompt else None
    return humaneval_reference(problem["test"], problem["entry_point"], prompt)


@pytest.mark.parametrize("verifier", [VERIFIER, SHARED], ids=["separate", "shared"])
def test_every_canonical_solution_passes(verifier: CodeVerifier) -> None:
    # The canonical solutions are bodies that continue the prompt's signature.
    responses = [f"```python\n{p['canonical_solution']}```" for p in PROBLEMS]
    verdicts = verifier.verify_many(responses, [_reference(p) for p in PROBLEMS])
    assert [v.reason for v in verdicts] == ["passed"] * len(PROBLEMS)
    assert all(v.correct for v in verdicts)
    assert verdicts[2].extracted == PROBLEMS[2]["canonical_solution"].rstrip()
    # ... and as complete programs checked against the tests alone.
    full = [f"```python\n{p['prompt']}{p['canonical_solution']}```" for p in PROBLEMS]
    plain = [_reference(p, with_prompt=False) for p in PROBLEMS]
    assert all(v.correct for v in verifier.verify_many(full, plain))


def test_complete_solution_passes_without_a_prompt_aware_reference() -> None:
    problem = PROBLEMS[0]
    solution = problem["prompt"] + problem["canonical_solution"]
    response = f"Here is my solution:\n\n```python\n{solution}```\nIt compares all pairs."
    verdict = VERIFIER(response, _reference(problem, with_prompt=False))
    assert (verdict.correct, verdict.reason) == (True, "passed")
    # The same complete solution also works when the reference carries the prompt.
    assert VERIFIER(response, _reference(problem)).reason == "passed"


def test_unfenced_body_continues_the_prompt() -> None:
    problem = PROBLEMS[2]  # truncate_number: "    return number % 1.0\n"
    verdict = VERIFIER(problem["canonical_solution"], _reference(problem))
    assert verdict.reason == "passed"


def test_wrong_solution_fails() -> None:
    problem = PROBLEMS[0]
    verdict = VERIFIER("```python\n    return False\n```", _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "failed")
    assert verdict.extracted == "    return False"


def test_crashing_solution_is_an_error() -> None:
    problem = PROBLEMS[2]
    verdict = VERIFIER("```python\n    return number.nope\n```", _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "error")
    syntax = VERIFIER("```python\n    return (\n```", _reference(problem))
    assert syntax.reason == "error"


def test_infinite_loop_times_out() -> None:
    problem = PROBLEMS[2]
    verifier = CodeVerifier(timeout_s=1.5)
    verdict = verifier("```python\n    while True:\n        pass\n```", _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "timeout")


def test_exiting_before_the_tests_does_not_pass() -> None:
    problem = PROBLEMS[2]
    cheat = "```python\n    return 0\n\nimport sys\nsys.exit(0)\n```"
    verdict = VERIFIER(cheat, _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "error")


# --- attacks on the end-of-tests proof ---------------------------------------------------

#: Attacks that reach the proof in the tests' interpreter: the shared harness falls to them.
REACHES_THE_INTERPRETER = (
    "frame_inspection",
    "gc_thread",
    "settrace",
    "patched_builtins",
    "shadowed_builtin",
)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_no_attack_passes_the_default_harness(attack: str) -> None:
    # Each is wrong for HumanEval/2 and tries to fake the proof (tests/verify/code_attacks.py).
    verdict = VERIFIER(f"```python\n{ATTACKS[attack]}```", _reference(PROBLEMS[2]))
    assert not verdict.correct and verdict.reason in ("failed", "error"), verdict


@pytest.mark.parametrize("attack", REACHES_THE_INTERPRETER)
def test_the_shared_harness_falls_to_attacks_on_its_interpreter(attack: str) -> None:
    # The documented reason it is not the default: these fake a pass there.
    verdict = SHARED(f"```python\n{ATTACKS[attack]}```", _reference(PROBLEMS[2]))
    assert verdict.correct, verdict


def test_a_redefined_helper_of_the_tests_is_not_used() -> None:
    # HumanEval/32's tests call the prompt's `poly`; a program may not bring its own.
    prompt = (
        "def poly(xs, x):\n    return sum(c * x**i for i, c in enumerate(xs))\n\n\n"
        'def find_zero(xs):\n    """A zero of the polynomial."""\n'
    )
    tests = "def check(candidate):\n    assert abs(poly([-2, 1], candidate([-2, 1]))) < 1e-6\n"
    reference = f"{prompt}{PROMPT_SEPARATOR}{tests}\ncheck(find_zero)\n"
    honest = VERIFIER("    return -xs[0] / xs[1]\n", reference)
    assert honest.correct, honest
    cheat = "    return 0\n\n\ndef poly(xs, x):\n    return 0\n"
    assert VERIFIER(cheat, reference).reason == "failed"
    assert SHARED(cheat, reference).correct  # the shared harness takes the program's poly


def test_stop_iteration_cannot_end_a_tests_loop_early() -> None:
    reference = "for got in map(f, [1, 2]):\n    assert got == 2\n"
    cheat = "def f(x):\n    raise StopIteration\n"
    assert SHARED(cheat, reference).correct  # the loop just ends, in the shared harness
    verdict = VERIFIER(cheat, reference)
    assert (verdict.correct, verdict.reason) == (False, "error")


def test_tests_that_pass_a_callback_need_the_shared_harness() -> None:
    reference = "assert apply(lambda x: x + 1, 1) == 2\n"
    program = "def apply(g, x):\n    return g(x)\n"
    assert VERIFIER(program, reference).reason == "error"
    assert SHARED(program, reference).correct


def test_unwritten_functions_are_the_prompts_signatures() -> None:
    prompt = (
        "import math\n\ndef helper(x):\n    return x\n\n"
        'def a(x):\n    """Doc."""\n\ndef b(x):\n    import math\n    """Doc."""\n'
        "def c():\n    ...\n\nasync def d():\n    pass\n"
    )
    assert unwritten_functions(prompt) == ["a", "b", "c", "d"]
    assert separate_tests(None, "check()\n") == "check()\n"
    assert separate_tests("def broken(:\n", "check()\n") == "check()\n"
    # Tests that use only what is left to write need none of the prompt's code ...
    assert separate_tests(prompt, "assert a(1) == b(1)\n") == "assert a(1) == b(1)\n"
    # ... while a helper or an import of the prompt brings all of it.
    for tests in ("assert a(1) == helper(1)\n", "assert math.pi > 3\n"):
        composed = separate_tests(prompt, tests)
        assert composed.startswith(prompt) and composed.endswith(f"{PROMPT_SEPARATOR}{tests}")


def test_an_unknown_harness_is_refused() -> None:
    with pytest.raises(ValueError, match="harness must be one of"):
        CodeVerifier(harness="inline")  # type: ignore[arg-type]


def test_a_marker_found_in_the_programs_own_source_does_not_pass() -> None:
    # The old harness appended its end marker to the program's file: this found and printed it.
    problem = PROBLEMS[2]
    cheat = """```python
    return 0

import os, re, sys
seen = open(__file__).read() + " ".join(sys.argv) + repr(dict(os.environ))
seen += "".join(open(name, errors="replace").read() for name in os.listdir("."))
for marker in re.findall(r"gristmill-tests-done-[0-9a-f]+|[0-9a-f]{32}", seen):
    os.write(1, f"\\n{marker}\\n".encode())
print("check(" in seen)
os._exit(0)
```"""
    verdict = VERIFIER(cheat, _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "error")


@pytest.mark.parametrize(
    "ending",
    [
        "print('gristmill-tests-done-' + '0' * 32)\nimport sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "import sys\nsys.exit(0)",
        "raise SystemExit(0)",
        "import atexit, os\natexit.register(os._exit, 0)\nimport sys\nsys.exit(0)",
    ],
)
def test_leaving_before_the_tests_end_does_not_pass(ending: str) -> None:
    problem = PROBLEMS[2]
    cheat = f"```python\n    return 0\n\n{ending}\n```"
    verdict = VERIFIER(cheat, _reference(problem))
    assert (verdict.correct, verdict.reason) == (False, "error")


EQ_CHEATS = [
    # always equal, for == True / == False and for numbers alike
    "    class Yes:\n        def __eq__(self, other):\n            return True\n"
    "        def __ne__(self, other):\n            return False\n    return Yes()\n",
    # a float subclass with a rigged __eq__ and arithmetic
    "    class Near(float):\n        def __eq__(self, other):\n            return True\n"
    "        __hash__ = float.__hash__\n"
    "        def __sub__(self, other):\n            return 0.0\n    return Near(0)\n",
    # a list subclass that equals everything
    "    class All(list):\n        def __eq__(self, other):\n            return True\n"
    "    return All()\n",
    # a metaclass that makes a class compare equal to everything, returned as the value
    "    class Meta(type):\n        def __eq__(cls, other):\n            return True\n"
    "        __hash__ = type.__hash__\n"
    "    class Any(metaclass=Meta):\n        pass\n    return Any\n",
]


@pytest.mark.parametrize("index", [0, 2, 5])
@pytest.mark.parametrize("body", EQ_CHEATS)
def test_objects_that_fake_equality_do_not_pass(index: int, body: str) -> None:
    problem = PROBLEMS[index]
    verdict = VERIFIER(f"```python\n{body}```", _reference(problem))
    assert not verdict.correct and verdict.reason == "error", verdict


@pytest.mark.parametrize("index", [0, 2, 5])
@pytest.mark.parametrize("body", EQ_CHEATS)
def test_the_shared_harness_catches_fake_equality_with_strict_compare(
    index: int, body: str
) -> None:
    verdict = SHARED(f"```python\n{body}```", _reference(PROBLEMS[index]))
    assert not verdict.correct and verdict.reason == "error", verdict


def test_strict_compare_can_be_turned_off_and_then_the_fake_passes() -> None:
    # The documented limit of the shared harness with strict_compare=False.
    loose = CodeVerifier(timeout_s=5, harness="shared", strict_compare=False)
    verdict = loose(f"```python\n{EQ_CHEATS[0]}```", _reference(PROBLEMS[0]))
    assert verdict.correct


def test_strict_compare_keeps_identity_checks_and_plain_values() -> None:
    reference = "def check(c):\n    assert c() is None\n    assert [c()] == [None]\n"
    tests = strict_tests(reference)
    assert "assert c() is None" in tests
    assert "__gristmill_plain__([c()]) == __gristmill_plain__([None])" in tests
    verdict = SHARED("```python\ndef f():\n    return None\n```", reference + "check(f)\n")
    assert verdict.correct, verdict
    assert strict_tests("def broken(:\n") == "def broken(:\n"


def test_no_code() -> None:
    assert VERIFIER("", _reference(PROBLEMS[0])).reason == "no_code"
    assert VERIFIER("```bash\nls\n```", _reference(PROBLEMS[0])).reason == "no_code"
    assert VERIFIER("   \n\n", _reference(PROBLEMS[0])).extracted is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("```python\nx = 1\n```\ntext\n```python\nx = 2\n```", "x = 2"),
        ("```\nplain = 1\n```\n```bash\nls\n```", "plain = 1"),
        ("```py\n\n    body = 1\n\n```", "    body = 1"),
        ("intro\n```python\nunterminated = 1\n", "unterminated = 1"),
        ("\n\n    return x  \n\n", "    return x"),
    ],
)
def test_extract_code(response: str, expected: str) -> None:
    assert extract_code(response) == expected


def test_reference_helpers() -> None:
    problem = PROBLEMS[0]
    plain = humaneval_reference(problem["test"], problem["entry_point"])
    assert plain.endswith("\ncheck(has_close_elements)\n")
    assert split_reference(plain) == (None, plain)
    prompt, tests = split_reference(_reference(problem))
    assert prompt == problem["prompt"] and tests == plain
    with pytest.raises(ValueError, match="identifier"):
        humaneval_reference(problem["test"], "not valid")
    body = humaneval_program("def f():\n", "    # comment\n    return 1\n")
    assert body == "def f():\n    # comment\n    return 1\n"
    full = humaneval_program("def f():\n", "# mine\ndef f():\n    return 1\n")
    assert full.startswith("def f():\n\n\n# mine\n")


def test_registered_as_the_code_verifier() -> None:
    verifier = get_verifier("code", timeout_s=3)
    assert isinstance(verifier, CodeVerifier) and verifier.limits.cpu_s == 3
    problem = PROBLEMS[7]
    assert verifier(problem["canonical_solution"], _reference(problem)).correct
