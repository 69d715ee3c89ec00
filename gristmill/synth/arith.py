"""Built-in arithmetic word problems with graded difficulty and exact integer answers.

A source of verifiable math prompts that needs no dataset: recipes name it as
`input: {generator: arith}` and rejection sampling / DART check answers with
`gristmill.verify.math`. Each problem is a short story (our own wording) about a person and
a pile of things, changed by a chain of operations; every intermediate value is a positive
integer and every division is exact.

Levels (more operations, bigger numbers, longer stories), tuned so that the bundled
SmolLM2-135M-Instruct solves level 1 about half the time and level 5 almost never:
1. one addition or subtraction of single-digit numbers (result at most 10), in one sentence;
2. one step: a two-digit number and a single-digit change, or a single-digit multiplication;
3. two steps (additions, subtractions, doubling or tripling), small numbers;
4. three steps, always with a multiplication or an exact division;
5. four to six steps with two- and three-digit numbers, a multiplication and a division.

Generation is deterministic: problem `i` is drawn from a generator seeded by (`seed`, `i`)
(drawn again if it repeats an earlier question), so a larger `n` extends a smaller one.
`reference` holds the bare integer answer ("42"); `verify_math` reads it as is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl

from gristmill.records import make_record, records_frame

#: What solvers are asked to end with; append it to a question (DART and tests reuse it).
ANSWER_INSTRUCTION = (
    '\nWrite the calculation first, then finish with "The answer is" and the number.'
)
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
SOURCE = "arith"


@dataclass(frozen=True, kw_only=True)
class ArithProblem:
    """One word problem: its text, exact integer answer (as a string), level and step count."""

    question: str
    answer: str
    level: int
    steps: int


# --------------------------------------------------------------------------------------------
# Story pieces (our own wording)
# --------------------------------------------------------------------------------------------

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Omar", "he"),
    ("Lena", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Kenji", "he"),
    ("Nora", "she"),
    ("Tomas", "he"),
    ("Priya", "she"),
    ("Sam", "he"),
    ("Chloe", "she"),
    ("Diego", "he"),
    ("Hana", "she"),
    ("Felix", "he"),
)

#: (thing, container plural, container singular)
_THINGS: tuple[tuple[str, str, str], ...] = (
    ("apples", "baskets", "basket"),
    ("marbles", "jars", "jar"),
    ("stickers", "sheets", "sheet"),
    ("cookies", "boxes", "box"),
    ("pencils", "packs", "pack"),
    ("books", "shelves", "shelf"),
    ("seashells", "buckets", "bucket"),
    ("stamps", "albums", "album"),
    ("toy cars", "crates", "crate"),
    ("cupcakes", "trays", "tray"),
    ("beads", "bags", "bag"),
    ("eggs", "cartons", "carton"),
    ("crayons", "tins", "tin"),
    ("postcards", "envelopes", "envelope"),
)

_START_PLAIN = (
    "{Name} has {a} {things}.",
    "{Name} starts the day with {a} {things}.",
    "There are {a} {things} in {name}'s room.",
    "{Name} owns a collection of {a} {things}.",
)
_START_GROUPED = (
    "{Name} has {g} {containers} with {e} {things} in each {container}.",
    "{Name} buys {g} {containers} of {things}, and every {container} holds {e} {things}.",
    "There are {g} {containers} in {name}'s room, each holding {e} {things}.",
)
_ADD = (
    "{Name} buys {x} more {things}.",
    "{Friend} gives {name} {x} more {things}.",
    "Then {pronoun} finds {x} more {things}.",
    "Later, {name} gets {x} {things} as a present.",
)
_SUB = (
    "{Name} gives {x} {things} to {friend}.",
    "Then {pronoun} uses {x} of the {things}.",
    "Sadly, {x} of the {things} get lost.",
    "{Name} sells {x} of the {things}.",
)
_MUL = (
    "Then the number of {things} {name} has becomes {k} times as large.",
    "Later, {name} collects more until {pronoun} has {k} times as many {things} as before.",
)
_MUL_WORDS = {2: "doubles", 3: "triples"}
_MUL_NAMED = "Then {name} {verb} the number of {things} {pronoun} has."
_DIV = (
    "{Name} splits the {things} into {k} equal groups and keeps only one group.",
    "{Name} shares the {things} equally among {k} people, {self_word} included, "
    "and keeps {poss} own share.",
)
_HALF = "{Name} gives away half of the {things}."
#: One-sentence stories for level 1: the start and its single change together.
_ONE_STEP = {
    "add": (
        "{Name} has {a} {things} and {friend} gives {obj} {x} more.",
        "{Name} has {a} {things} and buys {x} more.",
        "{Name} has {a} {things} and finds {x} more.",
    ),
    "sub": (
        "{Name} has {a} {things} and gives {x} of them away.",
        "{Name} has {a} {things} and loses {x} of them.",
        "{Name} has {a} {things} and sells {x} of them.",
    ),
}
#: The question, by the last operation: "in total" after adding, "left" after taking away.
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "add": (
        "How many {things} does {name} have in total?",
        "In total, how many {things} does {name} have?",
    ),
    "sub": (
        "How many {things} does {name} have left?",
        "How many {things} are left?",
    ),
    "other": (
        "How many {things} does {name} have now?",
        "How many {things} does {name} have at the end?",
        "In the end, how many {things} does {name} have?",
    ),
}
_TOTAL_QUESTION = "How many {things} does {name} have in all?"
_SELL = "{Name} then sells all of the {things} for {p} dollars each."
_SELL_QUESTION = "How many dollars does {name} get?"

Op = Literal["add", "sub", "mul", "div"]


@dataclass(frozen=True, kw_only=True)
class _Ranges:
    """Number ranges of one level (inclusive)."""

    plain: tuple[int, int]
    grouped: tuple[int, int, int, int]  # groups lo, hi; items-per-group lo, hi
    add: tuple[int, int]
    k: tuple[int, int]  # multipliers and divisors
    cap: int  # largest allowed intermediate value


_RANGES: dict[int, _Ranges] = {
    1: _Ranges(plain=(2, 9), grouped=(2, 3, 2, 3), add=(1, 8), k=(2, 2), cap=10),
    2: _Ranges(plain=(11, 30), grouped=(2, 5, 2, 9), add=(2, 9), k=(2, 2), cap=40),
    3: _Ranges(plain=(5, 20), grouped=(2, 5, 2, 6), add=(2, 9), k=(2, 3), cap=60),
    4: _Ranges(plain=(6, 40), grouped=(2, 6, 2, 8), add=(2, 20), k=(2, 5), cap=200),
    5: _Ranges(plain=(100, 999), grouped=(10, 30, 10, 40), add=(20, 400), k=(2, 12), cap=20000),
}


class _Retry(Exception):
    """The drawn operation does not fit the current value; draw the story again."""


@dataclass(frozen=True, kw_only=True)
class _Cast:
    """The names and things of one story."""

    name: str
    pronoun: str
    friend: str
    things: str
    containers: str
    container: str

    def fill(self, template: str, **values: int | str) -> str:
        """`template` with this story's names and the given numbers filled in."""
        text = template.format(
            Name=self.name,
            name=self.name,
            pronoun=self.pronoun,
            Pronoun=self.pronoun.capitalize(),
            Friend=self.friend,
            friend=self.friend,
            things=self.things,
            containers=self.containers,
            container=self.container,
            self_word="herself" if self.pronoun == "she" else "himself",
            poss="her" if self.pronoun == "she" else "his",
            obj="her" if self.pronoun == "she" else "him",
            **values,
        )
        return text[0].upper() + text[1:]


def _cast(rng: random.Random) -> _Cast:
    (name, pronoun), (friend, _) = rng.sample(_PEOPLE, 2)
    things, containers, container = rng.choice(_THINGS)
    return _Cast(
        name=name,
        pronoun=pronoun,
        friend=friend,
        things=things,
        containers=containers,
        container=container,
    )


def _pick(rng: random.Random, templates: Sequence[str], used: set[str]) -> str:
    """A template not used yet in this story (any one once all are used)."""
    fresh = [t for t in templates if t not in used] or list(templates)
    choice = rng.choice(fresh)
    used.add(choice)
    return choice


def _apply(
    op: Op, value: int, r: _Ranges, cast: _Cast, rng: random.Random, used: set[str]
) -> tuple[int, str]:
    """One operation on `value`: the new value and the sentence that tells it."""
    match op:
        case "add":
            x = rng.randint(*r.add)
            if value + x > r.cap:
                raise _Retry
            return value + x, cast.fill(_pick(rng, _ADD, used), x=x)
        case "sub":
            hi = min(r.add[1], value - 1)
            if hi < r.add[0]:
                raise _Retry
            x = rng.randint(r.add[0], hi)
            return value - x, cast.fill(_pick(rng, _SUB, used), x=x)
        case "mul":
            k = rng.randint(*r.k)
            if value * k > r.cap:
                raise _Retry
            if k in _MUL_WORDS and _MUL_NAMED not in used and rng.random() < 0.5:
                used.add(_MUL_NAMED)
                return value * k, cast.fill(_MUL_NAMED, verb=_MUL_WORDS[k])
            return value * k, cast.fill(_pick(rng, _MUL, used), k=k)
        case "div":
            divisors = [k for k in range(r.k[0], r.k[1] + 1) if value % k == 0 and value > k]
            if not divisors:
                raise _Retry
            k = rng.choice(divisors)
            if k == 2 and _HALF not in used and rng.random() < 0.5:
                used.add(_HALF)
                return value // 2, cast.fill(_HALF)
            return value // k, cast.fill(_pick(rng, _DIV, used), k=k)


def _one_step(op: Op, r: _Ranges, cast: _Cast, rng: random.Random) -> tuple[int, list[str]]:
    """The opening of an easy story: one sentence with the start value and its first change."""
    a = rng.randint(*r.plain)
    if op == "add":
        hi = min(r.add[1], r.cap - a)
        if hi < r.add[0]:
            raise _Retry
        x = rng.randint(r.add[0], hi)
        return a + x, [cast.fill(rng.choice(_ONE_STEP["add"]), a=a, x=x)]
    hi = min(r.add[1], a - 1)
    if hi < r.add[0]:
        raise _Retry
    x = rng.randint(r.add[0], hi)
    return a - x, [cast.fill(rng.choice(_ONE_STEP["sub"]), a=a, x=x)]


def _plan(level: int, rng: random.Random) -> tuple[bool, list[Op], bool]:
    """(grouped start?, the operations, sell at the end?) for one problem of `level`."""
    addsub: list[Op] = ["add", "sub"]
    match level:
        case 1:
            return False, [rng.choice(addsub)], False
        case 2:
            if rng.random() < 0.5:
                return True, [], False
            return False, [rng.choice(addsub)], False
        case 3:
            if rng.random() < 0.4:
                return True, [rng.choice(addsub)], False
            ops: list[Op] = [rng.choice(addsub), rng.choice([*addsub, "mul"])]
            rng.shuffle(ops)
            return False, ops, False
        case 4:
            grouped = rng.random() < 0.4
            ops = [rng.choice(["mul", "div"]), rng.choice([*addsub, "div"])]
            if not grouped:
                ops.append(rng.choice(addsub))
            rng.shuffle(ops)
            return grouped, ops, False
        case 5:
            grouped = rng.random() < 0.5
            ops = ["mul", "div", rng.choice(addsub), rng.choice(addsub)]
            if not grouped and rng.random() < 0.5:
                ops.append(rng.choice(addsub))
            rng.shuffle(ops)
            sell = rng.random() < 0.3
            return grouped, ops, sell
        case _:
            raise ValueError(f"arith level must be one of {list(LEVELS)}, got {level!r}")


def _problem(level: int, rng: random.Random) -> ArithProblem:
    """One problem of `level`, drawn again until every step fits the level's ranges."""
    r = _RANGES[level]
    for _ in range(1000):
        grouped, ops, sell = _plan(level, rng)
        cast = _cast(rng)
        try:
            used: set[str] = set()
            rest = ops
            if grouped:
                g, e = rng.randint(r.grouped[0], r.grouped[1]), rng.randint(*r.grouped[2:])
                value, sentences = g * e, [cast.fill(rng.choice(_START_GROUPED), g=g, e=e)]
            elif level <= 3 and ops[0] in ("add", "sub"):  # easy levels open in one sentence
                value, sentences = _one_step(ops[0], r, cast, rng)
                rest = ops[1:]
            else:
                value = rng.randint(*r.plain)
                sentences = [cast.fill(rng.choice(_START_PLAIN), a=value)]
            for op in rest:
                value, sentence = _apply(op, value, r, cast, rng, used)
                sentences.append(sentence)
        except _Retry:
            continue
        if sell:
            p = rng.randint(2, 15)
            value *= p
            sentences += [cast.fill(_SELL, p=p), cast.fill(_SELL_QUESTION)]
        elif not ops:
            sentences.append(cast.fill(_TOTAL_QUESTION))
        else:
            last = ops[-1] if ops[-1] in ("add", "sub") else "other"
            sentences.append(cast.fill(rng.choice(_QUESTIONS[last])))
        steps = len(ops) + int(grouped) + int(sell)
        return ArithProblem(
            question=" ".join(sentences), answer=str(value), level=level, steps=steps
        )
    raise RuntimeError(f"could not draw an arith problem of level {level}")  # pragma: no cover


def generate_problems(
    n: int, *, seed: int = 0, levels: Sequence[int] = LEVELS
) -> list[ArithProblem]:
    """`n` problems cycling through `levels` (round-robin), deterministic for `seed`.

    Questions are distinct within one call.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels must name at least one level")
    for level in levels:
        if isinstance(level, bool) or level not in LEVELS:
            raise ValueError(f"arith level must be one of {list(LEVELS)}, got {level!r}")
    problems: list[ArithProblem] = []
    seen: set[str] = set()
    for i in range(n):
        level = levels[i % len(levels)]
        for attempt in range(100):
            rng = random.Random(f"arith:{seed}:{i}:{attempt}")
            problem = _problem(level, rng)
            if problem.question not in seen:
                break
        else:  # pragma: no cover - level 1 alone has thousands of distinct stories
            raise RuntimeError(f"could not draw a new level-{level} problem for row {i}")
        seen.add(problem.question)
        problems.append(problem)
    return problems


def problems_frame(problems: Sequence[ArithProblem]) -> pl.DataFrame:
    """Records for `problems`: the question as the user turn, the bare integer answer
    (e.g. "42") as `reference`, source "arith", and an int64 `level` column."""
    rows = [
        make_record(
            [{"role": "user", "content": p.question}],
            source=SOURCE,
            reference=p.answer,
            level=p.level,
        )
        for p in problems
    ]
    return records_frame(rows, extra_schema={"level": pl.Int64()})
