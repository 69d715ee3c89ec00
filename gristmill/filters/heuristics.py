"""The `heuristics` stage: cheap row checks that drop broken or degenerate records.

Checks run in this order and the first failing one names the drop reason:

1. `empty_prompt`       prompt is null or only whitespace
2. `empty_response`     response is null or only whitespace (when `check_response`)
3. `truncated`          `finish_reason == "length"` (only when that column exists)
4. `prompt_too_short`   / `prompt_too_long`    character and word bounds on the prompt
5. `response_too_short` / `response_too_long`  character and word bounds on the response
6. `echo`               the response only repeats the prompt (case and spacing ignored)
7. `repetition`         too much of a text sits in repeated word n-grams

Words are whitespace-separated tokens (`str.split()`). The repetition measure follows
Gopher's "duplicate n-gram character fraction" (Rae et al. 2021, table A1): the share of
the text's characters (word characters, spaces excluded) covered by a word n-gram that
already occurred earlier; the first occurrence is not counted, so a text said twice scores
0.5. Overlapping repeated n-grams are not double counted. The filter targets the looping
output of small models, hence the default of 5-grams above 0.5, far looser than Gopher's
0.15 for web pages: on AlpacaFarm's 805 gpt-3.5 answers the highest value is 0.41 (a tune
in ABC notation).

`drop_reason_for` is the definition, one record at a time; the stage computes the same
reasons column by column with polars (`drop_reasons`). Only the echo check of rows with
non-ASCII text stays in Python (`str.casefold` has no polars twin), and only for rows no
earlier check dropped. Batches under COLUMN_WISE_FROM rows go through `drop_reason_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl

from gristmill.filters.pywords import is_ascii, is_blank, joined_words, word_count
from gristmill.filters.repetition import duplicate_ngram_fraction, duplicate_ngram_fractions
from gristmill.pipelines.stage import Map, StageConfig, StageContext
from gristmill.records import DROP_REASON

#: Records' columns the repetition check may look at.
REPETITION_FIELDS = ("prompt", "response")


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


#: Python's whitespace characters (`str.isspace`) within ASCII.
ASCII_SPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "

Bounds = tuple[int | None, int | None, int | None, int | None]


def _length_checks(text: pl.Expr, what: str, bounds: Bounds) -> list[tuple[pl.Expr, str]]:
    """`_length_reason` as (condition, reason) pairs, in its order."""
    min_chars, max_chars, min_words, max_words = bounds
    chars, words = text.str.len_chars(), word_count(text)
    checks = [
        (chars < min_chars, f"{what}_too_short") if min_chars is not None else None,
        (chars > max_chars, f"{what}_too_long") if max_chars is not None else None,
        (words < min_words, f"{what}_too_short") if min_words is not None else None,
        (words > max_words, f"{what}_too_long") if max_words is not None else None,
    ]
    return [c for c in checks if c is not None]


def _first_reason(checks: list[tuple[pl.Expr, str]]) -> pl.Expr:
    """The reason of the first true condition, else null (a null condition is false)."""
    reason = pl.lit(None, dtype=pl.String)
    for cond, name in reversed(checks):
        reason = pl.when(cond).then(pl.lit(name)).otherwise(reason)
    return reason


def _echoes(prompts: pl.Series, responses: pl.Series) -> np.ndarray:
    """`_normalize(response) == _normalize(prompt)` per row, for non-null texts.

    Pure-ASCII pairs are compared in polars (casefold is lowercase there), first by their
    first and last non-space characters, then whole; other pairs in Python.
    """
    frame = pl.DataFrame({"p": prompts, "r": responses})
    p, r = pl.col("p"), pl.col("r")
    ps, rs = (x.str.strip_chars(ASCII_SPACE).str.to_lowercase() for x in (p, r))
    ascii_pair = is_ascii(p) & is_ascii(r)
    # lowercasing the one end character only (ASCII: the same character as ps's end)
    head, tail = (
        [x.str.strip_chars(ASCII_SPACE).str.head(1).str.to_lowercase() for x in (p, r)],
        [x.str.strip_chars(ASCII_SPACE).str.tail(1).str.to_lowercase() for x in (p, r)],
    )
    same_ends = (head[0] == head[1]) & (tail[0] == tail[1])
    flags = frame.select(ascii_pair.alias("ascii"), same_ends.alias("ends"))
    ascii_, ends = flags.get_column("ascii").to_numpy(), flags.get_column("ends").to_numpy()
    echo = np.zeros(frame.height, dtype=bool)
    maybe = np.flatnonzero(ascii_ & ends)
    same = frame[maybe].select(joined_words(ps) == joined_words(rs)).to_series()
    echo[maybe] = same.to_numpy()
    # casefold maps every character to characters all white (or all not) as it was, so an
    # echo has as many words as its prompt: only such pairs go to Python
    wide = np.flatnonzero(~ascii_)
    same_count = (word_count(p) == word_count(r)).fill_null(False)
    counted = frame[wide].select(same_count).to_series().to_numpy()
    for i in wide[counted].tolist():
        echo[i] = _normalize(str(responses[i])) == _normalize(str(prompts[i]))
    return echo


#: Batches from this many rows up are checked column by column (see Heuristics.process).
COLUMN_WISE_FROM = 256


def row_reasons(batch: pl.DataFrame, cfg: HeuristicsConfig) -> list[str | None]:
    """`drop_reason_for` of every row, one row at a time."""
    n = batch.height
    columns = [
        batch.get_column(c).cast(pl.String).to_list() if c in batch.columns else [None] * n
        for c in ("prompt", "response", "finish_reason")
    ]
    return [drop_reason_for(p, r, f, cfg) for p, r, f in zip(*columns, strict=True)]


def drop_reasons(batch: pl.DataFrame, cfg: HeuristicsConfig) -> pl.Series:
    """`drop_reason_for` of every row, computed column by column (same reasons, same order)."""
    n = batch.height
    prompt = batch.get_column("prompt").cast(pl.String)
    response = (
        batch.get_column("response").cast(pl.String)
        if cfg.check_response and "response" in batch.columns
        else pl.Series("response", [None] * n, dtype=pl.String)
    )
    frame = pl.DataFrame({"prompt": prompt, "response": response})
    if "finish_reason" in batch.columns:
        frame = frame.with_columns(batch.get_column("finish_reason").cast(pl.String))
    p, r = pl.col("prompt"), pl.col("response")
    checks = [(p.is_null() | is_blank(p), "empty_prompt")]
    if cfg.check_response:
        checks.append((r.is_null() | is_blank(r), "empty_response"))
    if cfg.drop_truncated and "finish_reason" in frame.columns:
        checks.append((pl.col("finish_reason") == "length", "truncated"))
    prompt_bounds = (
        cfg.min_prompt_chars,
        cfg.max_prompt_chars,
        cfg.min_prompt_words,
        cfg.max_prompt_words,
    )
    checks += _length_checks(p, "prompt", prompt_bounds)
    if cfg.check_response:
        response_bounds = (
            cfg.min_response_chars,
            cfg.max_response_chars,
            cfg.min_response_words,
            cfg.max_response_words,
        )
        checks += _length_checks(r, "response", response_bounds)
    reasons = frame.select(_first_reason(checks).alias(DROP_REASON)).to_series()
    if cfg.check_response and cfg.drop_echo:
        open_ = np.flatnonzero(reasons.is_null().to_numpy())
        echo = _echoes(prompt.gather(open_), response.gather(open_))
        reasons = reasons.scatter(open_[echo], "echo")
    if cfg.max_repetition is not None:
        texts = {"prompt": prompt, "response": response}
        for name in cfg.repetition_fields:
            open_ = np.flatnonzero((reasons.is_null() & texts[name].is_not_null()).to_numpy())
            fractions = duplicate_ngram_fractions(texts[name].gather(open_), cfg.repetition_n)
            reasons = reasons.scatter(open_[fractions > cfg.max_repetition], "repetition")
    return reasons


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
        """Set `drop_reason` on every row that fails a check (see the module docstring).

        Batches of fewer than COLUMN_WISE_FROM rows go row by row: there polars' fixed cost
        per call outweighs the work (both ways give the same reasons).
        """
        if batch.height >= COLUMN_WISE_FROM:
            new = drop_reasons(batch, self.config)
        else:
            new = pl.Series(DROP_REASON, row_reasons(batch, self.config), dtype=pl.String)
        if DROP_REASON in batch.columns:  # keep a reason an earlier step already gave
            new = batch.get_column(DROP_REASON).cast(pl.String).fill_null(new)
        return batch.with_columns(new.alias(DROP_REASON))
