"""A global stage's input, read one part at a time and condensed (see `Select.condense`).

Each part is read with only the stage's columns, numbered by its rows' places in the whole
input (ROW_COLUMN, from the footers' row counts, so parts need not be read in order), and
condensed; the condensed parts are concatenated in input order. Up to `condense_threads()`
parts are in flight at once: Parquet reads, polars and numpy's array loops release the GIL,
so parts proceed side by side on several cores, and only their condensed forms stay.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from gristmill.pipelines.checkpoint import parquet_rows
from gristmill.pipelines.parts import read_part
from gristmill.pipelines.stage import ROW_COLUMN, Select, StageContext

#: Parts condensed at once, at most (each holds one part's columns and its working set).
MAX_THREADS = 4


def condense_threads() -> int:
    """Parts condensed at once here: one per CPU, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def condensed_input(
    stage: Select,
    ctx: StageContext,
    inputs: Sequence[Path],
    schema: pl.Schema,
    columns: Sequence[str] | None,
    *,
    threads: int | None = None,
) -> pl.DataFrame:
    """`stage.condense` of every non-empty input part (ROW_COLUMN first, then `columns`,
    None: every column), concatenated in input order. At least one part must have rows."""
    jobs: list[tuple[Path, int]] = []
    offset = 0
    for path in inputs:
        rows = parquet_rows(path)
        if rows:
            jobs.append((path, offset))
        offset += rows

    def condense(job: tuple[Path, int]) -> pl.DataFrame:
        path, start = job
        part = read_part(path, schema, columns, index=ROW_COLUMN, offset=start)
        out = stage.condense(part, ctx)
        if ROW_COLUMN not in out.columns or out.height != part.height:
            raise RuntimeError(
                f"stage {stage.name!r}: condense must keep every row of a part and the "
                f"column {ROW_COLUMN!r} ({path.name}: {part.height} rows in, {out.height} out)"
            )
        return out

    workers = min(threads or condense_threads(), len(jobs))
    if workers <= 1:
        frames = [condense(job) for job in jobs]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix=f"condense-{stage.name}") as pool:
            frames = list(pool.map(condense, jobs))
    return pl.concat(frames) if len(frames) > 1 else frames[0]
