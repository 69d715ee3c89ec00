"""A global stage's decision, and how it is joined back onto its input part by part.

A Select stage sees its input (every column, or only those it `reads()`) with ROW_COLUMN,
each row's place in the whole input. What it returns is a decision: the rows it keeps, the
rows it drops with a specific reason, and the columns it sets on them. `decide` keeps that,
sorted by row and trimmed to the columns the input parts do not already hold; `apply` then
rebuilds one input part's kept and rejected rows from it, with the columns, order and types
that `select` over every column of the whole input would have given. Only the decision and
one part are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from gristmill.pipelines.stage import ROW_COLUMN
from gristmill.records import DROP_REASON

#: Drop reason of input rows absent from a global stage's result.
NOT_SELECTED = "not_selected"


@dataclass(frozen=True)
class Decision:
    """What a global stage decided, by row index (both frames sorted by ROW_COLUMN)."""

    #: Kept rows: ROW_COLUMN and the columns the stage set (every column when not joined).
    kept: pl.DataFrame
    #: Rows dropped with a specific reason: the same, with `drop_reason`.
    dropped: pl.DataFrame
    #: Whether a row's other columns come from the input (the stage declared its reads)
    #: rather than from the stage's result as it is.
    joins_input: bool


def split_drops(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows without a drop reason (the column removed) and rows with one."""
    if DROP_REASON not in frame.columns:
        return frame, frame.head(0)
    dropped = frame.filter(pl.col(DROP_REASON).is_not_null())
    kept = frame.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON)
    return kept, dropped


def projection(reads: Sequence[str] | None, schema: pl.Schema) -> list[str] | None:
    """The input columns a stage that `reads` these gets, in input order (`drop_reason` too,
    when the input has it); None when it reads every column."""
    if reads is None:
        return None
    wanted = {*reads, DROP_REASON}
    return [c for c in schema if c in wanted]


def decide(
    result: pl.DataFrame,
    *,
    rows: int,
    projected: Sequence[str] | None,
    produced: Collection[str],
    stage: str,
    condensed: Collection[str] = (),
) -> Decision:
    """The decision in a stage's `result` over `rows` input rows. With a projection, the
    columns it read and did not produce are left out (before the rows are split, so no text
    is copied): `apply` takes them from the input. So are `condensed`, the columns the
    stage's `condense` added, unless it produces them."""
    if ROW_COLUMN not in result.columns:
        raise RuntimeError(f"stage {stage!r} dropped the internal column {ROW_COLUMN!r}")
    if not _are_positions(result.get_column(ROW_COLUMN), rows):
        raise RuntimeError(
            f"stage {stage!r} returned {ROW_COLUMN!r} values that are not positions of its "
            f"{rows} input rows; pass the column through unchanged"
        )
    if projected is not None:
        passed = [c for c in [*projected, *condensed] if c not in produced and c != DROP_REASON]
        result = result.drop(passed, strict=False)
    kept, dropped = split_drops(result)
    return Decision(
        kept.sort(ROW_COLUMN, maintain_order=True),
        dropped.sort(ROW_COLUMN, maintain_order=True),
        joins_input=projected is not None,
    )


def _are_positions(index: pl.Series, rows: int) -> bool:
    """Whether every value is the position of one of `rows` input rows."""
    if not index.len():
        return True
    if not index.dtype.is_integer() or index.null_count():
        return False
    values = index.to_numpy()
    return bool(values.min() >= 0 and values.max() < rows)


def apply(decision: Decision, part: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One input part's kept rows and rejected rows (with `drop_reason`), both in input
    order and without ROW_COLUMN. `part` holds ROW_COLUMN first, then every input column."""
    index = part.get_column(ROW_COLUMN)
    low = int(index[0]) if part.height else 0
    high = low + part.height
    kept_rows = _rows_between(decision.kept, low, high)
    dropped_rows = _rows_between(decision.dropped, low, high)
    kept = _complete(kept_rows, part, low, joined=decision.joins_input)
    specific = _complete(dropped_rows, part, low, joined=decision.joins_input)
    decided = np.zeros(part.height, dtype=bool)
    for rows in (kept_rows, dropped_rows):
        decided[rows.get_column(ROW_COLUMN).to_numpy().astype(np.int64) - low] = True
    unselected = part.filter(pl.Series(~decided)).with_columns(
        pl.lit(NOT_SELECTED).alias(DROP_REASON)
    )
    rejected = pl.concat([specific, unselected], how="diagonal_relaxed").sort(ROW_COLUMN)
    return kept.drop(ROW_COLUMN), rejected.drop(ROW_COLUMN)


def _rows_between(frame: pl.DataFrame, low: int, high: int) -> pl.DataFrame:
    """The rows of `frame` (sorted by ROW_COLUMN) whose index is in [low, high)."""
    index = frame.get_column(ROW_COLUMN)
    start = int(index.search_sorted(low, side="left"))
    stop = int(index.search_sorted(high, side="left"))
    return frame.slice(start, stop - start)


def _complete(rows: pl.DataFrame, part: pl.DataFrame, low: int, *, joined: bool) -> pl.DataFrame:
    """Decision rows with the input's columns: the input's order, the stage's values where
    it set them, then the columns it added, in its order. Unjoined: the rows as they are."""
    if not joined:
        return rows
    local = rows.get_column(ROW_COLUMN).cast(pl.Int64) - low
    base = part.select(pl.all().gather(local))
    own = set(rows.columns)
    columns = [
        rows.get_column(c) if c in own else base.get_column(c)
        for c in part.columns
        if c in own or c != DROP_REASON
    ]
    columns += [rows.get_column(c) for c in rows.columns if c not in part.columns]
    return pl.DataFrame(columns)
