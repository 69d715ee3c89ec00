"""Gopher's duplicate n-gram character fraction, for one text and for a column of texts.

The share of a text's word characters (spaces excluded) that lie inside a word n-gram
already seen earlier in the same text (Rae et al. 2021, table A1); the first occurrence
is not counted, overlaps are not counted twice. Words are `str.split()` words, compared
exactly (case and punctuation kept). `duplicate_ngram_fraction` is the definition, one
text at a time; `duplicate_ngram_fractions` gives the same numbers for a whole Series.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from gristmill.filters.pywords import split_words
from gristmill.threads import thread_map


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


#: Odd 64-bit multipliers, one per word of a window: a window's key is sum(h_k * M_k).
_MIX = np.array([(pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1) for k in range(64)], np.uint64)


def _window_keys(word_hash: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit key for the n words from every position that has n words after it."""
    m = len(word_hash) - n + 1
    key = word_hash[:m] * _MIX[0]
    for k in range(1, n):
        key += word_hash[k : k + m] * _MIX[k % len(_MIX)]
    return key


#: Texts measured per numpy pass: small enough for the sort to stay in cache.
CHUNK_TEXTS = 4096


def duplicate_ngram_fractions(texts: pl.Series, n: int) -> np.ndarray:
    """`duplicate_ngram_fraction(t, n)` for every text (null counts as ""), as float64; the
    chunks are measured side by side (`gristmill.threads`)."""
    chunks = thread_map(
        lambda lo: _chunk_fractions(texts.slice(lo, CHUNK_TEXTS), n),
        range(0, len(texts), CHUNK_TEXTS),
    )
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)


def _chunk_fractions(texts: pl.Series, n: int) -> np.ndarray:
    """`duplicate_ngram_fractions` of one chunk.

    All texts' words are laid end to end; an n-gram starts at each position with n words
    left in its text. Windows are keyed by a 64-bit hash of (text, words); a window whose
    key occurred earlier is a repeat once its words are compared, string for string, with
    that earlier window's. A text where such a comparison fails (a hash collision) is
    measured again with `duplicate_ngram_fraction`, so the result is exact.
    """
    lists = pl.DataFrame({"t": texts.cast(pl.String)}).select(
        split_words(pl.col("t").fill_null("")).alias("w")
    )
    lengths = lists.select(pl.col("w").list.len()).to_series().to_numpy().astype(np.int64)
    flat = lists.select(pl.col("w").explode()).drop_nulls()  # an empty text leaves a null
    out = np.zeros(len(lengths), dtype=np.float64)
    if flat.height == 0:
        return out
    words = flat.select(pl.col("w").hash(seed=0).alias("hash"), pl.col("w").str.len_chars())
    text_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    ends = np.cumsum(lengths)[text_of]  # one past the text's last word, per word
    starts = np.flatnonzero(ends - np.arange(flat.height) >= n)  # an n-gram fits from here
    if len(starts) == 0:
        return out
    keys = _window_keys(words.get_column("hash").to_numpy(), n)[starts]
    keys += text_of[starts].astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    ordered = np.sort(keys)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]  # keys held by 2+ windows: few
    if len(twice):  # a hash set of those few (polars) beats a binary search per window
        shared = pl.Series(keys).is_in(pl.Series(twice).implode()).to_numpy()
        starts, keys = starts[shared], keys[shared]
    else:
        starts, keys = starts[:0], keys[:0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    earlier = starts[first[inverse]]  # start of the first window with the same key
    repeat = earlier != starts
    rep, src = starts[repeat], earlier[repeat]
    same = text_of[rep] == text_of[src]
    if len(rep):
        word = pl.col("w")
        equal = [word.gather(rep + k) == word.gather(src + k) for k in range(n)]
        same &= flat.select(pl.all_horizontal(equal)).to_series().to_numpy()
    chars = words.get_column("w").to_numpy().astype(np.int64)
    running = np.concatenate(([0], np.cumsum(chars)))  # word characters, text by text
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    total = (running[bounds[1:]] - running[bounds[:-1]]).astype(np.float64)
    covered = np.unique((rep[:, None] + np.arange(n)).ravel())  # words in a repeat: few
    dup = np.bincount(text_of[covered], weights=chars[covered], minlength=len(lengths))
    fits = (lengths >= n) & (total > 0)
    out[fits] = dup[fits] / total[fits]
    for t in np.unique(text_of[rep[~same]]).tolist():  # hash collisions: the definition
        out[t] = duplicate_ngram_fraction(str(texts[t] or ""), n)
    return out
