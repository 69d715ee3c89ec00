"""Math answer checking: extraction, equivalence (fast path and math-verify), threads, timeouts."""

from __future__ import annotations

import json
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gristmill.verify import Verdict, get_verifier
from gristmill.verify.math import MathVerifier, answers_equal, extract_answer, verify_math

DATA = Path(__file__).resolve().parents[1] / "data" / "gsm8k_train_20.jsonl"
SLICE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "gsm8k_train_200.jsonl"
# sympy evaluates this tower exactly and never finishes: a real pathological answer.
SLOW = "9^{9^{9}}"

# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so we get \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\frac{1}{\\boxed{3}}}", "\\frac{1}{\\boxed{3}}"),
        ("$\\boxed{ 12 }$", "12"),
        ("\\boxed{5} and a cut-off \\boxed{\\frac{1}{", "5"),
        ("She sells 24.\n#### 72", "72"),
        ("#### 1,000", "1,000"),
        ("The answer is 42.", "42"),
        ("the ANSWER IS 42", "42"),
        ("So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Answer:** 1,000 apples", "1,000"),
        ("The answer is **-3.5**.", "-3.5"),
        ("The answer is 42 apples because she had many.", "42"),
        ("The answer is 42, since 6 * 7 = 42.", "42"),
        ("The answer is $5 for each box.", "$5"),
        ("The answer is 5. Wait, no. The answer is 6.", "6"),
        ("Final Answer: The final answer is $2\\pi$. I hope it is correct.", "2\\pi"),
        ("The final answer is $\\$18.90$.", "\\$18.90"),  # `\$` does not close the span
        ("The answer is 14 + 3 = 17.", "17"),  # a calculation gives its result
        ("So the final answer is 15 gallons * 8 pints / gallon = 120 pints", "120"),
        ("The answer is $y = 2x + 3$.", "y = 2x + 3"),
        ("We add 9 and 9, so 18 is the answer.", "18"),
        ("so she has 13 + 3 = 16 books remaining, which is the answer.", "16"),
        ("Hence $x = 5$ is our answer.", "5"),
        ("The answer is 18 or 19.", "18 or 19"),  # the hedge stays visible
        ("The answer is $18$ to $28$.", "18 to 28"),
        ("The answer is 42 apples to share with 3 friends.", "42"),
        ("The answer is <<6=6>>6.", "6"),  # GSM8K calculator notes are dropped
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_last_number_fallback_is_off_by_default() -> None:
    text = "She had 5 apples and bought 7 more, so 12 in all."
    assert extract_answer(text) is None
    assert extract_answer(text, allow_last_number=True) == "12"
    assert extract_answer("costs 1,250.50 dollars", allow_last_number=True) == "1,250.50"
    assert extract_answer("it is -4 degrees", allow_last_number=True) == "-4"
    assert extract_answer("pages 3-4", allow_last_number=True) == "4"  # a hyphen, not a minus
    assert extract_answer("I will answer that later.", allow_last_number=True) is None
    verdict = verify_math(text, "12")
    assert verdict == Verdict(correct=False, extracted=None, reason="no_answer")
    assert verify_math(text, "12", allow_last_number=True).correct


# ---------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac12", "1/2"),
        ("\\tfrac{1}{2}", "\\frac{2}{4}"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{-3}{4}", "-0.75"),
        ("1,000", "1000"),
        ("1,234,567", "1234567"),
        ("1{,}000", "1000"),
        ("-7", "-7"),
        ("−7", "-7"),  # unicode minus
        ("3.0", "3"),
        ("0.3333333", "1/3"),  # a decimal is an approximation: relative 1e-6
        ("1e3", "1000"),
        ("5 dollars", "5"),
        ("$5", "5"),
        ("\\$1,000.50", "1000.5"),
        ("5 cm", "5"),
        ("5 \\text{ cm}", "5"),
        ("12 square feet", "12"),
        ("50%", "0.5"),  # percent convention: 50% is 0.5 ...
        ("50\\%", "50"),  # ... and also 50, as GSM8K's "what percent" answers are written
        ("25 percent", "25%"),
        ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
        ("2\\pi", "6.283185"),
        ("x + 1", "1 + x"),
        ("\\{1, 2\\}", "\\{2, 1\\}"),
        ("[1, 2)", "[1,2)"),
        ("(0, \\infty)", "(0, \\infty)"),
        ("2^{10}", "1024"),
    ],
)
def test_equal(a: str, b: str) -> None:
    assert answers_equal(a, b)
    assert verify_math(f"The answer is \\boxed{{{a}}}", b).reason == "equal"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("12", "21"),
        ("-5", "5"),
        ("0.333", "1/3"),  # beyond the tolerance
        ("1.000", "1,000"),  # a decimal point is not a thousands separator
        ("1,5", "15"),  # not a thousands group
        ("50%", "0.5%"),  # two percentages compare as written
        ("0.5", "5"),
        ("\\frac{1}{3}", "\\frac{1}{4}"),
        ("(1, 2]", "[1, 2)"),
        ("\\{1, 2\\}", "\\{1, 3\\}"),
        ("\\sqrt{3}", "\\sqrt{2}"),
        ("1000001", "1000000"),  # integers compare exactly, no tolerance
        ("2 pi", "2"),  # "pi" is not a unit
    ],
)
def test_not_equal(a: str, b: str) -> None:
    assert not answers_equal(a, b)
    assert verify_math(f"\\boxed{{{a}}}", b).reason == "not_equal"


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("52_8", "42", True),
        ("52_{8}", "52_8", True),
        ("101_2", "5", True),
        ("1A_{16}", "26", True),
        ("52_{10}", "52", True),
        ("52", "52_8", False),  # a bare number is base 10
        ("52_8", "52_9", False),
        ("19_8", "19", False),  # 9 is no base-8 digit
        ("\\sqrt{1764}", "52_8", True),  # math-verify sees 42
    ],
)
def test_base_subscripts(a: str, b: str, equal: bool) -> None:
    assert answers_equal(a, b) is equal


def test_hedged_answers_are_not_equal() -> None:
    """`answers_equal` (which CLEAR uses too) refuses a hedge math-verify would credit."""
    assert not answers_equal("\\frac{1}{2} \\text{ to } \\frac{3}{4}", "\\frac{1}{2}")
    assert not answers_equal("18 \\text{ or more}", "18")
    assert not answers_equal("18 plus 1", "18")
    assert answers_equal("1 \\pm \\sqrt{19}", "1 \\pm \\sqrt{19}")  # the reference's own form
    assert answers_equal("\\{1, 2\\}", "\\{2, 1\\}")
    assert verify_math("\\boxed{18 or 19}", "18").reason == "ambiguous"
    # "1/7919" sits on no honest row: the hedge is what makes these fail
    assert verify_math("\\boxed{1/7919} or \\boxed{18}", "18").reason == "ambiguous"


def test_last_number_fallback_sees_hedges() -> None:
    assert verify_math("so it is 18", "18", allow_last_number=True).correct
    verdict = verify_math("so it is 17 or 18", "18", allow_last_number=True)
    assert verdict == Verdict(correct=False, extracted="18", reason="ambiguous")


def test_compare_units_option() -> None:
    """Units are ignored by default; `compare_units` compares them when both sides have one."""
    response, reference = "\\boxed{864 inches^3}", "864 \\mbox{ inches}^2"
    assert verify_math(response, reference).correct
    assert verify_math(response, reference, compare_units=True) == Verdict(
        correct=False, extracted="864 inches^3", reason="wrong_unit"
    )
    strict = MathVerifier(compare_units=True)
    assert strict("\\boxed{864 \\text{ inches}^2}", reference).correct  # same unit
    assert strict("\\boxed{5 inch}", "5 inches").correct  # plural -s
    assert strict("\\boxed{5 feet}", "5 foot").correct
    assert strict("\\boxed{5}", "5 cm").correct  # one side without a unit: numbers only
    assert strict("The answer is $5.", "5 dollars").correct  # a currency sign is no unit
    assert strict("\\boxed{5 cm}", "5 m").reason == "wrong_unit"
    assert strict("\\boxed{5 cm}", "5 centimeters").reason == "wrong_unit"  # as written
    assert not answers_equal("5 cm", "5 m", compare_units=True)
    assert answers_equal("5 cm", "5 m")
    assert get_verifier("math", compare_units=True) == strict
    with pytest.raises(TypeError, match="compare_units"):
        MathVerifier(compare_units="yes")  # type: ignore[arg-type]


def test_tolerance_is_configurable() -> None:
    assert not answers_equal("3.1416", "\\pi")
    assert answers_equal("3.1416", "\\pi", rel_tol=1e-5)
    assert not answers_equal("100.5", "100", rel_tol=1e-3)
    assert answers_equal("100.05", "100", rel_tol=1e-3)
    assert not answers_equal("0.3333333", "1/3", rel_tol=0.0)
    with pytest.raises(ValueError, match="rel_tol"):
        answers_equal("1", "1", rel_tol=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)


def test_verdict_reasons() -> None:
    assert verify_math("The answer is 72.", "blah\n#### 72") == Verdict(
        correct=True, extracted="72", reason="equal"
    )
    assert verify_math("The answer is 71.", "#### 72") == Verdict(
        correct=False, extracted="71", reason="not_equal"
    )
    assert verify_math("I don't know.", "72").reason == "no_answer"
    assert verify_math("The answer is 72.", "   ").reason == "bad_reference"
    assert verify_math("The answer is 72.", "\\boxed{}").reason == "bad_reference"
    assert verify_math("\\boxed{\\frac{1}{2}}", "The answer is $0.5$.").correct


def test_math_verifier_and_get_verifier() -> None:
    verifier = get_verifier("math", allow_last_number=True, rel_tol=1e-4)
    assert isinstance(verifier, MathVerifier)
    assert verifier("so 3.14159", "\\pi").correct
    clone = pickle.loads(pickle.dumps(verifier))
    assert clone == verifier
    assert clone("so 3.14159", "\\pi").correct
    with pytest.raises(ValueError, match=r"unknown verifier 'maths'.*'math', 'code'"):
        get_verifier("maths")
    with pytest.raises(TypeError, match="'tolerance'"):
        get_verifier("math", tolerance=0.1)


def test_get_verifier_code() -> None:
    code = pytest.importorskip("gristmill.verify.code")
    assert isinstance(get_verifier("code"), code.CodeVerifier)


# ---------------------------------------------------------------------------- GSM8K data


def _gsm8k(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path", [DATA, SLICE], ids=["tests-data-20", "recipes-data-200"])
def test_gsm8k_answers_verify_against_themselves(path: Path) -> None:
    rows = _gsm8k(path)
    assert len(rows) in (20, 200)
    for i, row in enumerate(rows):
        final = row["answer"].rsplit("####", 1)[1].strip()
        assert extract_answer(row["answer"]) == final, i
        verdict = verify_math(f"#### {final}", row["answer"])
        assert verdict.correct, (i, verdict)
        assert verify_math(f"The answer is {final}.", row["answer"]).correct, i
        wrong = verify_math(f"The answer is {final}1.", row["answer"])
        assert wrong.reason == "not_equal", (i, wrong)


# ---------------------------------------------------------------------------- threads, timeouts


def test_concurrent_calls_from_threads() -> None:
    """Many threads at once, mixing the in-process path and the helper processes."""
    cases = [
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", True),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
        ("The answer is 1,000.", "#### 1000", True),
        ("\\boxed{\\{3, 1\\}}", "\\{1, 3\\}", True),
        ("The answer is 12.", "21", False),
    ] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        verdicts = list(pool.map(lambda c: verify_math(c[0], c[1]), cases))
    assert [v.correct for v in verdicts] == [c[2] for c in cases]


def test_timeout_off_the_main_thread() -> None:
    """A pathological answer times out inside worker threads, and the checker keeps working."""
    results: dict[str, Verdict] = {}

    def check(name: str, response: str, reference: str) -> None:
        results[name] = verify_math(response, reference, timeout_s=1.5)

    jobs = [
        threading.Thread(target=check, args=("slow", f"\\boxed{{{SLOW}}}", "1")),
        threading.Thread(target=check, args=("fast", "\\boxed{\\sqrt{4}}", "2")),
    ]
    started = time.monotonic()
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert time.monotonic() - started < 60
    assert results["slow"] == Verdict(correct=False, extracted=SLOW, reason="timeout")
    assert results["fast"].correct
    assert not answers_equal(SLOW, "1", timeout_s=0.5)
    # the killed helper was replaced: later calls still work
    assert verify_math("\\boxed{\\frac{\\sqrt{8}}{2}}", "\\sqrt{2}").correct


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_works_inside_child_processes(method: str) -> None:
    """Daemonic pool workers (which may not start multiprocessing children) and forked
    children (which must not reuse the parent's helpers) both get working checkers."""
    import multiprocessing

    assert verify_math("\\boxed{\\sqrt{4}}", "2").correct  # the parent's helpers are warm
    cases = [
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}"),
        ("The answer is 1,000.", "#### 1000"),
    ]
    with multiprocessing.get_context(method).Pool(2) as pool:
        verdicts = pool.starmap(verify_math, cases)
    assert [v.reason for v in verdicts] == ["equal", "not_equal", "equal"]
    assert verify_math("\\boxed{\\sqrt{9}}", "3").correct  # and the parent's still work


def test_dead_helper_is_replaced() -> None:
    """A helper killed from outside (OOM killer, an operator) costs a restart, not a verdict."""
    import os
    import signal

    from gristmill.verify.math import _pool

    assert verify_math("\\boxed{\\sqrt{4}}", "2").correct  # at least one warm helper
    pool = _pool()
    with pool.cond:
        victims = list(pool.idle)
    assert victims
    for worker in victims:
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
    verdicts = [verify_math("\\boxed{\\sqrt{9}}", "3") for _ in range(len(victims) + 1)]
    assert all(v.reason == "equal" for v in verdicts), verdicts
    with pool.cond:
        assert all(w.alive() for w in pool.idle)
