"""The record contract: one declared Arrow schema, stable ids, and helpers to build records.

Arrow is the contract, polars the working type, Parquet the storage. Every stage may rely
on the CORE columns below; scoring stages add `score__<name>` float64 columns; filters set
`drop_reason` on rows they send to the `rejected/` side output.

Sections: the schema, record builders and ids (`record_id` per record, `record_ids` per
column); `RecordError` (names file, row and field); input formats and `read_records`
(implemented in `gristmill.reader`); `check_messages` and `validate_frame`; trainer formats
(`to_sft`, `to_prompt_completion`, `to_preference`, `to_chat_preference`) and the atomic
writers `write_table` / `write_format`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

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


def record_ids(messages: pl.Series, reference: pl.Series) -> pl.Series:
    """`record_id` of every row at once: polars writes the same canonical JSON (sorted keys,
    no spaces, non-ASCII kept), so only the sha256 runs per row."""
    content, role = pl.element().struct.field("content"), pl.element().struct.field("role")
    canonical = pl.struct(
        pl.col("messages").list.eval(pl.struct(content, role)),
        pl.col("reference"),
    ).struct.json_encode()
    texts = pl.DataFrame({"messages": messages, "reference": reference}).select(canonical)
    sha256 = hashlib.sha256
    digests = [sha256(t).hexdigest()[:20] for t in texts.to_series().cast(pl.Binary).to_list()]
    return pl.Series("id", digests, dtype=pl.String)


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


class InvalidValue(Exception):
    """A bad value, before its location is known; the caller turns it into a RecordError."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field, self.problem = field, problem


def describe_value(value: Any) -> str:
    """A short `type value` description of a bad value, for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------------------------
# Input formats; reading itself lives in gristmill.reader
# --------------------------------------------------------------------------------------------

InputFormat = Literal["jsonl", "json", "parquet", "hf"]
INPUT_FORMATS: tuple[str, ...] = ("jsonl", "json", "parquet", "hf")

_SUFFIXES: tuple[tuple[str, InputFormat], ...] = (
    (".jsonl", "jsonl"),
    (".jsonl.gz", "jsonl"),
    (".ndjson", "jsonl"),
    (".json", "json"),
    (".json.gz", "json"),
    (".parquet", "parquet"),
)


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


def read_records(
    path: str | Path,
    *,
    format: str | None = None,  # noqa: A002 - the natural name for the caller
    mapping: Mapping[str, str] | None = None,
    source: str | None = None,
    split: str = "train",
) -> pl.DataFrame:
    """Read a dataset file into a validated records frame: `gristmill.reader.read_records`.

    The reader builds on this module, so it is imported when called.
    """
    from gristmill import reader

    return reader.read_records(path, format=format, mapping=mapping, source=source, split=split)


# --------------------------------------------------------------------------------------------
# Validating conversations and frames (inputs and stage outputs)
# --------------------------------------------------------------------------------------------


def check_messages(value: Any) -> list[dict[str, str]]:
    """Check a conversation (a non-empty list of {role, content}); return it as plain dicts."""
    problem = "expected a list of {role, content} messages"
    if value is None:
        raise InvalidValue("messages", f"is null, {problem}")
    if not isinstance(value, list | tuple):
        raise InvalidValue("messages", f"{problem}, got {describe_value(value)}")
    if not value:
        raise InvalidValue("messages", "is an empty conversation")
    out: list[dict[str, str]] = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidValue(
                "messages",
                f"message {k}: expected a {{role, content}} object, got {describe_value(message)}",
            )
        for key in ("role", "content"):
            if key not in message:
                raise InvalidValue("messages", f"message {k}: has no {key!r}")
        others = sorted(
            str(key)
            for key, v in message.items()
            if key not in ("role", "content") and v is not None
        )
        if others:
            raise InvalidValue(
                "messages",
                f"message {k}: has key(s) {others}; a message holds only role and content",
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise InvalidValue(
                "messages", f"message {k}: role {role!r} is not one of {list(ROLES)}"
            )
        if not isinstance(content, str):
            raise InvalidValue(
                "messages", f"message {k}: content must be a string, got {describe_value(content)}"
            )
        out.append({"role": role, "content": content})
    if last_turn(out, "user") is None:
        raise InvalidValue("messages", "the conversation has no user turn")
    return out


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
            check_messages(df["messages"][row].to_list())
        except InvalidValue as bad:
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
            # rebound, so the uncast copy is freed before the write (a shard is held twice,
            # not three times)
            table = table.cast(pa.schema([_plain_field(f) for f in table.schema]))
            pq.write_table(table, tmp, compression="zstd")
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
