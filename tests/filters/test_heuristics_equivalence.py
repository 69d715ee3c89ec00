"""The column-wise heuristics give `drop_reason_for`'s reason on every row, in its order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gristmill.filters import repetition
from gristmill.filters.heuristics import (
    Heuristics,
    HeuristicsConfig,
    drop_reason_for,
    drop_reasons,
    row_reasons,
)
from gristmill.filters.pywords import is_blank, joined_words, split_words, word_count
from gristmill.filters.repetition import duplicate_ngram_fraction, duplicate_ngram_fractions
from gristmill.pipelines.stage import StageContext

CONFIGS = [
    HeuristicsConfig(),
    HeuristicsConfig(check_response=False, repetition_fields=("prompt", "response")),
    HeuristicsConfig(
        min_prompt_chars=40,
        max_prompt_chars=300,
        min_prompt_words=8,
        max_prompt_words=60,
        min_response_chars=30,
        max_response_chars=600,
        min_response_words=6,
        max_response_words=120,
        repetition_n=2,
        max_repetition=0.2,
        repetition_fields=("prompt", "response"),
    ),
    HeuristicsConfig(repetition_n=1, max_repetition=0.3, drop_echo=False, drop_truncated=False),
    HeuristicsConfig(min_response_words=50, repetition_n=13, max_repetition=0.0),
]

LOOP = "Sure! I can help. " * 40
#: Crafted rows: blanks of every kind, unicode case folding, separators, long repeats.
EDGE_TEXTS: list[tuple[str | None, str | None, str | None]] = [
    (None, "an answer", "stop"),
    ("", "an answer", None),
    (" \t\n", "an answer", "stop"),
    ("\x1c\x1d", "an answer", "stop"),  # Python whitespace that regex \s is not
    ("\u00a0\u3000", "an answer", "stop"),
    ("a question", None, "stop"),
    ("a question", "", "length"),
    ("a question", "\u2028", "stop"),
    ("a question", "an answer", "length"),
    ("Straße?", "STRASSE?", "stop"),  # casefold: ß -> ss, lower() keeps ß
    ("ΣΊΣΥΦΟΣ", "σίσυφος", "stop"),  # final sigma
    ("ﬁne   print", "FINE print", "stop"),  # ligature: casefold splits it, NFKC is not applied
    ("Ｆｕｌｌ width", "full width", "stop"),  # full-width letters are not casefolded to ASCII
    ("Same\x1ctext", "same text", "stop"),  # \x1c splits words for Python
    ("Same\u00a0text", "same  TEXT", "stop"),
    ("x", "x " * 5000, "stop"),  # very long repeat
    ("question", LOOP, "stop"),
    ("question", "a b c d e a b c d e", "stop"),  # said twice: exactly 0.5
    ("question", "a b c d e f a b c d e f g", "stop"),
    ("question", "日本語 の テキスト 日本語 の テキスト 日本語 の テキスト", "stop"),
    ("emoji 👍🏽 test", "emoji 👍🏽 test", "stop"),
    ("question", "one two three four", "stop"),  # fewer words than n
    ("Why is the sky blue in the day and red in the evening?", "short", "stop"),
    ("word " * 61, "fine answer with enough words in it to pass the bounds", None),
]


def _frame(rows: list[tuple[str | None, str | None, str | None]]) -> pl.DataFrame:
    prompts, responses, finishes = zip(*rows, strict=True)
    return pl.DataFrame(
        {"prompt": prompts, "response": responses, "finish_reason": finishes},
        schema={"prompt": pl.String, "response": pl.String, "finish_reason": pl.String},
    )


def _reference(frame: pl.DataFrame, cfg: HeuristicsConfig) -> list[str | None]:
    finishes = (
        frame.get_column("finish_reason").to_list()
        if "finish_reason" in frame.columns
        else [None] * frame.height
    )
    want = [
        drop_reason_for(p, r, f, cfg)
        for p, r, f in zip(frame["prompt"], frame["response"], finishes, strict=True)
    ]
    assert row_reasons(frame, cfg) == want  # the small-batch path of the stage
    return want


def _with_echoes_and_loops(frame: pl.DataFrame) -> pl.DataFrame:
    """The slice plus rows that trip each check: echoes, loops, a prompt said twice."""
    prompts = frame.get_column("prompt")
    echoes = frame.with_columns(pl.col("prompt").str.to_uppercase().alias("response"))
    loops = frame.with_columns((pl.col("response") + " " + pl.col("response")).alias("response"))
    twice = frame.with_columns((prompts + "\n" + prompts).alias("prompt"))
    return pl.concat([frame, echoes, loops, twice], how="vertical_relaxed")


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_same_reasons_on_committed_slices(
    committed_slices: dict[str, pl.DataFrame], cfg: HeuristicsConfig
) -> None:
    for name, records in committed_slices.items():
        frame = _with_echoes_and_loops(records.select("prompt", "response"))
        assert drop_reasons(frame, cfg).to_list() == _reference(frame, cfg), name


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_same_reasons_on_edge_cases(cfg: HeuristicsConfig) -> None:
    frame = _frame(EDGE_TEXTS)
    assert drop_reasons(frame, cfg).to_list() == _reference(frame, cfg)
    # without a finish_reason column nothing is truncated, as in the per-row function
    plain = frame.drop("finish_reason")
    assert drop_reasons(plain, cfg).to_list() == _reference(plain, cfg)


def test_each_reason_is_reachable_in_the_edge_cases() -> None:
    plain = set(drop_reasons(_frame(EDGE_TEXTS), HeuristicsConfig()).to_list())
    assert {"empty_prompt", "empty_response", "truncated", "echo", "repetition"} <= plain
    bounded = set(drop_reasons(_frame(EDGE_TEXTS), CONFIGS[2]).to_list())
    assert {"prompt_too_short", "prompt_too_long", "response_too_short"} <= bounded


def test_python_whitespace_for_every_code_point() -> None:
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    blank = pl.DataFrame({"c": chars}).select(is_blank(pl.col("c"))).to_series()
    spaces = [c for c, b in zip(chars, blank, strict=True) if b]
    assert spaces == [c for c in chars if c.isspace()]
    # around every space and a spread of other characters, the word functions agree
    texts = [f"a{c}b{c}{c}c " for c in [*spaces, *chars[::997]]] + [""]
    got = pl.DataFrame({"t": texts}).select(
        word_count(pl.col("t")).alias("words"),
        split_words(pl.col("t")).alias("split"),
        joined_words(pl.col("t")).alias("joined"),
    )
    assert got.get_column("words").to_list() == [len(t.split()) for t in texts]
    assert got.get_column("split").to_list() == [t.split() for t in texts]
    assert got.get_column("joined").to_list() == [" ".join(t.split()) for t in texts]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13])
def test_repetition_fractions_match_the_definition(
    committed_slices: dict[str, pl.DataFrame], n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [t for frame in committed_slices.values() for t in frame.get_column("response")]
    texts += [t for t, _, _ in EDGE_TEXTS] + [r for _, r, _ in EDGE_TEXTS]
    texts += [f"{t} {t}" for t in texts[:50]]
    series = pl.Series(texts, dtype=pl.String)
    want = np.array([duplicate_ngram_fraction(t or "", n) for t in texts])
    np.testing.assert_array_equal(duplicate_ngram_fractions(series, n), want)
    monkeypatch.setattr(repetition, "CHUNK_TEXTS", 7)  # chunk edges change nothing
    np.testing.assert_array_equal(duplicate_ngram_fractions(series, n), want)


def test_a_hash_collision_falls_back_to_the_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = pl.Series(["a b c a b d", "x y z w"])
    monkeypatch.setattr(
        repetition, "_window_keys", lambda h, n: np.zeros(len(h) - n + 1, np.uint64)
    )
    want = [duplicate_ngram_fraction(t, 2) for t in texts]
    assert duplicate_ngram_fractions(texts, 2).tolist() == want


def test_the_stage_takes_either_path_by_batch_size(
    committed_slices: dict[str, pl.DataFrame], tmp_path: Path
) -> None:
    from gristmill.filters import heuristics

    frame = _with_echoes_and_loops(committed_slices["self_instruct_user_oriented_20x8"])
    assert frame.height >= heuristics.COLUMN_WISE_FROM
    ctx = StageContext(stage_name="heuristics", stage_index=0, seed=0, run_dir=tmp_path)
    cfg = CONFIGS[2]
    whole = Heuristics(cfg).process(frame, ctx).get_column("drop_reason").to_list()
    small = [
        r
        for lo in range(0, frame.height, 50)
        for r in Heuristics(cfg).process(frame.slice(lo, 50), ctx).get_column("drop_reason")
    ]
    assert whole == small == _reference(frame, cfg)
