"""Hashes of token windows of any size in O(1) each, from one prefix sum.

A window of tokens t_p .. t_{p+s-1} (64-bit token hashes h) hashes to
sum_j h_{p+j} * C^(j+1) mod 2^64, with C odd (so invertible mod 2^64). With the prefix
sums P_i = sum_{k<i} h_k * C^k this is C^(1-p) * (P_{p+s} - P_p): every window of every
size costs three multiplications once P is built, and the value is exactly the sum (ring
arithmetic on uint64 wraps mod 2^64).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

#: The base C: odd, so C^-1 mod 2^64 exists.
BASE = 0x9E3779B97F4A7C15
_INVERSE = pow(BASE, -1, 1 << 64)


class _Powers:
    """base^0 .. base^(n-1) mod 2^64, one table per base, grown (doubling) when a longer one
    is asked for, so every call after the first few is a slice."""

    def __init__(self, base: int, factor: int = 1) -> None:
        self.base, self.factor = base, factor
        self.table = np.zeros(0, dtype=np.uint64)
        self.lock = threading.Lock()  # condense threads may ask at once

    def __call__(self, count: int) -> np.ndarray:
        table = self.table
        if len(table) < count:
            with self.lock:
                if len(self.table) < count:
                    size = 1 << max(count, 1).bit_length()
                    steps = np.full(size, self.base, dtype=np.uint64)
                    steps[0] = self.factor  # factor * base^k
                    grown = np.cumprod(steps, dtype=np.uint64)
                    grown.setflags(write=False)
                    self.table = grown
                table = self.table
        return table[:count]


#: C^k, and C^(1-k) (the factor that brings a window starting at token k down to C^1).
_UP = _Powers(BASE)
_DOWN = _Powers(_INVERSE, BASE)


@dataclass(frozen=True)
class TokenWindows:
    """The token layout of many texts laid end to end, ready to hash windows."""

    text_of: np.ndarray  # int64 text of each token
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
        ends = np.cumsum(lengths, dtype=np.int64)
        offsets = ends - lengths
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.multiply(values.astype(np.uint64, copy=False), _UP(n), out=prefix[1:])
        np.cumsum(prefix[1:], dtype=np.uint64, out=prefix[1:])
        room = ends[text_of]
        room -= np.arange(n, dtype=np.int64)
        return cls(text_of, room, offsets, lengths, prefix, _DOWN(n))

    def positions(self, flat: np.ndarray) -> np.ndarray:
        """The position of each token of `flat` (flat token indices) within its text."""
        return flat - self.offsets[self.text_of[flat]]

    def starts(self, size: int) -> np.ndarray:
        """Flat positions where a window of `size` tokens fits inside one text."""
        return np.flatnonzero(self.room >= size)

    def hashes(self, starts: np.ndarray, sizes: np.ndarray | int) -> np.ndarray:
        """The hash of the window of `sizes` tokens from each flat position in `starts`."""
        return (self._prefix[starts + sizes] - self._prefix[starts]) * self._down[starts]
