"""Re-cutting a stream of polars frames into frames of a fixed number of rows.

The input reader cuts blocks into parts, stages cut their results into output parts and the
dataset writer cuts parts into shards; all three use this one function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import polars as pl


def cut_into_parts(frames: Iterable[pl.DataFrame], rows: int) -> Iterator[pl.DataFrame]:
    """The rows of `frames` in order, `rows` to a frame (the last may hold fewer). Frames
    without any row give one empty frame with the first one's columns; no frames, none."""
    held: list[pl.DataFrame] = []
    count = 0
    first: pl.DataFrame | None = None
    wrote = False
    for frame in frames:
        if first is None:
            first = frame.head(0)
        if not frame.height:
            continue
        held.append(frame)
        count += frame.height
        while count >= rows:
            whole = pl.concat(held) if len(held) > 1 else held[0]
            yield whole.head(rows)
            wrote = True
            rest = whole.slice(rows)
            held, count = ([rest] if rest.height else []), rest.height
    if held:
        yield pl.concat(held) if len(held) > 1 else held[0]
    elif not wrote and first is not None:
        yield first
