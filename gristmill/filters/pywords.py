"""Python's `str.split()` words and `str.strip()` blanks as polars expressions.

Python's whitespace (`str.isspace`) is Unicode White_Space plus the four ASCII information
separators U+001C..U+001F; the regex `\\s` polars uses is White_Space alone. Every pattern
here adds those four, so `word_count(e)` is `len(text.split())` and `is_blank(e)` is
`not text.strip()`, code point for code point (tests/filters/test_pywords.py checks every
code point).
"""

from __future__ import annotations

import polars as pl

#: One Python whitespace character, as a regex class.
PY_SPACE = r"[\s\x1c-\x1f]"
#: One `str.split()` word: a run of non-whitespace.
PY_WORD = r"[^\s\x1c-\x1f]+"


def is_blank(text: pl.Expr) -> pl.Expr:
    """`not text.strip()` (an empty or all-whitespace text); null stays null."""
    return text.str.contains(rf"^{PY_SPACE}*$")


def word_count(text: pl.Expr) -> pl.Expr:
    """`len(text.split())` as UInt32; null stays null."""
    return text.str.count_matches(PY_WORD)


def split_words(text: pl.Expr) -> pl.Expr:
    """`text.split()` as a list of strings; null stays null."""
    return text.str.extract_all(PY_WORD)


def joined_words(text: pl.Expr) -> pl.Expr:
    """`" ".join(text.split())`: whitespace runs to one space, ends trimmed."""
    return text.str.replace_all(rf"{PY_SPACE}+", " ").str.strip_chars(" ")


def is_ascii(text: pl.Expr) -> pl.Expr:
    """Whether a text is pure ASCII (one UTF-8 byte per character); null stays null."""
    return text.str.len_bytes() == text.str.len_chars()
