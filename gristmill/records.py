"""The record contract: one declared Arrow schema, stable ids, and helpers to build records.

Arrow is the contract, polars the working type, Parquet the storage. Every stage may rely
on the CORE columns below; scoring stages add `score__<name>` float64 columns; filters set
`drop_reason` on rows they send to the `rejected/` side output.

Sections: the schema and record builders; `RecordError` (names file, row and field);
`read_records` (jsonl, json, parquet, hf, with a column mapping, all rows validated);
`validate_frame` (stage outputs); trainer formats (`to_sft`, `to_prompt_completion`,
`to_preference`, `to_chat_preference`) and the atomic writers `write_table` / `write_format`.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.atomic import atomic_path

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

#: Columns every record has, in order, with their Arrow types.
CORE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=True),
        pa.field("reference", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("parent_id", pa.string(), nullable=True),
        pa.field("model", pa.string(), nullable=True),
    ]
)
CORE_COLUMNS: tuple[str, ...] = tuple(CORE_SCHEMA.names)
SCORE_PREFIX = "score__"
DROP_REASON = "drop_reason"

#: The polars dtypes matching CORE_SCHEMA, for building empty or typed frames.
POLARS_CORE: dict[str, pl.DataType] = {
    "id": pl.String(),
    "messages": pl.List(pl.Struct({"role": pl.String(), "content": pl.String()})),
    "prompt": pl.String(),
    "response": pl.String(),
    "reference": pl.String(),
    "source": pl.String(),
    "parent_id": pl.String(),
    "model": pl.String(),
}


def score_column(name: str) -> str:
    """The column name a scoring stage writes: `score__<name>`."""
    return f"{SCORE_PREFIX}{name}"


def record_id(messages: Sequence[Mapping[str, Any]], reference: str | None = None) -> str:
    """Stable content hash of a record's defining fields (its conversation and reference)."""
    canon = json.dumps(
        {
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "reference": reference,
        },
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:20]


def last_turn(messages: Sequence[Mapping[str, Any]], role: str) -> str | None:
    """Content of the last message with `role`, or None."""
    for m in reversed(messages):
        if m["role"] == role:
            return str(m["content"])
    return None


def make_record(
    messages: Sequence[Mapping[str, Any]],
    *,
    source: str,
    reference: str | None = None,
    parent_id: str | None = None,
    model: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one record dict with derived `id`, `prompt` and `response`."""
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt = last_turn(msgs, "user")
    if prompt is None:
        raise ValueError("a record needs at least one user message")
    return {
        "id": record_id(msgs, reference),
        "messages": msgs,
        "prompt": prompt,
        "response": last_turn(msgs, "assistant"),
        "reference": reference,
        "source": source,
        "parent_id": parent_id,
        "model": model,
        **extra,
    }


def records_frame(
    rows: Iterable[Mapping[str, Any]], extra_schema: Mapping[str, pl.DataType] | None = None
) -> pl.DataFrame:
    """A polars frame of records with the core columns typed (also when `rows` is empty)."""
    schema: dict[str, pl.DataType] = dict(POLARS_CORE)
    if extra_schema:
        schema.update(extra_schema)
    rows = list(rows)
    if not rows:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(rows, schema_overrides=schema, infer_schema_length=None)
    ordered = [c for c in schema if c in frame.columns]
    return frame.select(ordered + [c for c in frame.columns if c not in schema])


def empty_like(frame: pl.DataFrame) -> pl.DataFrame:
    """Zero rows with `frame`'s schema."""
    return frame.head(0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

ROLES: tuple[str, ...] = ("system", "user", "assistant")


class RecordError(ValueError):
    """Bad input data. The message names the file (or frame), the row and the field.

    Rows are named by `line` (1-based line number, JSON-lines input) or by `row`
    (0-based row index: JSON arrays, Parquet, HF datasets and frames).
    """

    def __init__(
        self,
        where: str,
        problem: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        column: str | None = None,
    ) -> None:
        self.where, self.problem = where, problem
        self.line, self.row, self.field, self.column = line, row, field, column
        parts = [where]
        if line is not None:
            parts.append(f"line {line}")
        elif row is not None:
            parts.append(f"row {row} (0-based)")
        if field is not None:
            mapped = f" (column {column!r})" if column is not None and column != field else ""
            parts.append(f"field {field!r}{mapped}")
        super().__init__(": ".join([*parts, problem]))

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive pickling (Prefect pickles task errors).
        args = (self.where, self.problem, self.line, self.row, self.field, self.column)
        return (_rebuild_record_error, args)


def _rebuild_record_error(
    where: str,
    problem: str,
    line: int | None,
    row: int | None,
    field: str | None,
    column: str | None,
) -> RecordError:
    return RecordError(where, problem, line=line, row=row, field=field, column=column)


class _Invalid(Exception):
    """A bad value, before its location is known; turned into a RecordError by the caller."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


def _describe(value: Any) -> str:
    """A short `type value` description of a bad value for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------------------------
# Reading: load raw rows (jsonl, json, parquet, hf), then map columns onto records
# --------------------------------------------------------------------------------------------

InputFormat = Literal["jsonl", "json", "parquet", "hf"]
INPUT_FORMATS: tuple[str, ...] = ("jsonl", "json", "parquet", "hf")

#: Record fields a mapping may point at a file column.
MAPPABLE_FIELDS: tuple[str, ...] = (
    "messages",
    "prompt",
    "input",
    "response",
    "system",
    "reference",
    "source",
    "parent_id",
    "model",
)
#: Fields that build the conversation from a single prompt (instead of `messages`).
_PROMPT_FIELDS = ("prompt", "input", "response", "system")

_SUFFIXES: tuple[tuple[str, InputFormat], ...] = (
    (".jsonl", "jsonl"),
    (".jsonl.gz", "jsonl"),
    (".ndjson", "jsonl"),
    (".json", "json"),
    (".json.gz", "json"),
    (".parquet", "parquet"),
)

MISSING: Final = object()


def infer_format(path: str | Path) -> InputFormat:
    """The input format implied by a path: a directory is `hf`, else the file's suffix."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    name = p.name.lower()
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    known = ", ".join(s for s, _ in _SUFFIXES)
    raise ValueError(
        f"{path}: cannot tell the format from the name (known suffixes: {known}); "
        f"pass format= one of {list(INPUT_FORMATS)}"
    )


def default_source(path: str | Path) -> str:
    """The file (or dataset) name without its format suffixes: `gsm8k.jsonl.gz` -> `gsm8k`."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass(frozen=True, kw_only=True)
class _Input:
    """Rows read from one input, before mapping, and how to name a row in errors.

    JSON input keeps the parsed objects (`rows`, with their line numbers for JSON lines);
    Parquet and HF input keep the typed Arrow `table`, so extra columns keep their types.
    """

    where: str
    columns: tuple[str, ...]
    length: int
    rows: list[dict[str, Any]] | None = None
    lines: list[int] | None = None
    table: pa.Table | None = None

    def line_of(self, i: int) -> int | None:
        """The 1-based line number of row `i` (JSON lines only)."""
        return self.lines[i] if self.lines is not None else None

    def row_of(self, i: int) -> int | None:
        """The 0-based index of row `i` (all formats but JSON lines)."""
        return None if self.lines is not None else i

    def values(self, column: str) -> list[Any]:
        """A column as Python values; `MISSING` where a JSON row lacks the key."""
        if self.table is not None:
            return list(self.table.column(column).to_pylist())
        assert self.rows is not None
        return [r.get(column, MISSING) for r in self.rows]


def _read_bytes(path: Path, where: str) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise RecordError(where, f"not a readable gzip file: {exc}") from None
    return data.removeprefix(codecs.BOM_UTF8)


def _parse_json_lines(raw: bytes, where: str) -> _Input:
    """One JSON object per line; blank lines are skipped; errors name the 1-based line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    offset = 0
    kind = "decompressed file" if where.lower().endswith(".gz") else "file"
    for number, line in enumerate(raw.split(b"\n"), start=1):
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
            raise RecordError(where, f"expected a JSON object, got {_describe(obj)}", line=number)
        rows.append(obj)
        lines.append(number)
    columns = tuple(dict.fromkeys(key for row in rows for key in row))
    return _Input(where=where, columns=columns, length=len(rows), rows=rows, lines=lines)


def _load_jsonl(path: Path, where: str) -> _Input:
    return _parse_json_lines(_read_bytes(path, where), where)


def _load_json(path: Path, where: str) -> _Input:
    """A JSON array of objects (rows named by 0-based index); else read as JSON lines."""
    raw = _read_bytes(path, where)
    if not raw.lstrip().startswith(b"["):
        return _parse_json_lines(raw, where)
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
        raise RecordError(where, f"expected a JSON array of objects, got {_describe(data)}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise RecordError(where, f"expected a JSON object, got {_describe(obj)}", row=i)
    columns = tuple(dict.fromkeys(key for row in data for key in row))
    return _Input(where=where, columns=columns, length=len(data), rows=data)


def _load_parquet(path: Path, where: str) -> _Input:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise RecordError(where, f"not a readable Parquet file: {exc}") from None
    return _Input(
        where=where, columns=tuple(table.column_names), length=table.num_rows, table=table
    )


def _load_hf(name: str, where: str, split: str) -> _Input:
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
    table = loaded.with_format("arrow")[:]
    return _Input(
        where=where, columns=tuple(table.column_names), length=table.num_rows, table=table
    )


def load_rows(path: str | Path, fmt: str, split: str) -> _Input:
    """Raw rows of a jsonl/json/parquet file or an HF dataset, with line/row positions for
    error messages (no mapping, no validation: `read_records` builds records from this)."""
    where = str(path)
    if fmt != "hf" and not Path(path).is_file():
        if Path(path).is_dir():
            raise IsADirectoryError(f"{where}: is a folder; read folders with format='hf'")
        raise FileNotFoundError(f"{where}: no such file")
    match fmt:
        case "jsonl":
            return _load_jsonl(Path(path), where)
        case "json":
            return _load_json(Path(path), where)
        case "parquet":
            return _load_parquet(Path(path), where)
        case "hf":
            return _load_hf(str(path), where, split)
    raise ValueError(f"{where}: unknown format {fmt!r}; expected one of {list(INPUT_FORMATS)}")


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """How file columns become record fields, resolved once per input."""

    conversation: Literal["messages", "prompt"]
    columns: dict[str, str]  # record field -> file column
    explicit: frozenset[str]  # fields the user mapped: their column must be in every row
    source: str | None  # a constant source, or None to read the `source` column
    extras: tuple[str, ...]  # file columns kept as they are


def _plan(
    data: _Input, mapping: Mapping[str, str] | None, source: str | None, default_source: str
) -> _Plan:
    """Resolve the mapping against the input's columns (unmapped fields: same-named columns)."""
    where, given = data.where, dict(mapping or {})
    unknown = sorted(set(given) - set(MAPPABLE_FIELDS))
    if unknown:
        raise RecordError(
            where, f"mapping has unknown field(s) {unknown}; mappable: {list(MAPPABLE_FIELDS)}"
        )
    if "messages" in given and any(f in given for f in _PROMPT_FIELDS):
        raise RecordError(where, "map either 'messages' or 'prompt' (+ input/response/system)")
    if source is not None and "source" in given:
        raise RecordError(where, "give either source= or a mapped 'source' column, not both")
    for field, column in given.items():
        if column not in data.columns:
            raise RecordError(
                where,
                f"column {column!r} not found; the input has columns {list(data.columns)}",
                line=data.line_of(0),
                row=data.row_of(0),
                field=field,
                column=column,
            )

    columns = dict(given)
    conversation: Literal["messages", "prompt"]
    if "messages" in given or ("prompt" not in given and "messages" in data.columns):
        conversation = "messages"
    elif "prompt" in given or "prompt" in data.columns:
        conversation = "prompt"
    else:
        raise RecordError(
            where,
            "no conversation: map 'messages' or 'prompt' to a column, e.g. "
            f"mapping={{'prompt': 'instruction', 'response': 'output'}}; "
            f"the input has columns {list(data.columns)}",
        )
    if conversation == "messages" and any(f in given for f in _PROMPT_FIELDS):
        raise RecordError(where, "'input', 'response' and 'system' need a mapped 'prompt'")
    defaults = ["reference", "parent_id", "model", conversation]
    if conversation == "prompt":
        defaults += ["response", "system"]
    if source is None:
        defaults.append("source")
    for field in defaults:
        if field not in columns and field in data.columns:
            columns[field] = field

    used = set(columns.values())
    extras = tuple(c for c in data.columns if c not in used and c not in CORE_COLUMNS)
    if source is None and "source" not in columns:
        source = default_source
    return _Plan(
        conversation=conversation,
        columns=columns,
        explicit=frozenset(given),
        source=source,
        extras=extras,
    )


def _text(field: str, value: Any, *, nullable: bool) -> str | None:
    if value is None:
        if nullable:
            return None
        raise _Invalid(field, "is null, expected a string")
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_describe(value)}")
    return value


def _reference_text(value: Any) -> str | None:
    """References may be numbers (numeric answers); they are stored as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return _text("reference", value, nullable=True)


def _check_messages(value: Any) -> list[dict[str, str]]:
    """Check a conversation (a non-empty list of {role, content}); return it as plain dicts."""
    problem = "expected a list of {role, content} messages"
    if value is None:
        raise _Invalid("messages", f"is null, {problem}")
    if not isinstance(value, list | tuple):
        raise _Invalid("messages", f"{problem}, got {_describe(value)}")
    if not value:
        raise _Invalid("messages", "is an empty conversation")
    out: list[dict[str, str]] = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise _Invalid(
                "messages",
                f"message {k}: expected a {{role, content}} object, got {_describe(message)}",
            )
        for key in ("role", "content"):
            if key not in message:
                raise _Invalid("messages", f"message {k}: has no {key!r}")
        others = sorted(
            str(key)
            for key, v in message.items()
            if key not in ("role", "content") and v is not None
        )
        if others:
            raise _Invalid(
                "messages",
                f"message {k}: has key(s) {others}; a message holds only role and content",
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _Invalid("messages", f"message {k}: role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise _Invalid(
                "messages", f"message {k}: content must be a string, got {_describe(content)}"
            )
        out.append({"role": role, "content": content})
    if last_turn(out, "user") is None:
        raise _Invalid("messages", "the conversation has no user turn")
    return out


def _messages_from_prompt(
    prompt: str, input_text: str | None, response: str | None, system: str | None
) -> list[dict[str, str]]:
    """A conversation from single-turn fields (Alpaca: a non-empty input after a blank line)."""
    if not prompt.strip():
        raise _Invalid("prompt", "is empty")
    user = f"{prompt}\n\n{input_text}" if input_text and input_text.strip() else prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _record_at(
    data: _Input, plan: _Plan, values: Mapping[str, list[Any]], i: int
) -> dict[str, Any]:
    """Validate row `i` and build its record; errors name the file, the row and the field."""

    def get(field: str) -> Any:
        if field not in values:
            return None
        value = values[field][i]
        if value is MISSING:
            if field in plan.explicit:
                raise _Invalid(field, f"column {plan.columns[field]!r} is missing from this row")
            return None
        return value

    try:
        if plan.conversation == "messages":
            messages = _check_messages(get("messages"))
            if not str(last_turn(messages, "user")).strip():
                raise _Invalid("messages", "the last user turn is empty")
        else:
            messages = _messages_from_prompt(
                str(_text("prompt", get("prompt"), nullable=False)),
                _text("input", get("input"), nullable=True),
                _text("response", get("response"), nullable=True),
                _text("system", get("system"), nullable=True),
            )
        source = plan.source
        if source is None:
            source = str(_text("source", get("source"), nullable=False))
            if not source.strip():
                raise _Invalid("source", "is empty")
        return make_record(
            messages,
            source=source,
            reference=_reference_text(get("reference")),
            parent_id=_text("parent_id", get("parent_id"), nullable=True),
            model=_text("model", get("model"), nullable=True),
        )
    except _Invalid as bad:
        raise RecordError(
            data.where,
            bad.problem,
            line=data.line_of(i),
            row=data.row_of(i),
            field=bad.field,
            column=plan.columns.get(bad.field),
        ) from None


def _extra_column(data: _Input, name: str) -> pl.Series:
    """One extra JSON column as a typed Series; mixed types name the first clashing row."""
    assert data.rows is not None
    values = [row.get(name) for row in data.rows]
    try:
        return pl.Series(name, pa.array(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        lo, hi = 1, len(values)  # find the shortest prefix that fails: its last row clashes
        while lo < hi:
            mid = (lo + hi) // 2
            try:
                pa.array(values[:mid])
                lo = mid + 1
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                hi = mid
        bad = lo - 1
        raise RecordError(
            data.where,
            f"value {_describe(values[bad])} does not fit the type of the rows before it ({exc})",
            line=data.line_of(bad),
            row=data.row_of(bad),
            field=name,
        ) from None


def _extras_frame(data: _Input, names: Sequence[str]) -> pl.DataFrame:
    if data.table is not None:
        frame = pl.from_arrow(data.table.select(list(names)), rechunk=True)
        assert isinstance(frame, pl.DataFrame)
        return frame
    return pl.DataFrame([_extra_column(data, name) for name in names])


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
    """
    fmt = format if format is not None else infer_format(path)
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected one of {list(INPUT_FORMATS)}")
    data = load_rows(path, fmt, split)
    if data.length == 0:
        raise RecordError(data.where, "no records (the input is empty)")
    plan = _plan(data, mapping, source, default_source(path))
    values = {field: data.values(column) for field, column in plan.columns.items()}
    core = records_frame(_record_at(data, plan, values, i) for i in range(data.length))
    if not plan.extras:
        return core
    return pl.concat([core, _extras_frame(data, plan.extras)], how="horizontal")


# --------------------------------------------------------------------------------------------
# Validating frames (stage outputs)
# --------------------------------------------------------------------------------------------


def _first_true(mask: pl.Series) -> int | None:
    hits = mask.fill_null(True).arg_true()
    return int(hits[0]) if len(hits) else None


def validate_frame(df: pl.DataFrame, where: str) -> None:
    """Check a records frame: core columns with their types, required values present, valid
    conversations, float64 scores. Raises RecordError naming the first bad row and field."""
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise RecordError(
            where, f"missing core column(s) {missing}; the frame has {df.columns}", field=missing[0]
        )
    expected: dict[str, pl.DataType] = dict(POLARS_CORE)
    for name in df.columns:
        if name.startswith(SCORE_PREFIX):
            expected[name] = pl.Float64()
        elif name == DROP_REASON:
            expected[name] = pl.String()
    for name, dtype in expected.items():
        if df.schema[name] != dtype:
            raise RecordError(where, f"has type {df.schema[name]}, expected {dtype}", field=name)
    for name in ("id", "messages", "prompt", "source"):
        row = _first_true(df[name].is_null())
        if row is not None:
            raise RecordError(where, "is null", row=row, field=name)
    role = pl.element().struct.field("role")
    message_ok = (
        pl.element().is_not_null()
        & role.is_in(ROLES)
        & pl.element().struct.field("content").is_not_null()
    )
    conversation = pl.col("messages")
    ok = df.select(
        (
            (conversation.list.len() > 0)
            & conversation.list.eval(message_ok).list.all()
            & conversation.list.eval(role == "user").list.any()
        ).alias("ok")
    )["ok"]
    row = _first_true(~ok)
    if row is not None:
        try:
            _check_messages(df["messages"][row].to_list())
        except _Invalid as bad:
            raise RecordError(where, bad.problem, row=row, field="messages") from None
        raise RecordError(where, "is not a valid conversation", row=row, field="messages")


# --------------------------------------------------------------------------------------------
# Trainer formats and atomic writers
# --------------------------------------------------------------------------------------------

TrainerFormat = Literal["messages", "prompt_completion", "preference", "chat_preference"]
TRAINER_FORMATS: tuple[str, ...] = (
    "messages",
    "prompt_completion",
    "preference",
    "chat_preference",
)


def _require_columns(df: pl.DataFrame, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RecordError(
            where, f"missing column(s) {missing}; the frame has {df.columns}", field=missing[0]
        )


def _last_role(messages: pl.Expr) -> pl.Expr:
    return messages.list.last().struct.field("role")


def _require_assistant_last(df: pl.DataFrame, where: str) -> None:
    row = _first_true(
        df.select((_last_role(pl.col("messages")) != "assistant").alias("bad"))["bad"]
    )
    if row is not None:
        raise RecordError(
            where, "the conversation does not end with an assistant turn", row=row, field="messages"
        )


def to_sft(df: pl.DataFrame) -> pl.DataFrame:
    """SFT rows in TRL's conversational format: `id`, `messages` (ending in an assistant turn)."""
    where = "to_sft input"
    _require_columns(df, ("id", "messages"), where)
    _require_assistant_last(df, where)
    return df.select("id", "messages")


def to_prompt_completion(df: pl.DataFrame) -> pl.DataFrame:
    """TRL conversational prompt/completion: `prompt` is every turn before the last (assistant)
    turn, `completion` a one-message list holding it; `id` is kept."""
    where = "to_prompt_completion input"
    _require_columns(df, ("id", "messages"), where)
    _require_assistant_last(df, where)
    messages = pl.col("messages")
    return df.select(
        "id",
        messages.list.slice(0, messages.list.len() - 1).alias("prompt"),
        messages.list.slice(-1, 1).alias("completion"),
    )


def _assistant_turn(column: str) -> pl.Expr:
    turn = pl.struct(pl.lit("assistant").alias("role"), pl.col(column).alias("content"))
    return pl.concat_list([turn]).alias(column)


def to_preference(df: pl.DataFrame) -> pl.DataFrame:
    """TRL conversational preference rows (`prompt`, `chosen`, `rejected`) for DPO.

    Input: one row per pair with `chosen` and `rejected` response strings, and the prompt
    either as a `prompt` column of messages or taken from `messages` (a final assistant turn
    is dropped). `chosen`/`rejected` become one-message assistant lists; `id` is kept if present.
    Pairing candidates (verified vs failed samples) happens before, in the stages that make them.
    """
    where = "to_preference input"
    _require_columns(df, ("chosen", "rejected"), where)
    for name in ("chosen", "rejected"):
        if df.schema[name] != pl.String():
            raise RecordError(where, f"has type {df.schema[name]}, expected String", field=name)
    if df.schema.get("prompt") == POLARS_CORE["messages"]:
        prompt_field, prompt = "prompt", pl.col("prompt")
    else:
        _require_columns(df, ("messages",), where)
        messages = pl.col("messages")
        prompt_field = "messages"
        prompt = (
            pl.when(_last_role(messages) == "assistant")
            .then(messages.list.slice(0, messages.list.len() - 1))
            .otherwise(messages)
        )
    out = df.select(
        *(["id"] if "id" in df.columns else []),
        prompt.alias("prompt"),
        _assistant_turn("chosen"),
        _assistant_turn("rejected"),
    )
    row = _first_true(out.select((_last_role(pl.col("prompt")) != "user").alias("bad"))["bad"])
    if row is not None:
        raise RecordError(
            where, "the prompt does not end with a user turn", row=row, field=prompt_field
        )
    for name in ("chosen", "rejected"):
        row = _first_true(df[name].is_null())
        if row is not None:
            raise RecordError(where, "is null", row=row, field=name)
    return out


def to_chat_preference(df: pl.DataFrame) -> pl.DataFrame:
    """Preference rows as `messages` (the prompt turns, ending in a user turn) plus `chosen`
    and `rejected` as single assistant messages: Axolotl's `chat_template.default` DPO rows
    and LLaMA-Factory's sharegpt `ranking` rows (tags `role`/`content`); `id` is kept."""
    pairs = to_preference(df)
    return pairs.select(
        *(["id"] if "id" in pairs.columns else []),
        pl.col("prompt").alias("messages"),
        pl.col("chosen").list.first(),
        pl.col("rejected").list.first(),
    )


def _plain_type(t: pa.DataType) -> pa.DataType:
    """Arrow's 32-bit-offset types for polars' large/view ones, which `datasets` shows as
    `large_string`/`LargeList` features."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain_field(t.value_field))
    if pa.types.is_struct(t):
        return pa.struct([_plain_field(t.field(i)) for i in range(t.num_fields)])
    return t


def _plain_field(f: pa.Field) -> pa.Field:
    return pa.field(f.name, _plain_type(f.type), nullable=f.nullable)


def write_table(df: pl.DataFrame, path: str | Path) -> Path:
    """Write `df` to `.parquet` or `.jsonl` atomically: a temp file in the same folder, then
    os.replace, so readers never see half a file; on any error the temp file is removed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise ValueError(
            f"{path}: write_table writes .parquet or .jsonl, not {suffix or 'no suffix'!r}"
        )
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            table = df.to_arrow()
            pq.write_table(
                table.cast(pa.schema([_plain_field(f) for f in table.schema])),
                tmp,
                compression="zstd",
            )
        else:
            df.write_ndjson(tmp)
    return path


def trainer_frame(df: pl.DataFrame, fmt: TrainerFormat) -> pl.DataFrame:
    """A records frame in a trainer format: messages, prompt_completion, preference or
    chat_preference."""
    match fmt:
        case "messages":
            return to_sft(df)
        case "prompt_completion":
            return to_prompt_completion(df)
        case "preference":
            return to_preference(df)
        case "chat_preference":
            return to_chat_preference(df)
        case _:
            raise ValueError(
                f"unknown trainer format {fmt!r}; expected one of {list(TRAINER_FORMATS)}"
            )


def empty_trainer_frame(fmt: TrainerFormat) -> pl.DataFrame:
    """An empty frame with a trainer format's columns and types (a run that kept no rows
    still writes a dataset that loaders and the catalog can read)."""
    stub = pl.DataFrame(
        schema={
            "id": pl.String(),
            "messages": POLARS_CORE["messages"],
            "chosen": pl.String(),
            "rejected": pl.String(),
        }
    )
    return trainer_frame(stub, fmt)


def write_format(df: pl.DataFrame, path: str | Path, fmt: TrainerFormat) -> Path:
    """Convert a records frame to a trainer format (see `trainer_frame`) and write it
    atomically with write_table."""
    return write_table(trainer_frame(df, fmt), path)
