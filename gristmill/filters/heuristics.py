"""The `heuristics` stage: cheap row checks that drop broken or degenerate records.

Checks run in this order and the first failing one names the drop reason:

1. `empty_prompt`       prompt is null or only whitespace
2. `empty_response`     response is null or only whitespace (when `check_response`)
3. `truncated`          `finish_reason == "length"` (only when that column exists)
4. `prompt_too_short`   / `prompt_too_long`    character and word bounds on the prompt
5. `response_too_short` / `response_too_long`  character and word bounds on the response
6. `echo`               the response only repeats the prompt (case and spacing ignored)
7. `repetition`         too much of a text sits in repeated word n-grams

Words are whitespace-separated tokens. The repetition measure follows Gopher's "duplicate
n-gram character fraction" (Rae et al. 2021, table A1): the share of the text's characters
(word characters, spaces excluded) covered by a word n-gram that already occurred earlier;
the first occurrence is not counted, so a text said twice scores 0.5. Overlapping repeated
n-grams are not double counted. The filter targets the looping output of small models,
hence the default of 5-grams above 0.5, far looser than Gopher's 0.15 for web pages: on
AlpacaFarm's 805 gpt-3.5 answers the highest value is 0.41 (a tune in ABC notation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import polars as pl

from gristmill.pipelines.stage import Map, StageConfig, StageContext
from gristmill.records import DROP_REASON

#: Records' columns the repetition check may look at.
REPETITION_FIELDS = ("prompt", "response")


def duplicate_ngram_fraction(text: str, n: int) -> float:
    """Fraction of word characters inside word n-grams that repeat an earlier n-gram."""
    words = text.split()
    total = sum(len(w) for w in words)
    if total == 0 or len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for start in range(len(words) - n + 1):
        gram = tuple(words[start : start + n])
        if gram in seen:
            for j in range(start, start + n):
                covered[j] = True
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total


def _normalize(text: str) -> str:
    return " ".join(text.casefold().split())


@dataclass(frozen=True, kw_only=True)
class HeuristicsConfig(StageConfig):
    """Bounds and switches of the heuristic checks; None disables a bound."""

    #: Whether response checks run at all (off for prompt-only data such as fresh Magpie
    #: instructions); the prompt checks always run.
    check_response: bool = True
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None
    min_prompt_words: int | None = None
    max_prompt_words: int | None = None
    min_response_chars: int | None = None
    max_response_chars: int | None = None
    min_response_words: int | None = None
    max_response_words: int | None = None
    #: Drop rows whose generation stopped at the token limit (`finish_reason == "length"`).
    drop_truncated: bool = True
    #: Drop responses that only repeat the prompt.
    drop_echo: bool = True
    #: Word n-gram size of the repetition check.
    repetition_n: int = 5
    #: Highest allowed duplicate n-gram character fraction; None disables the check.
    max_repetition: float | None = 0.5
    #: Which texts the repetition check looks at.
    repetition_fields: tuple[str, ...] = ("response",)

    def __post_init__(self) -> None:
        where = "heuristics config"
        for what in ("prompt", "response"):
            for unit in ("chars", "words"):
                lo = getattr(self, f"min_{what}_{unit}")
                hi = getattr(self, f"max_{what}_{unit}")
                for name, value in ((f"min_{what}_{unit}", lo), (f"max_{what}_{unit}", hi)):
                    if value is not None and value < 0:
                        raise ValueError(f"{where}: {name} must be >= 0, got {value}")
                if lo is not None and hi is not None and lo > hi:
                    raise ValueError(
                        f"{where}: min_{what}_{unit} ({lo}) is above max_{what}_{unit} ({hi})"
                    )
        if self.repetition_n < 1:
            raise ValueError(f"{where}: repetition_n must be >= 1, got {self.repetition_n}")
        if self.max_repetition is not None and not 0 <= self.max_repetition <= 1:
            raise ValueError(
                f"{where}: max_repetition must be in [0, 1], got {self.max_repetition}"
            )
        object.__setattr__(self, "repetition_fields", tuple(self.repetition_fields))
        bad = [f for f in self.repetition_fields if f not in REPETITION_FIELDS]
        if bad:
            raise ValueError(
                f"{where}: repetition_fields must be among {list(REPETITION_FIELDS)}, got {bad}"
            )


def _length_reason(
    text: str, what: str, bounds: tuple[int | None, int | None, int | None, int | None]
) -> str | None:
    min_chars, max_chars, min_words, max_words = bounds
    chars = len(text)
    if min_chars is not None and chars < min_chars:
        return f"{what}_too_short"
    if max_chars is not None and chars > max_chars:
        return f"{what}_too_long"
    if min_words is None and max_words is None:
        return None
    words = len(text.split())
    if min_words is not None and words < min_words:
        return f"{what}_too_short"
    if max_words is not None and words > max_words:
        return f"{what}_too_long"
    return None


def drop_reason_for(
    prompt: str | None,
    response: str | None,
    finish_reason: str | None,
    cfg: HeuristicsConfig,
) -> str | None:
    """The first failing check's reason for one record, or None to keep it."""
    if prompt is None or not prompt.strip():
        return "empty_prompt"
    if cfg.check_response and (response is None or not response.strip()):
        return "empty_response"
    if cfg.drop_truncated and finish_reason == "length":
        return "truncated"
    prompt_bounds = (
        cfg.min_prompt_chars,
        cfg.max_prompt_chars,
        cfg.min_prompt_words,
        cfg.max_prompt_words,
    )
    reason = _length_reason(prompt, "prompt", prompt_bounds)
    if reason is not None:
        return reason
    checked_response = response if cfg.check_response else None
    if checked_response is not None:
        response_bounds = (
            cfg.min_response_chars,
            cfg.max_response_chars,
            cfg.min_response_words,
            cfg.max_response_words,
        )
        reason = _length_reason(checked_response, "response", response_bounds)
        if reason is not None:
            return reason
        if cfg.drop_echo and _normalize(checked_response) == _normalize(prompt):
            return "echo"
    if cfg.max_repetition is not None:
        texts = {"prompt": prompt, "response": checked_response}
        for field in cfg.repetition_fields:
            text = texts[field]
            if text is not None and (
                duplicate_ngram_fraction(text, cfg.repetition_n) > cfg.max_repetition
            ):
                return "repetition"
    return None


class Heuristics(Map):
    """Drops empty, truncated, out-of-bounds (characters, words), echoing and n-gram-repetitive
    records."""

    name: ClassVar[str] = "heuristics"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "filter"
    Config: ClassVar[type[StageConfig]] = HeuristicsConfig
    config: HeuristicsConfig

    def requires(self) -> tuple[str, ...]:
        return ("prompt", "response") if self.config.check_response else ("prompt",)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Set `drop_reason` on every row that fails a check (see the module docstring)."""
        cfg = self.config
        n = batch.height
        prompts: Sequence[str | None] = batch.get_column("prompt").to_list()
        responses: Sequence[str | None] = (
            batch.get_column("response").to_list() if "response" in batch.columns else [None] * n
        )
        finishes: Sequence[str | None] = (
            batch.get_column("finish_reason").cast(pl.String).to_list()
            if "finish_reason" in batch.columns
            else [None] * n
        )
        reasons = [
            drop_reason_for(p, r, f, cfg)
            for p, r, f in zip(prompts, responses, finishes, strict=True)
        ]
        new = pl.Series(DROP_REASON, reasons, dtype=pl.String)
        if DROP_REASON in batch.columns:  # keep a reason an earlier step already gave
            new = batch.get_column(DROP_REASON).cast(pl.String).fill_null(new)
        return batch.with_columns(new.alias(DROP_REASON))
