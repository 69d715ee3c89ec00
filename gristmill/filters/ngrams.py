"""Hashes of token windows of any size in O(1) each, from one prefix sum.

A window of tokens t_p .. t_{p+s-1} (64-bit token hashes h) hashes to
sum_j h_{p+j} * C^(j+1) mod 2^64, with C odd (so invertible mod 2^64). With the prefix
sums P_i = sum_{k<i} h_k * C^k this is C^(1-p) * (P_{p+s} - P_p): every window of every
size costs three multiplications once P is built, and the value is exactly the sum (ring
arithmetic on uint64 wraps mod 2^64).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

#: The base C: odd, so C^-1 mod 2^64 exists.
BASE = 0x9E3779B97F4A7C15
_INVERSE = pow(BASE, -1, 1 << 64)


@functools.lru_cache(maxsize=2)
def _power_table(base: int, count: int) -> np.ndarray:
    steps = np.full(count, base, dtype=np.uint64)
    steps[0] = 1
    table = np.cumprod(steps, dtype=np.uint64)
    table.setflags(write=False)
    return table


def _powers(base: int, count: int) -> np.ndarray:
    """base^0 .. base^(count-1) mod 2^64 as uint64 (a cached table, sized in powers of 2)."""
    return _power_table(base, 1 << max(count, 1).bit_length())[:count]


@dataclass(frozen=True)
class TokenWindows:
    """The token layout of many texts laid end to end, ready to hash windows."""

    text_of: np.ndarray  # int64 text of each token
    position: np.ndarray  # int64 position of each token in its text
    room: np.ndarray  # int64 tokens from each token to the end of its text
    offsets: np.ndarray  # int64 first token of each text
    lengths: np.ndarray  # int64 tokens per text
    _prefix: np.ndarray  # uint64 P_0 .. P_N
    _down: np.ndarray  # uint64 C^(1-p) for each token position p

    @classmethod
    def of(cls, values: np.ndarray, lengths: np.ndarray) -> TokenWindows:
        """The layout of `values` (uint64 token hashes, text after text) cut by `lengths`."""
        n = len(values)
        text_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        position = np.arange(n, dtype=np.int64) - offsets[text_of]
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(values.astype(np.uint64) * _powers(BASE, n), dtype=np.uint64, out=prefix[1:])
        down = _powers(_INVERSE, n) * np.uint64(BASE)
        room = lengths[text_of] - position
        return cls(text_of, position, room, offsets, lengths, prefix, down)

    def starts(self, size: int) -> np.ndarray:
        """Flat positions where a window of `size` tokens fits inside one text."""
        return np.flatnonzero(self.room >= size)

    def hashes(self, starts: np.ndarray, sizes: np.ndarray | int) -> np.ndarray:
        """The hash of the window of `sizes` tokens from each flat position in `starts`."""
        return (self._prefix[starts + sizes] - self._prefix[starts]) * self._down[starts]
