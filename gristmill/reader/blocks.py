"""Raw rows of an input, block by block: JSON lines, JSON arrays, Parquet, HF datasets.

A block is a run of consecutive rows together with how to name any of them in an error (the
file, and a 1-based line for JSON lines or a 0-based row otherwise). JSON is parsed with
msgspec, which returns the same Python values as the json module or fails; when it fails the
block is parsed again line by line with json, which accepts what json accepts (NaN, blank
lines) and names the first bad line exactly as before. JSON rows are kept by column.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.records import INPUT_FORMATS, RecordError, describe_value

#: What a JSON row holds for a key it lacks.
MISSING: Final = object()
#: Lines of a block whose keys are learnt before the rest is decoded against them.
KEY_SAMPLE: Final = 1000


@dataclass(frozen=True)
class BlockSize:
    """How much of an input one block holds: bytes of JSON lines, rows of the other formats."""

    bytes: int = 16 << 20
    rows: int = 65_536


@dataclass(frozen=True, kw_only=True)
class RowBlock:
    """Rows read from one stretch of an input, before mapping, and how to name a row.

    JSON input keeps the parsed values by column (`data`, `MISSING` where a row lacks the
    key, with line numbers for JSON lines); Parquet and HF input keep the typed Arrow
    `table`, so extra columns keep their types. `columns` lists the block's columns in
    order of first appearance (for a later block of JSON lines: the first block's, then
    any new ones).
    """

    where: str
    columns: tuple[str, ...]
    length: int
    data: dict[str, list[Any]] | None = None
    lines: Sequence[int] | None = None
    table: pa.Table | None = None
    first_row: int = 0

    def line_of(self, i: int) -> int | None:
        """The 1-based line number of row `i` (JSON lines only)."""
        return self.lines[i] if self.lines is not None else None

    def row_of(self, i: int) -> int | None:
        """The 0-based index of row `i` in the whole input (all formats but JSON lines)."""
        return None if self.lines is not None else self.first_row + i

    def values(self, column: str) -> list[Any]:
        """A column as Python values; `MISSING` where a JSON row lacks the key."""
        if self.table is not None:
            return list(self.table.column(column).to_pylist())
        assert self.data is not None
        return self.data.get(column, [MISSING] * self.length)

    def take(self, start: int, stop: int) -> RowBlock:
        """Rows `start` to `stop` (exclusive) as a block of their own, positions kept."""
        stop = min(stop, self.length)
        data = self.data
        return RowBlock(
            where=self.where,
            columns=self.columns,
            length=max(stop - start, 0),
            data={c: v[start:stop] for c, v in data.items()} if data is not None else None,
            lines=self.lines[start:stop] if self.lines is not None else None,
            table=self.table.slice(start, stop - start) if self.table is not None else None,
            first_row=self.first_row + start,
        )


def _keys(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """Every key of the rows in order of first appearance (distinct key lists, then keys)."""
    return tuple(dict.fromkeys(key for keys in dict.fromkeys(map(tuple, rows)) for key in keys))


def _by_column(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """JSON objects as columns, in order of first appearance; MISSING where a key is absent."""
    return {key: [r.get(key, MISSING) for r in rows] for key in _keys(rows)}


def _json_block(where: str, data: dict[str, list[Any]], length: int, **position: Any) -> RowBlock:
    return RowBlock(where=where, columns=tuple(data), length=length, data=data, **position)


# ---- JSON lines -----------------------------------------------------------------------------


def exact_json_lines(raw: bytes, where: str, first_line: int, first_byte: int) -> RowBlock:
    """One JSON object per line, parsed with json; blank lines are skipped; errors name the
    1-based line (and, for bad UTF-8, the byte offset in the whole file)."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    offset = first_byte
    kind = "decompressed file" if where.lower().endswith(".gz") else "file"
    for number, line in enumerate(raw.split(b"\n"), start=first_line):
        start, offset = offset, offset + len(line) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(
                where,
                f"invalid UTF-8 ({exc.reason}) at byte {exc.start} of the line "
                f"(byte offset {start + exc.start} of the {kind})",
                line=number,
            ) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(
                where, f"invalid JSON at column {exc.colno}: {exc.msg}", line=number
            ) from None
        if not isinstance(obj, dict):
            raise RecordError(
                where, f"expected a JSON object, got {describe_value(obj)}", line=number
            )
        rows.append(obj)
        lines.append(number)
    return _json_block(where, _by_column(rows), len(rows), lines=lines)


_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _decode_objects(lines: list[bytes]) -> dict[str, list[Any]] | None:
    """Lines that are each one JSON object, by column; None if one is not."""
    try:
        rows = list(map(msgspec.json.Decoder().decode, lines))
    except _DECODE_ERRORS:
        return None
    return _by_column(rows) if all(type(r) is dict for r in rows) else None


def _decode_known(lines: list[bytes], keys: Sequence[str]) -> dict[str, list[Any]] | None:
    """Lines that are each one JSON object with no keys but `keys`, by column, decoded into
    a msgspec Struct (faster than dicts, same values); None if a line is anything else.
    Parsed JSON holds no reference cycles, so the rows need no garbage-collector tracking."""
    names = [f"k{i}" for i in range(len(keys))]
    row = msgspec.defstruct(
        "Row",
        [(name, Any, MISSING) for name in names],
        rename=dict(zip(names, keys, strict=True)),
        forbid_unknown_fields=True,
        gc=False,
    )
    try:
        rows = list(map(msgspec.json.Decoder(row).decode, lines))
    except (*_DECODE_ERRORS, msgspec.ValidationError):
        return None
    getters = [operator.attrgetter(n) for n in names]
    return {key: list(map(get, rows)) for key, get in zip(keys, getters, strict=True)}


def _json_lines(
    raw: bytes, where: str, first_line: int, first_byte: int, keys: Sequence[str]
) -> tuple[RowBlock, int]:
    """Like `exact_json_lines`, parsed by msgspec when every line is one JSON object: against
    `keys` (those of the block before, else of its first lines) when no line has another.
    Also the number of line breaks in `raw` (where the next block's lines start)."""
    lines = raw.split(b"\n")
    breaks = len(lines) - 1
    if lines[-1] == b"":
        lines.pop()
    if not keys:
        sample = _decode_objects(lines[:KEY_SAMPLE])
        keys = tuple(sample) if sample is not None else ()
    data = _decode_known(lines, keys) if keys else None
    if data is None:
        data = _decode_objects(lines)
    if data is None:
        return exact_json_lines(raw, where, first_line, first_byte), breaks
    numbers = range(first_line, first_line + len(lines))
    return _json_block(where, data, len(lines), lines=numbers), breaks


def _line_pieces(stream: io.BufferedIOBase, size: int | None) -> Iterator[bytes]:
    """A byte stream in pieces that end at a line break (the last may not); one piece when
    `size` is None."""
    if size is None:
        yield stream.read()
        return
    while chunk := stream.read(size):  # finished to the line's end: one copy, not two
        if not chunk.endswith(b"\n"):
            chunk += stream.readline()
        yield chunk


def _json_line_blocks(pieces: Iterator[bytes], where: str) -> Iterator[RowBlock]:
    """Blocks of JSON lines, numbered from the first piece."""
    line, offset = 1, 0
    keys: tuple[str, ...] = ()
    for piece in pieces:
        block, breaks = _json_lines(piece, where, line, offset, keys)
        yield block
        line += breaks
        offset += len(piece)
        keys = keys or block.columns


def _without_bom(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The pieces with a UTF-8 BOM dropped from the start (byte offsets count after it)."""
    for k, piece in enumerate(pieces):
        yield piece.removeprefix(codecs.BOM_UTF8) if k == 0 else piece


def _gzip_errors(pieces: Iterator[bytes], where: str) -> Iterator[bytes]:
    """Pieces of a gzip stream; a broken stream is a RecordError."""
    try:
        yield from pieces
    except (OSError, EOFError) as exc:
        raise RecordError(where, f"not a readable gzip file: {exc}") from None


def _whole_file(path: Path, where: str) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise RecordError(where, f"not a readable gzip file: {exc}") from None
    return data.removeprefix(codecs.BOM_UTF8)


def _file_pieces(path: Path, where: str, size: int | None) -> Iterator[bytes]:
    """The file's bytes (decompressed for `.gz`) in line-aligned pieces."""
    if size is None:  # as one piece, read the way the whole file always was
        yield _whole_file(path, where)
        return
    if not path.name.lower().endswith(".gz"):
        with path.open("rb") as fh:
            yield from _without_bom(_line_pieces(fh, size))
        return
    with gzip.open(path, "rb") as fh:
        yield from _without_bom(_gzip_errors(_line_pieces(fh, size), where))


def _jsonl_blocks(path: Path, where: str, size: BlockSize | None) -> Iterator[RowBlock]:
    pieces = _file_pieces(path, where, size.bytes if size is not None else None)
    yield from _json_line_blocks(pieces, where)


# ---- JSON arrays ----------------------------------------------------------------------------


def exact_json_array(raw: bytes, where: str) -> list[dict[str, Any]]:
    """A JSON array of objects, parsed with json; errors name the line or the 0-based row."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecordError(
            where, f"invalid UTF-8 ({exc.reason}) at byte offset {exc.start}", line=line
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            where, f"invalid JSON at column {exc.colno}: {exc.msg}", line=exc.lineno
        ) from None
    if not isinstance(data, list):
        raise RecordError(where, f"expected a JSON array of objects, got {describe_value(data)}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise RecordError(where, f"expected a JSON object, got {describe_value(obj)}", row=i)
    return data


def _json_array(raw: bytes, where: str) -> list[dict[str, Any]]:
    """Like `exact_json_array`, parsed by msgspec when the file is an array of objects."""
    try:
        data = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return exact_json_array(raw, where)
    if not isinstance(data, list) or not all(type(r) is dict for r in data):
        return exact_json_array(raw, where)
    return data


def _json_blocks(path: Path, where: str, size: BlockSize | None) -> Iterator[RowBlock]:
    """A JSON array of objects (rows named by 0-based index), else JSON lines. An array is
    parsed whole; its rows are then handed out in blocks."""
    raw = _whole_file(path, where)
    if not raw.lstrip().startswith(b"["):
        pieces = _line_pieces(io.BytesIO(raw), size.bytes if size is not None else None)
        yield from _json_line_blocks(pieces, where)
        return
    data = _json_array(raw, where)
    step = size.rows if size is not None else max(len(data), 1)
    for start in range(0, max(len(data), 1), step):
        rows = data[start : start + step]
        yield _json_block(where, _by_column(rows), len(rows), first_row=start)


# ---- Parquet and HF datasets ----------------------------------------------------------------


def _table_block(table: pa.Table, where: str, first_row: int) -> RowBlock:
    return RowBlock(
        where=where,
        columns=tuple(table.column_names),
        length=table.num_rows,
        table=table,
        first_row=first_row,
    )


def _parquet_table(path: Path, where: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise RecordError(where, f"not a readable Parquet file: {exc}") from None


def _parquet_blocks(path: Path, where: str, size: BlockSize | None) -> Iterator[RowBlock]:
    if size is None:
        yield _table_block(_parquet_table(path, where), where, 0)
        return
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        _parquet_table(path, where)  # raises the error read_table gives, as the whole read
        raise
    start = 0
    try:
        for batch in file.iter_batches(batch_size=size.rows):
            yield _table_block(pa.Table.from_batches([batch]), where, start)
            start += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise RecordError(where, f"not a readable Parquet file: {exc}") from None
    finally:
        file.close()


def _hf_dataset(name: str, where: str, split: str) -> Any:
    """A dataset saved with `save_to_disk`, or anything `datasets.load_dataset` takes."""
    import datasets  # heavy import, only needed here

    folder = Path(name)
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    if folder.is_dir() and any((folder / f).exists() for f in saved):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise RecordError(where, f"no split {split!r}; the dataset has {list(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(name, split=split)
    if not isinstance(loaded, datasets.Dataset):
        raise RecordError(where, f"expected one split of a dataset, got {type(loaded).__name__}")
    return loaded.with_format("arrow")


def _hf_blocks(name: str, where: str, split: str, size: BlockSize | None) -> Iterator[RowBlock]:
    dataset = _hf_dataset(name, where, split)
    step = size.rows if size is not None else max(len(dataset), 1)
    for start in range(0, max(len(dataset), 1), step):
        yield _table_block(dataset[start : start + step], where, start)


# ---- entry points ---------------------------------------------------------------------------


def iter_blocks(
    path: str | Path, fmt: str, split: str, size: BlockSize | None
) -> Iterator[RowBlock]:
    """Raw rows of a jsonl/json/parquet file or an HF dataset in blocks of about `size`
    (the whole input as one block when `size` is None); blocks may be empty."""
    where = str(path)
    if fmt != "hf" and not Path(path).is_file():
        if Path(path).is_dir():
            raise IsADirectoryError(f"{where}: is a folder; read folders with format='hf'")
        raise FileNotFoundError(f"{where}: no such file")
    match fmt:
        case "jsonl":
            return _jsonl_blocks(Path(path), where, size)
        case "json":
            return _json_blocks(Path(path), where, size)
        case "parquet":
            return _parquet_blocks(Path(path), where, size)
        case "hf":
            return _hf_blocks(str(path), where, split, size)
    raise ValueError(f"{where}: unknown format {fmt!r}; expected one of {list(INPUT_FORMATS)}")


def load_rows(path: str | Path, fmt: str, split: str) -> RowBlock:
    """Raw rows of a whole input, with line/row positions for error messages (no mapping,
    no validation)."""
    (block,) = iter_blocks(path, fmt, split, None)
    return block
