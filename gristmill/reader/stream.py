"""Records from an input, block by block: `iter_record_batches` streams, `read_records` reads
the input whole.

Each block is parsed (`blocks`), the mapping resolved once from the first block (`plan`),
and its records built by the columnar path, or row by row where that path cannot vouch for
a block (`rowcheck`, which also phrases every error). The input keeps the schema of its
first block: a later block with a new column, or an extra column of a wider type, raises
`SchemaDrift`, since the batches handed out before it cannot change; `read_records` then
reads the input again as one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.frames import cut_into_parts
from gristmill.reader.blocks import MISSING, BlockSize, RowBlock, iter_blocks
from gristmill.reader.columnar import core_columnar, first_rejected
from gristmill.reader.plan import Plan, make_plan
from gristmill.reader.rowcheck import core_by_row, extras_frame
from gristmill.records import INPUT_FORMATS, RecordError, default_source, infer_format

#: The block both readers use: about 16 MiB of JSON lines, 65,536 rows of the other formats.
DEFAULT_BLOCK = BlockSize()


class SchemaDrift(RecordError):
    """A later block of a streamed input has a column, or an extra column of a wider type,
    that the batches already handed out lack. Reading the input whole gives every row one
    schema, as `read_records` does."""


def _core_by_row(block: RowBlock, plan: Plan) -> pl.DataFrame:
    """The block's core columns, row by row; the row the columnar path turned down first is
    checked on its own before, so a bad row is named without going through the rows
    before it one at a time."""
    suspect = first_rejected(block, plan)
    core_by_row(block.take(suspect, suspect + 1), plan)  # raises when that row is bad
    return core_by_row(block, plan)


def _block_records(block: RowBlock, plan: Plan) -> pl.DataFrame:
    """A block's records: core columns first, then the extras as they are."""
    core = core_columnar(block, plan)
    if core is None:
        core = _core_by_row(block, plan)
    if not plan.extras:
        return core
    return pl.concat([core, extras_frame(block, plan.extras)], how="horizontal")


def _check_columns(block: RowBlock, plan: Plan) -> None:
    """A later block may not bring a column the first block lacked."""
    new = [c for c in block.columns if c not in plan.input_columns]
    if not new:
        return
    first = next(i for i, v in enumerate(block.values(new[0])) if v is not MISSING)
    raise SchemaDrift(
        block.where,
        "this column first appears here, after the records before it were made without it",
        line=block.line_of(first),
        row=block.row_of(first),
        field=new[0],
    )


def _conform(frame: pl.DataFrame, schema: pl.Schema, block: RowBlock) -> pl.DataFrame:
    """The block's records in the first block's schema: an all-null extra takes the type it
    had before, integers join floats; any other difference is `SchemaDrift`."""
    casts = []
    for name, want in schema.items():
        got = frame.schema[name]
        if got == want:
            continue
        if got == pl.Null() or (got == pl.Int64() and want == pl.Float64()):
            casts.append(pl.col(name).cast(want))
            continue
        raise SchemaDrift(
            block.where,
            f"has type {got} from here on, but {want} in the rows before",
            line=block.line_of(0),
            row=block.row_of(0),
            field=name,
        )
    return frame.with_columns(casts) if casts else frame


def _record_frames(
    path: str | Path,
    *,
    format: str | None,  # noqa: A002 - the natural name for the caller
    mapping: Mapping[str, str] | None,
    source: str | None,
    split: str,
    size: BlockSize | None,
) -> Iterator[pl.DataFrame]:
    """Each non-empty block's records, all in the schema of the first; an input without
    rows is a RecordError."""
    fmt = format if format is not None else infer_format(path)
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    plan: Plan | None = None
    schema: pl.Schema | None = None
    for block in iter_blocks(path, fmt, split, size):
        if block.length == 0:
            continue
        if plan is None:
            plan = make_plan(block, mapping, source, default_source(path))
        else:
            _check_columns(block, plan)
        frame = _block_records(block, plan)
        if schema is None:
            schema = frame.schema
        else:
            frame = _conform(frame, schema, block)
        yield frame
    if plan is None:
        raise RecordError(str(path), "no records (the input is empty)")


def _limited(frames: Iterable[pl.DataFrame], limit: int | None) -> Iterator[pl.DataFrame]:
    """The first `limit` rows (all when None); reading stops at the block that reaches it."""
    seen = 0
    for frame in frames:
        if limit is not None and seen + frame.height >= limit:
            yield frame.head(limit - seen)
            return
        seen += frame.height
        yield frame


def iter_record_batches(
    path: str | Path,
    *,
    rows: int,
    format: str | None = None,  # noqa: A002 - the natural name for the caller
    mapping: Mapping[str, str] | None = None,
    source: str | None = None,
    split: str = "train",
    limit: int | None = None,
    size: BlockSize | None = None,
) -> Iterator[pl.DataFrame]:
    """The input's records in frames of `rows` rows (the last may be shorter), validated and
    built a block at a time, so memory holds about one block, not the input.

    Options as for `read_records`; `limit` keeps the first rows only and stops reading there;
    `size` sets the block (default `DEFAULT_BLOCK`). The batches equal `read_records` cut into
    `rows`-row slices, except that a bad row raises once the batches before it are out, and
    an input whose later rows add a column or widen an extra column's type raises
    `SchemaDrift` (read it whole with `read_records`).
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    frames = _record_frames(
        path,
        format=format,
        mapping=mapping,
        source=source,
        split=split,
        size=size if size is not None else DEFAULT_BLOCK,
    )
    yield from cut_into_parts(_limited(frames, limit), rows)


def read_records(
    path: str | Path,
    *,
    format: str | None = None,  # noqa: A002 - the natural name for the caller
    mapping: Mapping[str, str] | None = None,
    source: str | None = None,
    split: str = "train",
) -> pl.DataFrame:
    """Read a dataset file into a validated records frame (core columns first, extras kept).

    `format` is one of jsonl, json, parquet, hf (inferred from the suffix, `.gz` allowed for
    JSON; a directory is hf). A json file that is not an array is read as JSON lines.
    `mapping` maps record fields to the input's columns: either `messages` (a list of
    {role, content}) or `prompt` with optional `input` (Alpaca: appended after a blank line),
    `response` and `system`; plus optional `reference`, `source`, `parent_id`, `model`.
    Unmapped fields default to same-named columns. `source` (a constant) defaults to a
    `source` column, else the file name without suffixes. `split` picks the split of an hf
    dataset. Columns the mapping uses are consumed; other columns are kept as they are,
    except those named like core columns (`id`, and `prompt`/`response` beside `messages`),
    which are derived again. Every row is checked before anything is returned: the first
    bad row raises RecordError naming the file, the row and the field.

    The input is read a block at a time (so memory holds one block's parsed rows, not the
    input's); on any RecordError it is read again as one block, which names the error
    exactly as the whole-input reader always did (parse errors anywhere before bad fields)
    and, after `SchemaDrift`, gives every row the whole input's columns and types.
    """
    options: dict[str, Any] = {
        "format": format,
        "mapping": mapping,
        "source": source,
        "split": split,
    }
    try:
        frames = list(_record_frames(path, size=DEFAULT_BLOCK, **options))
    except RecordError:
        frames = list(_record_frames(path, size=None, **options))
    return pl.concat(frames) if len(frames) > 1 else frames[0]
