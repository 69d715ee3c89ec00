"""Walking a stage's parts one at a time, and cutting a stream of rows into parts.

`read_parts` (checkpoint.py) reads every part at once and concatenates them with
`diagonal_relaxed`: columns in order of first appearance, each at the supertype of its types,
empty parts left out unless all are empty. `common_schema` computes that schema from the
parts' footers and `read_part` reads one part under it, so a global stage and the dataset
writer can go part by part, holding one part in memory, and get the rows, columns and types
a whole read gives (`gristmill.frames.cut_into_parts` then re-cuts them into output parts
or shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from gristmill.pipelines.checkpoint import parquet_rows


def common_schema(paths: Sequence[Path]) -> pl.Schema:
    """The schema `read_parts(paths)` has, from the footers alone."""
    nonempty = [p for p in paths if parquet_rows(p) > 0] or list(paths)
    if not nonempty:
        return pl.Schema()
    empty = [pl.DataFrame(schema=pl.read_parquet_schema(p)) for p in nonempty]
    return empty[0].schema if len(empty) == 1 else pl.concat(empty, how="diagonal_relaxed").schema


def read_part(
    path: Path,
    schema: pl.Schema,
    columns: Sequence[str] | None = None,
    *,
    index: str | None = None,
    offset: int = 0,
) -> pl.DataFrame:
    """One part's `columns` (None: all of `schema`) at `schema`'s types and in that order; a
    column the part lacks is all null, as in a relaxed concatenation. With `index`, a first
    column of that name numbers the rows from `offset` (their place in the whole input)."""
    wanted = list(schema) if columns is None else list(columns)
    has = pl.read_parquet_schema(path)
    present = [c for c in wanted if c in has]
    frame = pl.read_parquet(path, columns=present or list(has)[:1])  # one column keeps the height
    if index is not None:
        frame = frame.with_row_index(index, offset=offset)
    frame = frame.with_columns(
        pl.lit(None, dtype=schema[c]).alias(c) for c in wanted if c not in has
    )
    first = [index] if index is not None else []
    return frame.select(*first, *(pl.col(c).cast(schema[c]) for c in wanted))
