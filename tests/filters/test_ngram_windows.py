"""Token windows and tokens of the dedup/decontam path against plain-Python references."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gristmill.filters.dedup import _WINDOW_MULTIPLIERS, ngram_windows, text_tokens, token_hashes

TEXTS = ["", "a", "a b", "a b c d e f g", "x y z", None, "Ｆｕｌｌ ﬁ Straße don't 3.5", "日本 語"]


def reference_windows(
    tokens: list[list[str]], values: np.ndarray, sizes: list[int], whole_from: int | None
) -> list[tuple[int, int, int, int]]:
    """(text, start, size, hash) of every window, by text, start, then size."""
    out, flat = [], 0
    for t, words in enumerate(tokens):
        hs = [int(v) for v in values[flat : flat + len(words)]]
        flat += len(words)
        for start in range(len(words)):
            for size in sorted(sizes):
                whole = whole_from is not None and start == 0 and whole_from <= len(words) < size
                if start + size <= len(words) or (whole and size == max(sizes)):
                    width = size if start + size <= len(words) else len(words)
                    h = sum(hs[start + j] * int(_WINDOW_MULTIPLIERS[j]) for j in range(width))
                    out.append((t, start, width, h % (1 << 64)))
    return sorted(set(out), key=lambda w: (w[0], w[1], w[2]))


@pytest.mark.parametrize(
    ("sizes", "whole_from"), [([1], None), ([3], 1), ([5], 2), ([2, 3], None), ([4], None)]
)
def test_windows_match_a_python_reference(sizes: list[int], whole_from: int | None) -> None:
    tokens = text_tokens(pl.Series(TEXTS, dtype=pl.String))
    hashes = token_hashes(tokens)
    w = ngram_windows(hashes, sizes, whole_texts_from=whole_from)
    got = list(
        zip(w.text.tolist(), w.start.tolist(), w.size.tolist(), w.hashes.tolist(), strict=True)
    )
    assert got == reference_windows(tokens.to_list(), hashes.values, sizes, whole_from)


def test_tokens_skip_nfkc_only_where_it_changes_nothing() -> None:
    texts = pl.Series(TEXTS, dtype=pl.String)
    for unit in ("word", "char"):
        plain = texts.fill_null("").str.normalize("NFKC").str.to_lowercase()
        want = (
            plain.str.extract_all(r"\w+")
            if unit == "word"
            else plain.str.replace_all(r"\s+", " ").str.strip_chars().str.split("")
        )
        assert text_tokens(texts, unit).to_list() == want.to_list()  # type: ignore[arg-type]
    assert texts.to_list() == TEXTS  # the input is not changed in place
