"""The built-in arithmetic word problems: determinism, correct answers, level balance, records."""

from __future__ import annotations

import re
from collections import Counter

import polars as pl
import pytest

from gristmill.records import validate_frame
from gristmill.synth.arith import (
    ANSWER_INSTRUCTION,
    ArithProblem,
    generate_problems,
    problems_frame,
)
from gristmill.verify.math import verify_math

# An independent reading of the stories: each sentence's wording names its operation.
_GROUPED = re.compile(
    r"(\d+) [a-z]+ (?:with|of [a-z ]+, and every [a-z]+ holds|in \w+'s room, each holding) (\d+)"
)
_ONE_SENTENCE = re.compile(r"has (\d+) [a-z ]+ and (.*)")
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"sells all of the .* for (\d+) dollars each"), "mul"),
    (re.compile(r"(\d+) times as"), "mul"),
    (re.compile(r"\bdoubles\b"), "mul2"),
    (re.compile(r"\btriples\b"), "mul3"),
    (re.compile(r"gives away half"), "div2"),
    (re.compile(r"into (\d+) equal groups"), "div"),
    (re.compile(r"among (\d+) people"), "div"),
    (re.compile(r"(\d+) more\b|gets (\d+) [a-z ]+ as a present"), "add"),
    (re.compile(r"gives (\d+) [a-z ]+ to|uses (\d+) of|(\d+) of the [a-z ]+ get lost"), "sub"),
    (re.compile(r"sells (\d+) of|gives (\d+) of them away|loses (\d+) of them"), "sub"),
]


def _number(match: re.Match[str]) -> int:
    return int(next(g for g in match.groups() if g is not None))


def _apply(value: int, sentence: str) -> tuple[int, bool]:
    """`value` after the operation the sentence tells; (value, False) if it tells none."""
    for pattern, op in _RULES:
        m = pattern.search(sentence)
        if m is None:
            continue
        match op:
            case "add":
                return value + _number(m), True
            case "sub":
                assert _number(m) < value, sentence
                return value - _number(m), True
            case "mul":
                return value * _number(m), True
            case "mul2" | "mul3":
                return value * int(op[-1]), True
            case "div" | "div2":
                k = 2 if op == "div2" else _number(m)
                assert value % k == 0, (value, sentence)
                return value // k, True
    return value, False


def solve(question: str) -> tuple[int, int]:
    """(answer, number of operations) computed from the question's text alone."""
    sentences = re.split(r"(?<=[.?])\s+", question)
    first, rest = sentences[0], sentences[1:]
    assert rest[-1].endswith("?"), question
    grouped = _GROUPED.search(first)
    one = _ONE_SENTENCE.search(first)
    if grouped:
        value, steps = int(grouped.group(1)) * int(grouped.group(2)), 1
    elif one:
        value, changed = _apply(int(one.group(1)), one.group(2))
        assert changed, first
        steps = 1
    else:
        value, steps = int(re.findall(r"\d+", first)[0]), 0
    for sentence in rest:
        value, changed = _apply(value, sentence)
        steps += changed
        assert value > 0, question
    return value, steps


def test_answers_match_the_story() -> None:
    problems = generate_problems(500, seed=3)
    for p in problems:
        answer, steps = solve(p.question)
        assert (str(answer), steps) == (p.answer, p.steps), p


def test_levels_are_balanced_and_graded() -> None:
    problems = generate_problems(100, seed=0)
    assert [p.level for p in problems[:10]] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert Counter(p.level for p in problems) == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20}
    steps = {level: {p.steps for p in problems if p.level == level} for level in range(1, 6)}
    assert steps[1] == {1} and steps[2] == {1} and steps[3] == {2} and steps[4] == {3}
    assert min(steps[5]) >= 4
    biggest = {level: max(int(p.answer) for p in problems if p.level == level) for level in (1, 5)}
    assert biggest[1] <= 10 < 1000 < biggest[5]
    chosen = generate_problems(7, seed=0, levels=[2, 4])
    assert [p.level for p in chosen] == [2, 4, 2, 4, 2, 4, 2]


def test_deterministic_for_a_seed() -> None:
    a = generate_problems(30, seed=7)
    assert a == generate_problems(30, seed=7)
    assert a[:10] == generate_problems(10, seed=7)  # a larger n extends a smaller one
    b = generate_problems(30, seed=8)
    assert sum(x.question != y.question for x, y in zip(a, b, strict=True)) > 20
    questions = [p.question for p in generate_problems(300, seed=0, levels=[1])]
    assert len(set(questions)) == len(questions)
    assert len({q.split()[0] for q in questions}) > 5  # varied names


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level must be one of"):
        generate_problems(3, levels=[1, 6])
    with pytest.raises(ValueError, match="at least one level"):
        generate_problems(3, levels=[])
    with pytest.raises(ValueError, match="non-negative"):
        generate_problems(-1)
    assert generate_problems(0) == []


def test_problems_frame() -> None:
    problems = generate_problems(10, seed=2)
    frame = problems_frame(problems)
    validate_frame(frame, "arith")
    assert frame.schema["level"] == pl.Int64()
    assert frame["source"].unique().to_list() == ["arith"]
    assert frame["reference"].to_list() == [p.answer for p in problems]
    assert frame["prompt"].to_list() == [p.question for p in problems]
    assert frame["messages"][0].to_list() == [{"role": "user", "content": problems[0].question}]
    assert frame["level"].to_list() == [p.level for p in problems]
    assert frame["id"].n_unique() == 10
    empty = problems_frame([])
    assert empty.height == 0 and empty.schema["level"] == pl.Int64()


def test_references_verify() -> None:
    """The stored reference checks out against a solution that states it (and not off by one)."""
    frame = problems_frame(generate_problems(10, seed=4))
    for ref in frame["reference"]:
        assert verify_math(f"So the total is computed.\nThe answer is {ref}.", ref).correct
        assert not verify_math(f"The answer is {int(ref) + 1}.", ref).correct
    assert "The answer is" in ANSWER_INSTRUCTION


def test_problem_is_frozen() -> None:
    p = ArithProblem(question="q", answer="1", level=1, steps=1)
    with pytest.raises(AttributeError):
        p.level = 2  # type: ignore[misc]
