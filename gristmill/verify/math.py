"""Math answer checking: pull the final answer out of a solution, then test equivalence.

Extraction (`extract_answer`), in order: the last `\\boxed{...}` / `\\fbox{...}` (nested
braces), GSM8K's `#### x`, the last answer phrase ("The answer is x", "Final answer: x",
"x is the answer", "..., which is the answer"), and (only when asked) the last number in
the text. A phrase ending in a calculation ("The answer is 14 + 3 = 17.") gives its result,
and `\\$` inside `$...$` is a dollar sign, not the end of the span.

One final answer only (`verify_math`, reason "ambiguous"): a response is not credited when
its final-answer statements (every box, `#### x` and answer phrase; not the numbers of the
working, nor "if the answer is x") name two different values, or when one of them names
several candidates where the reference names one: `18 or 19`, `either 18 or 19`,
`18 or more`, ranges (`18 to 28`, `18-28`, `between 18 and 28`, `18 \\pm 1`), a second
number or an operator after the number (`18 plus 1`, `18 times 3`, `18 not 19`, `18 + 1`,
`18 apples 19 pears`), or a next sentence or line that opens with another candidate
(`The answer is 18. Or 19.`, `\\boxed{18}; or maybe 19`). The same value stated twice is
fine, and so is whatever the reference itself uses: lists, tuples and intervals against such
a reference, `\\pm` against `\\pm`.

Equivalence (`answers_equal`) has two paths. Plain numbers (integers, decimals, `1,000`,
`a/b`, `\\frac{a}{b}`, `50%`, `$5`, `5 dollars`, `1e-3`, `52_8`) are decided in-process with
exact fractions, no sympy: that covers almost every GSM8K and arithmetic answer. Everything
else (LaTeX expressions, sets, intervals, radicals...) goes to the `math-verify` package, run
with its own signal-based timeouts disabled inside a small pool of helper processes, each call
under a wall-clock limit (`timeout_s`); a call that runs over kills its helper and counts
as not equal (reason "timeout"). `signal.alarm` only works on the main thread, so this is
what makes the checker safe in Prefect task threads, Dask workers and thread pools.

Conventions:
- Integers and fractions compare exactly; when either side is written as a decimal (or in
  scientific notation) it is an approximation and the two agree within `rel_tol` (relative).
- Percentages follow math-verify: `50%` equals both `0.5` and `50` (word problems ask "what
  percent" and expect `50`); two percentages compare as they are written (`50%` != `0.5%`).
- Thousands separators must be well formed: `1,000` is 1000, `1.000` is 1, `1,5` is not a
  number to this path (math-verify reads it as the set {1, 5}).
- A base subscript gives the base: `52_8` and `52_{8}` are 42, `101_2` is 5, a bare number is
  base 10 (so `52` != `52_8`); a digit the base lacks (`19_8`) makes no number at all.
- Units after a number are ignored by design (`864 inches^3` equals `864 inches^2`,
  `5 \\text{ cm}` equals 5), and so is a leading currency sign. A unit is words (`cm`,
  `dollars`, `km/h`, `cm^2`), never another number or a joining word (`or`, `to`, `plus`...).
  With `compare_units=True`, two plain numbers that both carry a unit must also carry the
  same one (else reason "wrong_unit"); units compare as written up to case, spacing, LaTeX
  `\\text{}` and a plural `-s`/`-es` (`inch` = `inches`, but `cm` != `centimeters`).
  Compound quantities (`1 hour 30 minutes`) read as two values.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

from gristmill.verify.base import Verdict

Outcome = Literal[
    "equal", "not_equal", "ambiguous", "wrong_unit", "bad_reference", "timeout", "error"
]

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")
# "answer is", "answer:", "Answer =": the word "answer" alone ("I will answer...") is not enough.
_ANSWER_PHRASE = re.compile(
    r"(?<![/\w])answer\b[ \t]*(?:\*\*|__)?[ \t]*(?:is\b[ \t]*:?|:|=)[ \t]*(?:\*\*|__)?",
    re.IGNORECASE,
)
# "18 is the answer", "..., which is the final answer": the value comes before.
_ANSWER_AFTER = re.compile(
    r"(?:,?[ \t]*\bwhich)?[ \t]+(?:is|was)[ \t]+(?:the|our|my)[ \t]+(?:final[ \t]+|correct[ \t]+)?"
    r"answer\b(?![ \t]*\?)",
    re.IGNORECASE,
)
# Answer statements that are not final: "if the answer is 15, ...", "we check our answer: ...".
_HYPOTHETICAL = re.compile(
    r"\b(?:if|whether|suppose|supposing|assume|assuming|unless|check|checking|verify)\b",
    re.IGNORECASE,
)
_NOT_FINAL = re.compile(r"\b(?:partial|intermediate|wrong|incorrect)[ \t]+$", re.IGNORECASE)
# What a value starts with (a phrase clause "First we add..." is prose, not an answer).
_VALUE_START = re.compile(r"(?:either|between|from)?[ \t]*[-+−(\[{\\$€£.\d]", re.IGNORECASE)
_BOX_TOKEN = re.compile(r" +([^\s${}]+)")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|(?<!\\)[;!?](?=\s|$)")  # `\!`, `\;`: LaTeX spacing
_NUMBER_TEXT = (
    r"[-+]?\s*(?:\\\$|\$|€|£)?\s*[-+]?\s*"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+)?(?:\s*\\?%)?"
)
# A number followed by prose ("42 apples because ...", "42, since ..."): keep the number.
_NUMBER_THEN_PROSE = re.compile(rf"({_NUMBER_TEXT})(?:\s+|,\s+)(?=[A-Za-z]{{2}})")
_LAST_NUMBER = re.compile(r"(-?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(\s*%)?")
_MATH_WORDS = frozenset(
    {"pi", "sqrt", "infty", "inf", "infinity", "ln", "log", "sin", "cos", "tan", "exp", "mod"}
)
# A second candidate right after a value: "\boxed{18} or 19", "$18$ to $28$", "18 plus 1"
# ("18, and 8 + 2 = 10 is the total" goes on; "and" and "not" count without a comma only).
_HEDGE_CORE = (
    r"[ \t]*(?:\$|\\\)|\\\])?[ \t]*\(?[ \t]*"
    r"(?:,?[ \t]*\b(?:or|nor)\b"
    r"|(?:,?[ \t]*\b(?:to|through|thru|till|until|versus|vs|plus|minus|times)|\b(?:and|not))"
    r"\b\.?[ \t]*(?:[A-Za-z]+[ \t]+)?(?:\$|\\\(|\\boxed\{|\\fbox\{)?"
    r"[ \t]*[-+]?[ \t]*(?:\\\$|\$)?\d)"
)
_HEDGE_AFTER = re.compile(_HEDGE_CORE, re.IGNORECASE)
_HEDGE_TAIL = re.compile(rf"(?:[ \t]+[A-Za-z]+\b){{0,2}}?{_HEDGE_CORE}", re.IGNORECASE)
# A second candidate opening the next sentence or line: "The answer is 18. Or 19.",
# "\boxed{18}; or maybe 19", "#### 18\nor 19".
_HEDGE_NEXT = re.compile(
    r"[ \t]*(?:\$\$|\$|\\\)|\\\])?[ \t]*(?:\*\*|__)?[ \t]*(?:[.;!?]|(?=\n))[ \t\n]*(?:\*\*|__)?"
    r"\b(?:or|nor)\b[ \t]*(?:[A-Za-z]+[ \t]+){0,2}(?:\$|\\\(|\\boxed\{|\\fbox\{|\*\*|__)?"
    r"[ \t]*[-+]?[ \t]*(?:\\\$|\$)?\d",
    re.IGNORECASE,
)
# "16 or 17 books, which is the answer": a candidate right before the last number.
_HEDGE_BEFORE = re.compile(
    r"\d[^\d\n]{0,25}?\b(?:or|nor|to|through)\b[ \t]*(?:[A-Za-z]+[ \t]+)?[-+]?(?:\\?\$)?$",
    re.IGNORECASE,
)
# A math span closing a clause, maybe followed by a few words: "we get $x = 5$ dollars".
_SPAN_AT_END = re.compile(
    r"(?:\$(?P<dollar>(?:[^$\\]|\\.)+)\$|\\\((?P<paren>.+?)\\\))(?:[ \t]+[A-Za-z]+){0,3}[ \t,]*$"
)
# A dollar that opens "$5 for each": a currency sign, not a math span.
_CURRENCY_START = re.compile(r"\$\s*\d[\d,.]*\s+[A-Za-z]")
_VARIABLE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?")
_EQUALS = re.compile(r"(?<![<>!=\\])=(?!=)")
# A clause that opens with a calculation: "14 + 3", "15 gallons * 8 pints", "$5 \times 3".
_CALCULATION = re.compile(
    r"[-+]?(?:\\?\$)?\d[\d,.]*[ \t]*(?:[A-Za-z]{2,}[ \t]*)?(?:[-+*/×÷^]|\\times|\\cdot|\\div)"
)


@dataclass(frozen=True, kw_only=True)
class _Statement:
    """One final-answer statement in a text: where it starts, how it is marked, what it says."""

    start: int
    kind: Literal["boxed", "hashes", "phrase"]
    answer: str
    #: Whether it counts for the one-answer check (a value, not prose or a condition).
    counted: bool
    #: Whether another candidate follows it outside the statement ("\\boxed{18} or 19").
    hedged: bool = False


def _scan_group(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at `start`, or None when it never closes."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # `\{` and `\}` are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, contents) of every complete, outermost `\\boxed{...}` / `\\fbox{...}`."""
    found: list[tuple[int, int, str]] = []
    for command in _BOX_COMMANDS:
        start = text.find(command)
        while start != -1:
            i = start + len(command)
            if text.startswith("{", i):
                end = _scan_group(text, i)
                if end is not None:
                    found.append((start, end, text[i + 1 : end - 1]))
            elif token := _BOX_TOKEN.match(text, i):  # `\boxed 5`: one token
                found.append((start, token.end(), token.group(1)))
            start = text.find(command, start + 1)
    outermost: list[tuple[int, int, str]] = []
    reach = -1
    for start, end, body in sorted(found):
        if start >= reach:  # not inside the previous box
            outermost.append((start, end, body))
            reach = end
    return outermost


def _boxed_contents(text: str) -> list[str]:
    """The contents of every complete, outermost `\\boxed{...}` / `\\fbox{...}`, in order."""
    return [body for _, _, body in _boxes(text)]


def _strip_wrappers(answer: str) -> str:
    """Drop emphasis, math delimiters and trailing punctuation around an answer."""
    s = answer.strip()
    previous = None
    while s != previous:
        previous = s
        s = s.strip()
        for left, right in (
            ("**", "**"),
            ("__", "__"),
            ("$$", "$$"),
            ("\\(", "\\)"),
            ("\\[", "\\]"),
        ):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left) : len(s) - len(right)]
        if (
            len(s) >= 2
            and s.startswith("$")
            and s.endswith("$")
            and not s.startswith("$$")
            and not s.endswith("\\$")  # `$5\$` ends on an escaped dollar, not a delimiter
        ):
            s = s[1:-1]
        s = s.strip("*").strip()
        s = s.rstrip(",;:!").rstrip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1]
    return s.strip()


def _find_unescaped(text: str, token: str, start: int) -> int:
    """Index of the next `token` at or after `start` not escaped by a backslash, or -1."""
    i = text.find(token, start)
    while i != -1:
        backslashes = len(text[:i]) - len(text[:i].rstrip("\\"))
        if backslashes % 2 == 0:
            return i
        i = text.find(token, i + 1)
    return -1


def _leading_span(line: str) -> tuple[str, int] | None:
    """(contents, end) of the math span `line` opens with (`$...$`, `\\(...\\)`...), if any."""
    for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if line.startswith(left):
            close = _find_unescaped(line, right, len(left))
            # `$5 for each` is a currency sign, `$\frac{1}{2}$` a math span
            if close != -1 and (left != "$" or not _CURRENCY_START.match(line)):
                return line[len(left) : close], close + len(right)
    return None


def _unmath(text: str) -> str:
    """`text` without its math delimiters (unescaped `$`, `\\(`, `\\)`)."""
    text = text.replace("\\(", " ").replace("\\)", " ")
    return re.sub(r"(?<!\\)\$", "", text)


def _sentence(line: str) -> str:
    """`line` up to the end of its first sentence."""
    end = _SENTENCE_END.search(line)
    return line[: end.start()] if end else line


def _equation_value(clause: str) -> str:
    """The result of a calculation ("14 + 3 = 17" gives "17"), else `clause` itself.

    The left side must be a calculation ("14 + 3", "15 gallons * 8 pints / gallon") and the
    right start with a number, or the left be one variable and the right a number ("x = 5"):
    "y = 2x + 3", "5x - 7y = 0", "the total = 5" and "42, since 40 + 2 = 42" stay whole."""
    parts = _EQUALS.split(clause)
    if len(parts) < 2:
        return clause
    left, right = parts[0].strip(), parts[-1].strip()
    arithmetic = _CALCULATION.match(left) and not re.search(r"\d[A-Za-z](?![A-Za-z])", left)
    if arithmetic and re.match(_NUMBER_TEXT, right):
        return right
    if _VARIABLE.fullmatch(left) and _parse_plain(right) is not None:
        return right
    return clause


def _box_or_value(span: str) -> str:
    """What a math span states: its last box if it has one, else its calculation's result."""
    boxed = _boxed_contents(span)
    return boxed[-1] if boxed else _equation_value(span)


def _phrase_clause(rest: str) -> str:
    """What follows "the answer is": a math span, or the text up to the end of the sentence.

    A second candidate after the value ("18 or 19", "$18$ to $28$") stays in the answer, so
    that the one-answer check sees it."""
    line = rest.split("\n", 1)[0].strip().lstrip("*").strip()
    span = _leading_span(line)
    if span is not None:
        contents, end = span
        if _HEDGE_AFTER.match(line, end):
            return _unmath(_sentence(line))
        return _box_or_value(contents)
    if line.startswith(("\\[", "$$", "\\(")):  # display math on the next lines: not followed
        return ""
    boxed = _boxed_contents(line)
    if boxed:
        return boxed[0]
    clause = _equation_value(_sentence(line))
    head = _NUMBER_THEN_PROSE.match(clause)
    if (
        head
        and clause[head.end() :].split(maxsplit=1)[0].lower() not in _MATH_WORDS
        and not _HEDGE_TAIL.match(clause, head.end(1))
    ):
        return head.group(1)
    return clause


def _sentence_start(text: str, pos: int) -> int:
    """Where the sentence holding `text[pos]` starts (after the last `.`, `;`, `!`, `?`, line)."""
    start = text.rfind("\n", 0, pos) + 1
    for end in _SENTENCE_END.finditer(text, start, pos):
        start = end.end()
    return start


def _last_number(text: str) -> tuple[str, int] | None:
    """The last number in `text` (sign and percent kept) and where it starts, or None."""
    numbers = list(_LAST_NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    sign = last.group(1)
    if sign and last.start() > 0 and text[last.start() - 1].isalnum():
        sign = ""  # a hyphen ("3-4"), not a minus
    start = last.start() if sign else last.start(2)
    return f"{sign}{last.group(2)}{'%' if last.group(3) else ''}", start


def _value_before(clause: str) -> tuple[str, bool] | None:
    """The value a clause ends on ("so 18", "a total of 16 books", "we get $x = 5$") and
    whether another candidate comes right before it ("16 or 17 books"); None if none."""
    span = _SPAN_AT_END.search(clause)
    if span is not None:
        value = _strip_wrappers(_box_or_value(span.group("dollar") or span.group("paren")))
        return (value, False) if value else None
    found = _last_number(clause)
    if found is None:
        return None
    value, start = found
    return value, bool(_HEDGE_BEFORE.search(clause, 0, start))


def _hedge_next(text: str, pos: int) -> bool:
    """Whether the sentence or line that ends after `pos` is followed by one that opens with
    another candidate ("The answer is 18. Or 19.")."""
    line_end = text.find("\n", pos)
    line_end = len(text) if line_end == -1 else line_end
    stop = _SENTENCE_END.search(text, pos, line_end)
    return _HEDGE_NEXT.match(text, stop.start() if stop else line_end) is not None


def _forward_phrases(text: str) -> list[_Statement]:
    """Statements of the form "the answer is x" / "final answer: x"."""
    out = []
    for match in _ANSWER_PHRASE.finditer(text):
        line_end = text.find("\n", match.end())
        rest = text[match.end() : None if line_end == -1 else line_end]
        answer = _strip_wrappers(_phrase_clause(rest))
        if not answer:
            continue
        before = text[_sentence_start(text, match.start()) : match.start()]
        counted = (
            _VALUE_START.match(answer) is not None
            and not _HYPOTHETICAL.search(before)
            and not _NOT_FINAL.search(before)
        )
        hedged = _hedge_next(text, match.end())
        out.append(
            _Statement(
                start=match.start(), kind="phrase", answer=answer, counted=counted, hedged=hedged
            )
        )
    return out


def _backward_phrases(text: str) -> list[_Statement]:
    """Statements of the form "x is the answer" / "..., which is the answer"."""
    out = []
    for match in _ANSWER_AFTER.finditer(text):
        clause = text[_sentence_start(text, match.start()) : match.start()]
        found = _value_before(clause)
        if found is None or _HYPOTHETICAL.search(clause):
            continue
        answer, hedged = found
        hedged = hedged or _HEDGE_NEXT.match(text, match.end()) is not None
        out.append(
            _Statement(
                start=match.start(), kind="phrase", answer=answer, counted=True, hedged=hedged
            )
        )
    return out


def _statements(text: str) -> list[_Statement]:
    """Every final-answer statement in `text` (boxes, `#### x`, answer phrases), in order;
    GSM8K's calculator notes (`<<48/2=24>>`) are dropped first."""
    text = _CALCULATOR.sub("", text)
    out = []
    for start, end, body in _boxes(text):
        answer = _strip_wrappers(body)
        if answer:
            hedged = bool(_HEDGE_AFTER.match(text, end) or _HEDGE_NEXT.match(text, end))
            out.append(
                _Statement(start=start, kind="boxed", answer=answer, counted=True, hedged=hedged)
            )
    for match in _HASHES.finditer(text):
        answer = _strip_wrappers(match.group(1))
        if answer:
            hedged = _HEDGE_NEXT.match(text, match.end()) is not None
            out.append(
                _Statement(
                    start=match.start(), kind="hashes", answer=answer, counted=True, hedged=hedged
                )
            )
    out += _forward_phrases(text)
    out += _backward_phrases(text)
    return sorted(out, key=lambda s: s.start)


def _final(statements: list[_Statement]) -> _Statement | None:
    """The statement that gives the answer: the last box, else `####`, else phrase."""
    for kind in ("boxed", "hashes", "phrase"):
        found = [s for s in statements if s.kind == kind]
        if found:
            return found[-1]
    return None


def extract_answer(text: str, *, allow_last_number: bool = False) -> str | None:
    """The final answer written in a solution, or None when it states none.

    Tries the last `\\boxed{}` / `\\fbox{}`, then GSM8K's `#### x`, then the last answer
    phrase ("the answer is x", "final answer: x", "x is the answer"); the last number in the
    text only when `allow_last_number`.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a str, got {type(text).__name__}")
    final = _final(_statements(text))
    if final is not None:
        return final.answer
    if allow_last_number:
        found = _last_number(text)
        return found[0] if found else None
    return None


# --------------------------------------------------------------------------------------------
# Hedges: more than one candidate value in one answer
# --------------------------------------------------------------------------------------------

#: Words that always offer alternatives ("18 or 19", "either", "between 18 and 28").
_HEDGE_WORDS = frozenset({"or", "nor", "either", "between"})
#: Words that join two values ("18 to 28", "18 plus 1", "18 not 19"), also between numbers.
_CONNECTIVES = frozenset(
    {"to", "and", "through", "thru", "till", "until", "versus", "vs", "not", "plus", "minus"}
    | {"times", "but", "or", "nor"}
)
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]+")
_DIGIT = re.compile(r"\d")
_PLUS_MINUS = re.compile(r"\\pm\b|\\mp\b|±|∓")
_CHAIN_NUMBER = re.compile(
    r"[-+]?(?:\\\$|\$|€|£)?[-+]?"
    r"(?:\d[0-9A-Za-z]*_(?:\{\d{1,2}\}|\d{1,2})|\d+/\d+|\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|\\[dt]?frac\d\d"
    r"|(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,4})?)"
    r"(?:\\?%|percent\b)?"
)
_CHAIN_JOIN = re.compile(
    r"\s*(?:[-+*×÷·–—]|\\times\b|\\div\b|\\cdot\b|\\pm\b|\\mp\b|±|∓"
    r"|(?<![A-Za-z\\])(?:to|and|through|thru|till|until|versus|vs|not|plus|minus|times|but"
    r"|or|nor)\b)\s*"
    r"|\s+",
    re.IGNORECASE,
)
_UNIT_WORD = re.compile(
    r"(\s*)([A-Za-z]+(?:[-/][A-Za-z]+)*\.?)(\^\{?-?\d+\}?|[²³])?(?![A-Za-z0-9])"
)
_SINGLE_LETTER_UNITS = frozenset("mgslhL")


def _unit_word_ok(word: str, *, spaced: bool, first: bool) -> bool:
    """Whether one word after a number reads as (part of) a unit."""
    letters = re.match(r"[A-Za-z]+", word)
    assert letters is not None
    head = letters.group(0)
    if head.lower() in _MATH_WORDS or head.lower() in _CONNECTIVES | _HEDGE_WORDS:
        return False
    if first and len(head) == 1:
        return spaced and head in _SINGLE_LETTER_UNITS and (len(word) == 1 or word[1] in "/.")
    return True


def _unit_end(text: str, pos: int) -> int:
    """Where the unit words starting at `pos` end ("cm^2", "square feet", "km/h"); `pos` if none."""
    first = True
    while match := _UNIT_WORD.match(text, pos):
        if not _unit_word_ok(match.group(2), spaced=bool(match.group(1)), first=first):
            break
        pos, first = match.end(), False
    return pos


def _chain_length(text: str) -> int:
    """How many `number [unit]` groups `text` is made of, joined by operators, joining words
    or spaces ("18-28", "18 plus 1", "18 apples 19 pears"); 0 when it is anything else."""
    pos, count = 0, 0
    while True:
        number = _CHAIN_NUMBER.match(text, pos)
        if number is None or number.end() == pos:
            return 0
        count += 1
        pos = _unit_end(text, number.end())
        if pos == len(text):
            return count
        join = _CHAIN_JOIN.match(text, pos)
        if join is None or join.end() == pos:
            return 0
        pos = join.end()


def _hedge_marks(text: str) -> frozenset[str]:
    """The ways `text` names more than one value: hedge words, joining words between numbers,
    `\\pm`, or "several" for a chain of numbers."""
    s = _normalize(text)
    marks = set()
    for match in _WORD.finditer(s):
        word = match.group(0).lower()
        between_numbers = _DIGIT.search(s, 0, match.start()) and _DIGIT.search(s, match.end())
        if word in _HEDGE_WORDS or (word in _CONNECTIVES and between_numbers):
            marks.add(word)
    if _PLUS_MINUS.search(s):
        marks.add("±")
    if _chain_length(s) >= 2:
        marks.add("several")
    return frozenset(marks)


def _one_value_twice(answer: str, rel_tol: float) -> str | None:
    """The first spelling of an answer that gives one value twice ("1/2, or 0.5",
    "50% or 0.5"), or None when it is anything else."""
    parts = re.split(r",?\s*\bor\b\s*", _normalize(answer), flags=re.IGNORECASE)
    if len(parts) != 2:
        return None
    first, second = _parse_plain(parts[0]), _parse_plain(parts[1])
    if first is None or second is None or not _plain_equal(first, second, rel_tol):
        return None
    return parts[0]


def _hedged(answer: str, reference: str) -> bool:
    """Whether `answer` offers more candidates than `reference` does: `18 or 19`, `18 to 28`,
    `18 plus 1`, `18-28` against `18`; a reference with `\\pm` allows `or` and `and` too."""
    allowed = _hedge_marks(reference)
    if "±" in allowed:
        allowed |= {"or", "and", "several"}
    return bool(_hedge_marks(answer) - allowed)


# --------------------------------------------------------------------------------------------
# Plain numbers, decided in-process
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Plain:
    """A plain number: its exact value, whether it was a percentage or a decimal, its unit."""

    value: Fraction
    percent: bool
    inexact: bool
    #: The unit after the number as `compare_units` compares it ("" when none).
    unit: str = ""


_LATEX_SPACING = re.compile(r"\\[,;: ]|\\(?:displaystyle|left|right)\b|~")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm|textrm|textbf|operatorname)\s*\{([^{}]*)\}")
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,4})?"
_PLAIN = re.compile(
    r"(?P<sign1>[-+])?(?:\\\$|\$|€|£|USD\b)?(?P<sign2>[-+])?"
    r"(?:(?P<digits>\d[0-9A-Za-z]*)_(?:\{(?P<base>\d{1,2})\}|(?P<base1>\d{1,2}))"
    r"|(?P<num>\d+)/(?P<den>\d+)"
    r"|\\[dt]?frac\{(?P<fsign>-)?(?P<fnum>\d+)\}\{(?P<fden>\d+)\}"
    r"|\\[dt]?frac(?P<snum>\d)(?P<sden>\d)"
    rf"|(?P<dec>{_DECIMAL}))"
    r"(?P<pct>\\?%|percent\b)?"
)
# A number with a base subscript anywhere in an answer: `52_8`, `4210_{5}`, `1A_{16}`.
_BASED = re.compile(r"(?<![\w\\.])(\d[0-9A-Za-z]*)_(?:\{(\d{1,2})\}|(\d{1,2}))")
_IRREGULAR_PLURALS = {"feet": "foot"}


def _normalize(text: str) -> str:
    """One spelling of an answer: unicode minus, LaTeX spacing and `\\text{}` wrappers gone,
    `10,\\!080` joined, single spaces, no space after a sign or before `%` and `^`."""
    s = text.replace("−", "-").replace("{,}", ",")
    s = re.sub(r",\s*\\!\s*", ",", s).replace("\\!", "")
    s = _LATEX_SPACING.sub(" ", s)
    s = _UNIT_TEXT.sub(lambda m: " " + m.group(1) + " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r"(?<=[-+$])\s+|\s+(?=\\?%)|\s+(?=\^)", "", s)


def _singular(word: str) -> str:
    """`word` without a plural ending ("inches" -> "inch", "cents" -> "cent", "feet" -> "foot")."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _unit_key(unit: str) -> str:
    """A unit as `compare_units` compares it: lower case, no braces, singular words."""
    s = unit.lower().replace("²", "^2").replace("³", "^3").replace("{", "").replace("}", "")
    s = re.sub(r"[a-z]+", lambda m: _singular(m.group(0)), s)
    return " ".join(word.rstrip(".") for word in s.split())


def _parse_plain(text: str) -> _Plain | None:
    """`text` as a plain number (with sign, currency, percent, base, units), or None."""
    if len(text) > 200:
        return None
    s = _normalize(text)
    m = _PLAIN.match(s)
    if m is None:
        return None
    rest = s[m.end() :]
    if _unit_end(rest, 0) != len(rest):
        return None
    if m.group("sign1") and m.group("sign2"):
        return None
    negative = "-" in (m.group("sign1") or "", m.group("sign2") or "", m.group("fsign") or "")
    inexact = False
    try:
        if m.group("digits") is not None:
            base = int(m.group("base") or m.group("base1"))
            if not 2 <= base <= 36:
                return None
            value = Fraction(int(m.group("digits"), base))
        elif m.group("num") is not None:
            value = Fraction(int(m.group("num")), int(m.group("den")))
        elif m.group("fnum") is not None:
            value = Fraction(int(m.group("fnum")), int(m.group("fden")))
        elif m.group("snum") is not None:
            value = Fraction(int(m.group("snum")), int(m.group("sden")))
        else:
            digits = m.group("dec").replace(",", "")
            inexact = "." in digits or "e" in digits.lower()
            value = Fraction(digits)
    except (ZeroDivisionError, ValueError):
        return None
    return _Plain(
        value=-value if negative else value,
        percent=bool(m.group("pct")),
        inexact=inexact,
        unit=_unit_key(rest),
    )


def _decimal_bases(text: str) -> str | None:
    """`text` with every based number written in base 10 (`52_8` -> `42`), for math-verify
    (which ignores subscripts); None when one has a digit its base lacks (`19_8`)."""
    try:
        return _BASED.sub(lambda m: str(int(m.group(1), int(m.group(2) or m.group(3)))), text)
    except ValueError:
        return None


def _close(a: Fraction, b: Fraction, *, approximate: bool, rel_tol: float) -> bool:
    if not approximate:
        return a == b
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _plain_equal(a: _Plain, b: _Plain, rel_tol: float) -> bool:
    """Equality of two plain numbers under the module's percent and tolerance conventions."""
    approximate = a.inexact or b.inexact
    if a.percent == b.percent:
        return _close(a.value, b.value, approximate=approximate, rel_tol=rel_tol)
    pct, other = (a, b) if a.percent else (b, a)
    return any(
        _close(v, other.value, approximate=approximate, rel_tol=rel_tol)
        for v in (pct.value, pct.value / 100)
    )


# --------------------------------------------------------------------------------------------
# math-verify in helper processes, with a wall-clock limit per call
# --------------------------------------------------------------------------------------------

_STARTUP_TIMEOUT_S = 180.0  # importing sympy on a loaded 2-core box can take a while
_WORKER_CODE = "from gristmill.verify.math import serve_worker; serve_worker()"


class _Worker:
    """One helper process running `serve_worker`, spoken to by JSON lines over pipes."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        reply = self._read(_STARTUP_TIMEOUT_S)
        if reply is None or "ready" not in reply:
            self.kill()
            detail = reply.get("error") if reply else "no reply"
            raise RuntimeError(f"math-verify helper process failed to start: {detail}")

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """The next reply; None when none comes within `timeout_s`; an error if it died."""
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout_s)
        if not ready:
            return None
        line = out.readline()
        try:
            reply = json.loads(line) if line else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            return {"error": f"helper process gave no reply (exit status {self.proc.poll()})"}
        return reply

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one request; its reply, or None when it ran over `timeout_s`."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            return {"error": f"helper process is gone: {exc}"}
        return self._read(timeout_s)

    def alive(self) -> bool:
        """Whether the helper is still running."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """Stop the helper now and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class _Pool:
    """Up to `size` helpers shared by all threads; a helper that times out is replaced."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self.idle: list[_Worker] = []
        self.live = 0
        self.cond = threading.Condition()

    def _acquire(self) -> _Worker:
        with self.cond:
            while not self.idle and self.live >= self.size:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.live += 1
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.live -= 1
                self.cond.notify()
            raise

    def _release(self, worker: _Worker, *, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self.cond:
            if healthy:
                self.idle.append(worker)
            else:
                self.live -= 1
            self.cond.notify()

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Run one request on some helper; None when it ran over `timeout_s` (helper killed).

        A helper that timed out or died is replaced by a fresh one on a later call."""
        for attempt in range(2):  # a helper found dead (killed from outside) gets one retry
            worker = self._acquire()
            reply = None
            try:
                reply = worker.ask(request, timeout_s)
            finally:
                alive = worker.alive()
                self._release(worker, healthy=reply is not None and alive)
            if reply is None or alive or "error" not in reply or attempt == 1:
                return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Stop every idle helper (at interpreter exit)."""
        with self.cond:
            workers, self.idle = self.idle, []
            self.live -= len(workers)
        for worker in workers:
            worker.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    """This process's helper pool (a forked child gets a fresh one, never its parent's)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(size=max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_POOL.close)
        return _POOL


def _math_verify_compare(a: str, b: str, rel_tol: float, timeout_s: float) -> Outcome:
    """Compare in a helper process; "timeout" when it runs past `timeout_s`."""
    request = {"a": a, "b": b, "rel_tol": rel_tol, "timeout_s": timeout_s}
    reply = _pool().call(request, timeout_s)
    if reply is None:
        return "timeout"
    match reply.get("result"):
        case "equal":
            return "equal"
        case "not_equal":
            return "not_equal"
        case "bad_reference":
            return "bad_reference"
        case _:  # the comparison raised inside the helper
            return "error"


def serve_worker() -> None:
    """Helper-process main loop: answer comparison requests read from stdin, one per line.

    Not for direct use: `answers_equal` starts helpers running this. It exits when stdin
    closes (its parent is gone).
    """
    import logging

    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    try:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
        import math_verify  # noqa: F401  (fail here, with a clear message, if missing)
    except Exception as exc:
        protocol.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        return
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    # Backstop should the parent die mid-call and never kill us: SIGALRM's default action
    # ends the process even inside a long C-level computation.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for line in sys.stdin:
        request = json.loads(line)
        signal.alarm(math.ceil(request["timeout_s"]) + 10)
        try:
            result: str = _compare_with_math_verify(request["a"], request["b"], request["rel_tol"])
            reply: dict[str, Any] = {"result": result}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        signal.alarm(0)
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


def _compare_with_math_verify(a: str, b: str, rel_tol: float) -> str:
    """math-verify's verdict on answer `a` against reference `b` (runs in the helper)."""
    import sympy
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{b}}}", parsing_timeout=None)
    if not gold:
        return "bad_reference"
    pred = parse(f"\\boxed{{{a}}}", parsing_timeout=None)
    if not pred:
        return "not_equal"
    g, p = gold[0], pred[0]
    plain = _is_plain_sympy_number(g) and _is_plain_sympy_number(p)
    if plain and (g.has(sympy.Float) or p.has(sympy.Float)):  # approximate: relative tolerance
        gv, pv = complex(g.evalf(30)), complex(p.evalf(30))
        if gv.imag == 0 and pv.imag == 0:
            close = abs(gv.real - pv.real) <= rel_tol * max(abs(gv.real), abs(pv.real))
            return "equal" if close else "not_equal"
    equal = verify(gold, pred, timeout_seconds=None)
    return "equal" if equal else "not_equal"


def _is_plain_sympy_number(expr: object) -> bool:
    """A finite numeric sympy expression that is not a percentage (math-verify keeps those as
    `x * UnevaluatedExpr(1/100)` and has its own rules for them)."""
    import sympy

    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return False
    if expr.has(sympy.UnevaluatedExpr):
        return False
    return bool(expr.is_finite)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_options(rel_tol: float, timeout_s: float) -> None:
    if not (isinstance(rel_tol, int | float) and 0 <= rel_tol < 1):
        raise ValueError(f"rel_tol must be a number in [0, 1), got {rel_tol!r}")
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


def _compare(
    a: str, b: str, rel_tol: float, timeout_s: float, *, compare_units: bool = False
) -> Outcome:
    """Compare answer `a` with reference answer `b`: hedges first, then the fast path, then
    math-verify (with based numbers written in base 10)."""
    same = _one_value_twice(a, rel_tol)
    if same is not None:
        a = same
    elif _hedged(a, b):
        return "ambiguous"
    pa, pb = _parse_plain(a), _parse_plain(b)
    if pa is not None and pb is not None:
        if compare_units and pa.unit and pb.unit and pa.unit != pb.unit:
            return "wrong_unit"
        return "equal" if _plain_equal(pa, pb, rel_tol) else "not_equal"
    a10, b10 = _decimal_bases(a), _decimal_bases(b)
    if b10 is None:
        return "bad_reference"
    if a10 is None:
        return "not_equal"
    return _math_verify_compare(a10, b10, rel_tol, timeout_s)


def answers_equal(
    a: str, b: str, *, rel_tol: float = 1e-6, timeout_s: float = 5.0, compare_units: bool = False
) -> bool:
    """Whether two extracted answers are mathematically the same (`b` is the reference).

    Plain numbers are compared in-process; anything else through math-verify in a helper
    process limited to `timeout_s` seconds (running over counts as not equal). An answer
    naming more candidates than the reference (`18 or 19` against `18`) is not equal.
    """
    _check_options(rel_tol, timeout_s)
    outcome = _compare(a.strip(), b.strip(), rel_tol, timeout_s, compare_units=compare_units)
    return outcome == "equal"


def _same_text(a: str, b: str) -> bool:
    """Whether two answers are written alike, spaces aside (no need to compare them)."""
    return "".join(a.split()) == "".join(b.split())


def _two_answers(
    final: str,
    statements: list[_Statement],
    rel_tol: float,
    timeout_s: float,
    compare_units: bool,
) -> bool:
    """Whether the response's final-answer statements name more than one value: one with a
    second candidate after it, or one that differs from `final` (a comparison that runs past
    `timeout_s` counts as different)."""
    for statement in statements:
        if not statement.counted:
            continue
        if statement.hedged:
            return True
        if _same_text(statement.answer, final):
            continue
        outcome = _compare(statement.answer, final, rel_tol, timeout_s, compare_units=compare_units)
        if outcome != "equal":
            return True
    return False


def verify_math(
    response: str,
    reference: str,
    *,
    allow_last_number: bool = False,
    rel_tol: float = 1e-6,
    timeout_s: float = 5.0,
    compare_units: bool = False,
) -> Verdict:
    """Check a model's math answer against a reference; never raises on bad model output.

    `reference` may be a full solution (GSM8K `#### x`, `\\boxed{}`) or a bare answer.
    Reasons: equal, not_equal, no_answer, ambiguous (two different final answers, or one
    that names several candidates: `18 or 19`, `18 to 28`, `18 plus 1`), wrong_unit (only
    with `compare_units`: both sides carry a unit and they differ), bad_reference, timeout
    (and error if a helper process crashed). Units are ignored unless `compare_units`.
    """
    _check_options(rel_tol, timeout_s)
    gold = extract_answer(reference) if isinstance(reference, str) else None
    if gold is None and isinstance(reference, str):
        gold = _strip_wrappers(reference) or None
    if gold is None:
        return Verdict(correct=False, extracted=None, reason="bad_reference")
    statements = _statements(response)
    final = _final(statements)
    answer = final.answer if final is not None else None
    hedged = False
    if answer is None and allow_last_number and (found := _last_number(response)):
        answer, start = found
        hedged = _HEDGE_BEFORE.search(response, 0, start) is not None
    if answer is None:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    if hedged or _two_answers(answer, statements, rel_tol, timeout_s, compare_units):
        return Verdict(correct=False, extracted=answer, reason="ambiguous")
    outcome = _compare(answer, gold, rel_tol, timeout_s, compare_units=compare_units)
    return Verdict(correct=outcome == "equal", extracted=answer, reason=outcome)


@dataclass(frozen=True, kw_only=True)
class MathVerifier:
    """`verify_math` with its options bound: a picklable `(response, reference) -> Verdict`.

    `compare_units` (default off: units are ignored by design, `864 inches^3` is credited
    against `864 inches^2`): when on, a plain-number answer and reference that both carry a
    unit must carry the same one, else the verdict is `wrong_unit`.
    """

    allow_last_number: bool = False
    rel_tol: float = 1e-6
    timeout_s: float = 5.0
    compare_units: bool = False

    def __post_init__(self) -> None:
        for name in ("allow_last_number", "compare_units"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_options(self.rel_tol, self.timeout_s)

    def __call__(self, response: str, reference: str) -> Verdict:
        """Check `response` against `reference` (see `verify_math`)."""
        return verify_math(
            response,
            reference,
            allow_last_number=self.allow_last_number,
            rel_tol=self.rel_tol,
            timeout_s=self.timeout_s,
            compare_units=self.compare_units,
        )
