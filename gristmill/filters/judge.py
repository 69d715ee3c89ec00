"""The `judge` stage: an LLM rates, labels or compares rows, read from its token probabilities.

Every judgement is a multiple choice: the options are single tokens (digits for a score,
letters for labels and for "which answer is better"), and ONE prompt-logprobs call per
part scores every row's every option: the probability of option o is that of the text
`prompt + o`'s last token, normalised over the options. So:

- `mode: score` — a rubric prompt, scores 1..5 by default: `score__<name>` is the expected
  score under those probabilities; `<name>_choice` is the most likely one.
- `mode: label` — `<name>` is the most likely label and `<name>_prob` its probability.
  By default each row is asked twice, with the options listed in the given order and
  reversed, and a label's probability is its mean over the two (`debias: order`): small
  judges favour the first letter (SmolLM2-135M gives "A" 0.89 on a content-free request),
  which alone would label every row with the first option.
  Magpie's tags come ready-made (`preset: task_category | input_quality | difficulty`,
  after the tag sets of Magpie's `unitag.py`, with prompts of our own wording); rows can be
  kept by label (`keep_labels`) or by an ordered preset's floor (`min_label: average`).
- `mode: pairwise` — candidates sharing a `parent_id` are compared two by two, in both
  orders to cancel the judge's position bias; `score__<name>` is a candidate's mean
  probability of being the better one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar, Literal

import polars as pl

from gristmill.engines.base import Messages, PromptFormat, render_prompt, uses_chat_template
from gristmill.pipelines.stage import LLMConfig, Map, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, counts, summed
from gristmill.records import DROP_REASON, score_column

#: Ready-made label sets: (the question, the labels in order).
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "task_category": (
        "What kind of task does this user request ask for?",
        (
            "information seeking",
            "reasoning",
            "planning",
            "editing",
            "coding and debugging",
            "math",
            "role playing",
            "data analysis",
            "creative writing",
            "advice seeking",
            "brainstorming",
            "other",
        ),
    ),
    "input_quality": (
        "How clear, specific and well-formed is this user request, so that a good answer "
        "is possible without guessing what was meant?",
        ("very poor", "poor", "average", "good", "excellent"),
    ),
    "difficulty": (
        "How hard is this user request for a capable assistant to answer well?",
        ("very easy", "easy", "medium", "hard", "very hard"),
    ),
}
#: Presets whose labels run from worst to best (so `min_label` means something).
ORDERED = frozenset({"input_quality", "difficulty"})

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

DEFAULT_RUBRIC = (
    "Rate how helpful, correct and clear the assistant's answer is for the user's request, "
    "from {low} (useless or wrong) to {high} (excellent).\n\n"
    "User request:\n{prompt}\n\nAssistant's answer:\n{response}\n\n"
    "Reply with one number from {low} to {high}."
)
PAIRWISE = (
    "Which answer to the user's request is better: more helpful, correct and clear?\n\n"
    "User request:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Reply with one letter, A or B."
)


@dataclass(frozen=True, kw_only=True)
class JudgeConfig(LLMConfig):
    """What the judge is asked, how it answers, and what it keeps."""

    mode: Literal["score", "label", "pairwise"] = "score"
    #: Column names: `score__<name>`, or `<name>` and `<name>_prob` for labels.
    name: str = "judge"
    #: score mode: the prompt, with `{prompt}`, `{response}`, `{low}`, `{high}`.
    rubric: str = DEFAULT_RUBRIC
    #: score mode: the lowest and highest score (single digits).
    low: int = 1
    high: int = 5
    #: label mode: a ready-made question and label set...
    preset: Literal["task_category", "input_quality", "difficulty"] | None = None
    #: ...or your own question (about `{prompt}`) and labels.
    question: str | None = None
    labels: tuple[str, ...] = ()
    #: label mode: keep only rows with these labels (empty: keep all)...
    keep_labels: tuple[str, ...] = ()
    #: ...or, for an ordered preset, rows at this label or above.
    min_label: str | None = None
    #: label mode: `order` asks with the options in order and reversed and averages, so a
    #: bias toward a letter cancels (twice the prompts); `none` asks once.
    debias: Literal["order", "none"] = "order"
    #: How the judge model sees the prompt (its chat template, or plain for a base model).
    prompt_format: PromptFormat = "auto"

    def __post_init__(self) -> None:
        where = "judge config"
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "keep_labels", tuple(self.keep_labels))
        if not self.name.isidentifier():
            raise ValueError(f"{where}: name must be an identifier, got {self.name!r}")
        if not 0 <= self.low < self.high <= 9:
            raise ValueError(f"{where}: need 0 <= low < high <= 9, got {self.low}..{self.high}")
        if self.mode != "label":
            return
        if (self.preset is None) == (not self.labels):
            raise ValueError(f"{where}: label mode takes a `preset` or your own `labels`")
        if self.labels and self.question is None:
            raise ValueError(f"{where}: your own labels need a `question`")
        labels = self.label_set()[1]
        if not 2 <= len(labels) <= len(LETTERS):
            raise ValueError(f"{where}: give 2 to {len(LETTERS)} labels, got {len(labels)}")
        unknown = [x for x in (*self.keep_labels, self.min_label) if x and x not in labels]
        if unknown:
            raise ValueError(f"{where}: {unknown} not among the labels {list(labels)}")
        if self.min_label is not None and self.preset not in ORDERED:
            raise ValueError(f"{where}: min_label needs an ordered preset {sorted(ORDERED)}")

    def label_set(self) -> tuple[str, tuple[str, ...]]:
        """The question and the labels."""
        if self.preset is not None:
            question, labels = PRESETS[self.preset]
            return self.question or question, labels
        return str(self.question), self.labels


@dataclass(frozen=True, kw_only=True)
class JudgeStats(ExtraStats):
    """Rows judged, the label mix (label mode), the summed scores (score and pairwise)."""

    rows: int = summed()
    labels: dict[str, int] = counts()
    scored: int = summed()
    score_sum: float = summed()
    pairs: int = summed()

    def derived(self) -> dict[str, Any]:
        """The mean score over the rows that got one."""
        return {"mean_score": round(self.score_sum / self.scored, 4) if self.scored else None}


@dataclass(frozen=True)
class _Ask:
    """One multiple-choice question to the judge: its chat, and the option tokens."""

    messages: Messages
    options: tuple[str, ...]


class Judge(Map):
    """LLM judge from token probabilities: a rubric score (`score__<name>`), a label with its
    probability, or pairwise preference between candidates in both orders."""

    name: ClassVar[str] = "judge"
    needs_completions: ClassVar[str | None] = (
        "reads label probabilities from prompt log-probabilities"
    )
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "filter"
    Config: ClassVar[type[StageConfig]] = JudgeConfig
    Stats: ClassVar[type[ExtraStats] | None] = JudgeStats
    uses_engine: ClassVar[bool] = True
    config: JudgeConfig

    def requires(self) -> tuple[str, ...]:
        match self.config.mode:
            case "label":
                return ("prompt",)
            case "score":
                return ("prompt", "response")
            case _:
                return ("prompt", "response", "parent_id")

    def produces(self) -> tuple[str, ...]:
        cfg = self.config
        if cfg.mode == "label":
            return (cfg.name, f"{cfg.name}_prob")
        return (score_column(cfg.name),)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Ask every row's question(s) in one log-prob call; add the columns; drop by label."""
        cfg = self.config
        engine = ctx.engine()
        rows = batch.to_dicts()
        match cfg.mode:
            case "score":
                asks = [self._score_ask(r) for r in rows]
            case "label":
                asks = [self._label_ask(r) for r in rows]
                if cfg.debias == "order":
                    asks += [self._label_ask(r, reverse=True) for r in rows]
            case _:
                pairs = _pairs(rows)
                asks = [self._pair_ask(rows[i], rows[j]) for i, j in pairs]
                asks += [self._pair_ask(rows[j], rows[i]) for i, j in pairs]
        probs = choice_probs(engine, asks, fmt=cfg.prompt_format)
        if cfg.mode == "label" and cfg.debias == "order":
            probs = _order_averaged(probs, len(rows))
        match cfg.mode:
            case "score":
                values = range(cfg.low, cfg.high + 1)
                expected = [sum(v * p for v, p in zip(values, ps, strict=True)) for ps in probs]
                out = batch.with_columns(
                    pl.Series(score_column(cfg.name), expected, dtype=pl.Float64),
                    pl.Series(
                        f"{cfg.name}_choice",
                        [cfg.low + _argmax(ps) for ps in probs],
                        dtype=pl.Int64,
                    ),
                )
                stats = JudgeStats(rows=len(rows), scored=len(rows), score_sum=sum(expected))
            case "label":
                labels = cfg.label_set()[1]
                chosen = [labels[_argmax(ps)] for ps in probs]
                out = batch.with_columns(
                    pl.Series(cfg.name, chosen, dtype=pl.String),
                    pl.Series(f"{cfg.name}_prob", [max(ps) for ps in probs], dtype=pl.Float64),
                )
                stats = JudgeStats(rows=len(rows), labels=_counts(chosen))
                out = self._drop_by_label(out, chosen, labels)
            case _:
                rates = _win_rates(len(rows), pairs, probs)
                out = batch.with_columns(pl.Series(score_column(cfg.name), rates, dtype=pl.Float64))
                got = [r for r in rates if r is not None]
                stats = JudgeStats(
                    rows=len(rows), scored=len(got), score_sum=sum(got), pairs=len(pairs)
                )
        ctx.extra_stats.update(stats.to_dict())
        return out

    # ---- questions --------------------------------------------------------------------
    def _score_ask(self, row: dict[str, Any]) -> _Ask:
        cfg = self.config
        text = cfg.rubric.format(
            prompt=row["prompt"], response=row["response"] or "", low=cfg.low, high=cfg.high
        )
        digits = tuple(str(v) for v in range(cfg.low, cfg.high + 1))
        return _Ask([{"role": "user", "content": text}], digits)

    def _label_ask(self, row: dict[str, Any], *, reverse: bool = False) -> _Ask:
        """The label question; `reverse` lists the options last to first (letters stay A..)."""
        question, labels = self.config.label_set()
        listed = labels[::-1] if reverse else labels
        choices = "\n".join(f"{LETTERS[i]}) {label}" for i, label in enumerate(listed))
        text = (
            f"{question.format(prompt=row['prompt'])}\n\nUser request:\n{row['prompt']}\n\n"
            f"Options:\n{choices}\n\nReply with one letter."
        )
        return _Ask([{"role": "user", "content": text}], tuple(LETTERS[: len(labels)]))

    def _pair_ask(self, a: dict[str, Any], b: dict[str, Any]) -> _Ask:
        text = PAIRWISE.format(prompt=a["prompt"], a=a["response"] or "", b=b["response"] or "")
        return _Ask([{"role": "user", "content": text}], ("A", "B"))

    def _drop_by_label(
        self, out: pl.DataFrame, chosen: Sequence[str], labels: Sequence[str]
    ) -> pl.DataFrame:
        cfg = self.config
        allowed: set[str] = set(cfg.keep_labels)
        if cfg.min_label is not None:
            allowed |= set(labels[labels.index(cfg.min_label) :])
        if not allowed:
            return out
        reasons = [None if c in allowed else f"{cfg.name}_{c.replace(' ', '_')}" for c in chosen]
        new = pl.Series(DROP_REASON, reasons, dtype=pl.String)
        if DROP_REASON in out.columns:
            new = out.get_column(DROP_REASON).cast(pl.String).fill_null(new)
        return out.with_columns(new.alias(DROP_REASON))


def choice_probs(engine: Any, asks: Sequence[_Ask], *, fmt: PromptFormat) -> list[list[float]]:
    """Per question, each option's probability as the next token, normalised over the
    options: one prompt-logprobs call over every question's every option."""
    if not asks:
        return []
    plain = not uses_chat_template(engine, fmt)
    texts: list[str] = []
    for ask in asks:
        prompt = render_prompt(engine, ask.messages, fmt=fmt) + (" " if plain else "")
        texts += [prompt + option for option in ask.options]
    rows = engine.prompt_logprobs(texts)
    out: list[list[float]] = []
    k = 0
    for ask in asks:
        logps = []
        for _ in ask.options:
            last = rows[k][-1] if rows[k] else None
            logps.append(-math.inf if last is None else float(last))
            k += 1
        top = max(logps)
        weights = [math.exp(lp - top) for lp in logps]
        total = sum(weights)
        out.append([w / total for w in weights])
    return out


def _order_averaged(probs: Sequence[Sequence[float]], n: int) -> list[list[float]]:
    """Per row, each label's mean probability over the forward ask (`probs[i]`) and the
    reversed ask (`probs[n + i]`, whose options run last label first)."""
    return [
        [(f + b) / 2 for f, b in zip(probs[i], reversed(probs[n + i]), strict=True)]
        for i in range(n)
    ]


def _pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Every pair of rows that answer the same instruction (share a `parent_id`)."""
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get("parent_id") is not None and row.get("response"):
            groups.setdefault(row["parent_id"], []).append(i)
    return [pair for members in groups.values() for pair in combinations(members, 2)]


def _win_rates(
    n: int, pairs: Sequence[tuple[int, int]], probs: Sequence[Sequence[float]]
) -> list[float | None]:
    """A candidate's mean probability of winning, both orders averaged (None: no rival)."""
    wins: list[list[float]] = [[] for _ in range(n)]
    half = len(pairs)
    for k, (i, j) in enumerate(pairs):
        first, swapped = probs[k], probs[half + k]  # (i as A, j as B), then (j as A, i as B)
        p_i = (first[0] + swapped[1]) / 2
        wins[i].append(p_i)
        wins[j].append(1 - p_i)
    return [sum(w) / len(w) if w else None for w in wins]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def _counts(labels: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return out
