"""The hint library of START's Hint-infer: short sentences that nudge a model toward Python.

After Li et al. 2025, "START: Self-taught Reasoner with Tools" (arXiv 2503.04625): inserting
an artificial hint into a reasoning model's generation makes it write and run code without
any demonstrations. Every hint here is our own wording, a plain string with a stable id,
grouped by domain and kind:

- math: `calculation` (let Python do the arithmetic), `self-check` (verify the result with
  code), `alternative` (solve it another way in code and compare);
- code: `debug` (run the code and look for mistakes), `test` (run it on the examples).

A hint is an opener ("Wait", "Alternatively") and a body. Inserted where the model would
stop, it reads as written (`Hint.text`); inserted right after the model's own "Wait" or
"Alternatively", the model's word takes the opener's place (`Hint.after`), so the sentence
stays grammatical.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Domain = Literal["math", "code"]
DOMAINS: tuple[Domain, ...] = ("math", "code")


@dataclass(frozen=True, kw_only=True)
class Hint:
    """One hint: an id, its domain and kind, and the sentence as opener + body."""

    id: str
    domain: Domain
    kind: str
    opener: str
    body: str

    def __post_init__(self) -> None:
        if not self.id or not self.opener or not self.body:
            raise ValueError(f"a hint needs an id, an opener and a body, got {self!r}")

    @property
    def text(self) -> str:
        """The hint as inserted where the model stopped: "Wait, <body>"."""
        return f"{self.opener}, {self.body}"

    def after(self, trigger: str) -> str:
        """The hint continuing the model's own `trigger` word: "<trigger>, <body>"."""
        return f"{trigger}, {self.body}"


#: Every built-in hint, in a fixed order (the order `hints_for` returns them in).
LIBRARY: tuple[Hint, ...] = (
    Hint(
        id="math-calc",
        domain="math",
        kind="calculation",
        opener="Wait",
        body="arithmetic is easy to get wrong by hand; let me compute it in Python and print it.",
    ),
    Hint(
        id="math-calc-steps",
        domain="math",
        kind="calculation",
        opener="Wait",
        body="I can put each number from the problem in a Python variable and print the result.",
    ),
    Hint(
        id="math-check",
        domain="math",
        kind="self-check",
        opener="Wait",
        body="before I give the final answer, let me check it with a short Python program.",
    ),
    Hint(
        id="math-alt",
        domain="math",
        kind="alternative",
        opener="Alternatively",
        body="I could solve the problem another way in Python and see if both answers agree.",
    ),
    Hint(
        id="code-debug",
        domain="code",
        kind="debug",
        opener="Wait",
        body="the code may have a bug; let me run it in Python and see what it does.",
    ),
    Hint(
        id="code-test",
        domain="code",
        kind="test",
        opener="Wait",
        body="I should test the function by running it on the examples from the problem.",
    ),
)

_BY_ID = {h.id: h for h in LIBRARY}
if len(_BY_ID) != len(LIBRARY):
    raise RuntimeError("hint ids in LIBRARY must be unique")


def get_hint(hint_id: str) -> Hint:
    """The library hint with this id, or a clear error listing the known ids."""
    try:
        return _BY_ID[hint_id]
    except KeyError:
        raise ValueError(f"unknown hint {hint_id!r}; known hints: {sorted(_BY_ID)}") from None


def hints_for(domain: str, ids: Sequence[str] = ()) -> tuple[Hint, ...]:
    """The hints to use: those named by `ids` (any domain), else every hint of `domain`."""
    if ids:
        return tuple(get_hint(i) for i in ids)
    if domain not in DOMAINS:
        raise ValueError(f"unknown hint domain {domain!r}; expected one of {list(DOMAINS)}")
    return tuple(h for h in LIBRARY if h.domain == domain)


# ---- where a hint goes when the model stops ---------------------------------------------------

_ANSWER_STATEMENT = re.compile(
    r"\\boxed\s*\{|####|\b(?:final\s+)?answer\b[ \t]*(?:\*\*)?[ \t]*(?:is\b|:|=)", re.IGNORECASE
)
_SENTENCE_BREAK = re.compile(r"\n|[.!?](?=[ \t])")


def _sentence_start(text: str, index: int) -> int:
    """Where the sentence (or line) holding `text[index]` starts."""
    start = 0
    for m in _SENTENCE_BREAK.finditer(text, 0, index):
        start = m.end()
    return start


def cut_final_answer(text: str) -> str:
    """`text` without its closing answer statement ("The answer is 5.", `\\boxed{5}`, `#### 5`).

    START inserts a hint where the model would stop, before it commits to an answer: cut
    from the start of the sentence holding the last answer statement to the end, and again
    while what is left ends in another answer sentence. Text stating no answer is returned
    as it is.
    """
    while True:
        matches = list(_ANSWER_STATEMENT.finditer(text))
        if not matches:
            return text
        start = _sentence_start(text, matches[-1].start())
        if text[start:].strip() == "":
            return text
        trimmed = text[:start].rstrip()
        if trimmed == text:
            return text
        text = trimmed
        tail_start = _sentence_start(text, len(text))
        if not _ANSWER_STATEMENT.search(text, tail_start):
            return text
