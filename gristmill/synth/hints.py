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

Besides the library, this module says where a hint goes (`cut_final_answer` at the stop
point; `trigger_matches` and `pick_trigger` at the model's own trigger words) and how
Hint-RFT's modify step takes it out again (`edit_hints`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

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


# ---- where a hint goes after the model's own trigger word --------------------------------------

#: Which whole-word trigger of a stretch of generated text gets the hint.
TriggerPosition = Literal["first", "last", "random", "every"]
TRIGGER_POSITIONS: tuple[str, ...] = get_args(TriggerPosition)


@dataclass(frozen=True, kw_only=True)
class TriggerMatch:
    """One of the model's trigger words: where it starts and which word it is."""

    start: int
    word: str


def trigger_matches(
    text: str,
    triggers: Sequence[str],
    *,
    start: int = 0,
    skip: Sequence[tuple[int, int]] = (),
) -> list[TriggerMatch]:
    """Every whole-word trigger in `text[start:]`, in order, outside the `skip` spans.

    Whole word and case-sensitive: "Wait" matches "Wait," and "Wait." but not "Waiting",
    "await" or "wait" (mid-sentence "wait" is rarely the model turning on its own reasoning).
    vLLM stop strings match any occurrence, inside words too, which is why triggers are
    found here in the finished text rather than by stopping at them.
    """
    if not triggers:
        return []
    words = "|".join(re.escape(t) for t in sorted(set(triggers), key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{words})(?!\w)")
    return [
        TriggerMatch(start=m.start(), word=m.group(0))
        for m in pattern.finditer(text, start)
        if not any(a <= m.start() < b for a, b in skip)
    ]


def pick_trigger(matches: Sequence[TriggerMatch], policy: str, seed: int) -> TriggerMatch:
    """The trigger a hint goes before: the `first` (also what `every` takes each time, since
    the text after a hint is generated anew), the `last`, or a `random` one (by `seed`)."""
    if not matches:
        raise ValueError("pick_trigger needs at least one trigger match")
    match policy:
        case "first" | "every":
            return matches[0]
        case "last":
            return matches[-1]
        case "random":
            return matches[seed % len(matches)]
    raise ValueError(f"unknown trigger position {policy!r}; expected one of {TRIGGER_POSITIONS}")


# ---- Hint-RFT's modify step --------------------------------------------------------------------

#: `strip`: remove each hint whose removal leaves coherent text, mark the others;
#: `mark`: remove nothing, mark every hint.
HintEdit = Literal["strip", "mark"]
HINT_EDITS: tuple[str, ...] = get_args(HintEdit)
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py3?)[ \t]*\n", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class EditedText:
    """A trajectory after the modify step: its text, what happened to each hint
    (`stripped` or `marked`), and the cuts made, to move offsets into the new text."""

    text: str
    edits: tuple[str, ...]
    #: (start, end, replacement) in the old text, in order, not overlapping.
    cuts: tuple[tuple[int, int, str], ...] = ()

    def moved(self, position: int) -> int:
        """Where offset `position` of the old text lies in the new one (an offset inside a
        cut lands right after its replacement, i.e. where the text that followed begins)."""
        offset = 0
        for start, end, joiner in self.cuts:
            if position < start:
                break
            if position < end:
                return start + offset + len(joiner)
            offset += len(joiner) - (end - start)
        return position + offset


def _strip_cut(text: str, start: int, end: int) -> tuple[int, int, str] | None:
    """The cut that removes the hint at `text[start:end]`, or None when the text would not
    read on without it: the hint must begin a sentence or line, and what follows it must be
    a python block opening on a line of its own."""
    before, after = text[:start], text[end:]
    head = before.rstrip()
    if head and not (before.rstrip(" \t").endswith("\n") or head.endswith((".", "!", "?", ":"))):
        return None
    rest = after.lstrip()
    gap = after[: len(after) - len(rest)]
    if "\n" not in gap or not _PYTHON_FENCE.match(rest):
        return None
    if not head:
        return (0, end + len(gap), "")
    space = before[len(head) :]
    return (len(head), end + len(gap), space if "\n" in space else "\n\n")


def edit_hints(text: str, hints: Sequence[tuple[int, str]], mode: str) -> EditedText:
    """Hint-RFT's modify step on one kept trajectory whose `hints` are (offset, inserted
    sentence) pairs: strip the hints that can go (`mode="strip"`), mark the rest.

    Why strip: a hint is our sentence, not the model's; without it the trajectory reads as
    the model turning to Python by itself, which is the behaviour fine-tuning should teach
    (START-0 reasons with tools and no hints). A hint goes only where the text stays
    coherent: it begins a sentence and is followed directly by the python block it asked
    for, so removing it leaves the model's reasoning followed by its code (the hint carries
    no answer and no code, so verification is unchanged). Where the model answered the hint
    in words ("Sure, let me do that:"), removing it would leave a reply to nothing: the hint
    stays and is marked. A mark is metadata, not text (the row's `hints` give its offset and
    sentence), so the training text is byte-for-byte what the model read, and a trainer can
    mask the hint's span out of the loss.
    """
    if mode not in HINT_EDITS:
        raise ValueError(f"unknown hint edit {mode!r}; expected one of {HINT_EDITS}")
    edits: list[str] = []
    cuts: list[tuple[int, int, str]] = []
    for position, sentence in hints:
        end = position + len(sentence)
        cut = None
        if mode == "strip" and text[position:end] == sentence:
            cut = _strip_cut(text, position, end)
        if cut is not None and cuts and cut[0] < cuts[-1][1]:
            cut = None  # overlapping an earlier cut (hints out of order): keep it
        if cut is None:
            edits.append("marked")
            continue
        edits.append("stripped")
        cuts.append(cut)
    parts, last = [], 0
    for start, end, joiner in cuts:
        parts += [text[last:start], joiner]
        last = end
    parts.append(text[last:])
    return EditedText(text="".join(parts), edits=tuple(edits), cuts=tuple(cuts))
