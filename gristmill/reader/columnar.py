"""The columnar reader: a block's records built and checked a column at a time.

Mapped columns become Arrow arrays, the checks and the conversation are polars expressions,
and ids come from `record_ids`. It returns None wherever it cannot vouch for every row (a bad
value, or a type it does not take): the per-row reader then builds that block, or names its
first bad row exactly as it always has. So the two must agree on every block this accepts.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import polars as pl
import pyarrow as pa

from gristmill.reader.blocks import MISSING, RowBlock
from gristmill.reader.plan import Plan
from gristmill.reader.rowcheck import reference_text
from gristmill.records import POLARS_CORE, ROLES, InvalidValue, record_ids

#: The characters Python's `str.strip()` removes (polars' default set differs: \x1c-\x1f).
PY_WHITESPACE: Final = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
TEXT: Final = pa.large_string()


def _series(array: pa.Array) -> pl.Series:
    series = pl.from_arrow(array)
    assert isinstance(series, pl.Series)
    return series


def _blank(text: pl.Expr) -> pl.Expr:
    """Whether a string is empty once Python would strip it."""
    return text.str.strip_chars(PY_WHITESPACE) == ""


# ---- one column as Arrow --------------------------------------------------------------------


def _json_values(block: RowBlock, plan: Plan, field: str) -> list[object]:
    """A mapped field of JSON rows; MISSING only where an explicitly mapped column is absent
    (elsewhere an absent value is null)."""
    values = block.values(plan.columns[field])
    if field in plan.explicit or not any(v is MISSING for v in values):
        return values
    return [None if v is MISSING else v for v in values]


def _is_text_type(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def _text_column(block: RowBlock, plan: Plan, field: str) -> pa.Array | None:
    """A text field as an Arrow string array (nulls where unmapped); None if a value is not
    text or an explicitly mapped column is missing from a row."""
    if field not in plan.columns:
        return pa.nulls(block.length, TEXT)
    if block.table is None:
        try:
            return pa.array(_json_values(block, plan, field), TEXT)
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
            return None  # not text, MISSING, or a lone surrogate the per-row reader meets
    array = block.table.column(plan.columns[field]).combine_chunks()
    kind = array.type
    if pa.types.is_dictionary(kind) and _is_text_type(kind.value_type):
        return array.cast(TEXT)
    if pa.types.is_null(kind) or _is_text_type(kind):
        return array.cast(TEXT)
    return None


def _reference_column(block: RowBlock, plan: Plan) -> pa.Array | None:
    """References as text: strings as they are, numbers as Python writes them; None if a
    value is neither."""
    strings = _text_column(block, plan, "reference")
    if strings is not None:
        return strings
    if block.table is None:
        values = _json_values(block, plan, "reference")
    else:
        values = block.table.column(plan.columns["reference"]).to_pylist()
    try:
        return pa.array([reference_text(v) for v in values], TEXT)
    except (InvalidValue, UnicodeEncodeError):
        return None


def _messages_column(block: RowBlock, plan: Plan) -> pl.Series | None:
    """Conversations as a polars list of structs holding (at least) text `role` and
    `content`; None if some value has another shape."""
    if block.table is None:
        try:
            array = pa.array(_json_values(block, plan, "messages"))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
            return None
    else:
        array = block.table.column(plan.columns["messages"]).combine_chunks()
    kind = array.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        return None
    message = kind.value_type
    if not pa.types.is_struct(message):
        return None
    names = [message.field(i).name for i in range(message.num_fields)]
    if "role" not in names or "content" not in names:
        return None
    if not _is_text_type(message.field("role").type):
        return None
    if not _is_text_type(message.field("content").type):
        return None
    return _series(array)


# ---- checks ---------------------------------------------------------------------------------


def _all_filled(texts: pl.Series) -> bool:
    """Every value present and not blank (prompts, a source column)."""
    frame = pl.DataFrame({"t": texts})
    return bool(frame.select((pl.col("t").is_not_null() & ~_blank(pl.col("t"))).all()).item())


def _conversations_ok(messages: pl.Series) -> bool:
    """Every conversation passes `check_messages` and has a non-blank last user turn."""
    dtype = messages.dtype
    assert isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)
    others = [f.name for f in dtype.inner.fields if f.name not in ("role", "content")]
    role = pl.element().struct.field("role")
    message_ok = (
        pl.element().is_not_null()
        & role.is_not_null()
        & role.is_in(list(ROLES))
        & pl.element().struct.field("content").is_not_null()
    )
    for name in others:
        message_ok = message_ok & pl.element().struct.field(name).is_null()
    m = pl.col("messages")
    last_user = m.list.eval(pl.element().filter(role == "user").struct.field("content"))
    ok = (
        m.is_not_null()
        & (m.list.len() > 0)
        & m.list.eval(message_ok).list.all()
        & ~_blank(last_user.list.last()).fill_null(True)
    )
    return bool(pl.DataFrame({"messages": messages}).select(ok.all()).item())


# ---- building -------------------------------------------------------------------------------


def _lists(offsets: np.ndarray, role: pl.Series, content: pl.Series) -> pl.Series:
    """A list-of-messages column from flat roles and contents and each row's start offset."""
    flat = pa.StructArray.from_arrays(
        [role.to_arrow(), content.to_arrow()], names=["role", "content"]
    )
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)
    return _series(lists).cast(POLARS_CORE["messages"])


def _user_turn(prompt: pl.Series, text: pl.Series) -> pl.Series:
    """The user turn of single-turn fields: the prompt, then the input after a blank line
    when the input is not blank (Alpaca)."""
    p, i = pl.col("prompt"), pl.col("input")
    user = pl.when(i.is_not_null() & ~_blank(i)).then(pl.concat_str([p, pl.lit("\n\n"), i]))
    frame = pl.DataFrame({"prompt": prompt, "input": text})
    return frame.select(user.otherwise(p).alias("prompt")).to_series()


def _prompt_conversations(user: pl.Series, response: pl.Series, system: pl.Series) -> pl.Series:
    """Each row's messages: a system turn when `system` is non-empty, the user turn, and an
    assistant turn when there is a response; one flat row per turn, then cut into lists."""
    rows = pl.DataFrame({"user": user, "response": response, "system": system}).select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
        "user",
        "response",
        "system",
        has_system=pl.col("system").is_not_null() & (pl.col("system") != ""),
        has_response=pl.col("response").is_not_null(),
    )
    turns = pl.concat(
        [
            rows.filter("has_system").select(
                "row", slot=pl.lit(0), role=pl.lit("system"), content="system"
            ),
            rows.select("row", slot=pl.lit(1), role=pl.lit("user"), content="user"),
            rows.filter("has_response").select(
                "row", slot=pl.lit(2), role=pl.lit("assistant"), content="response"
            ),
        ]
    ).sort("row", "slot")
    counts = rows.select(
        1 + pl.col("has_system").cast(pl.Int64) + pl.col("has_response").cast(pl.Int64)
    ).to_series()
    offsets = np.concatenate([[0], np.cumsum(counts.to_numpy())]).astype(np.int64)
    return _lists(offsets, turns["role"], turns["content"])


def _last(messages: pl.Series, role: str) -> pl.Series:
    """Content of each conversation's last `role` turn (null if none)."""
    turn = pl.element().struct.field("role") == role
    expr = pl.col("m").list.eval(pl.element().filter(turn).struct.field("content")).list.last()
    return pl.DataFrame({"m": messages}).select(expr).to_series()


def _plain_messages(messages: pl.Series) -> pl.Series:
    """The conversations with only `role` and `content` in each message."""
    element = pl.element().struct
    keep = pl.struct(element.field("role"), element.field("content"))
    frame = pl.DataFrame({"m": messages}).select(pl.col("m").list.eval(keep))
    return frame.to_series().cast(POLARS_CORE["messages"])


def _conversation(block: RowBlock, plan: Plan) -> tuple[pl.Series, pl.Series, pl.Series] | None:
    """(messages, prompt, response) of every row, or None when a row needs the per-row reader."""
    if plan.conversation == "messages":
        found = _messages_column(block, plan)
        if found is None or not _conversations_ok(found):
            return None
        messages = _plain_messages(found)
        return messages, _last(messages, "user"), _last(messages, "assistant")
    arrays = {f: _text_column(block, plan, f) for f in ("prompt", "input", "response", "system")}
    fields = {f: _series(a) for f, a in arrays.items() if a is not None}
    if len(fields) < len(arrays) or not _all_filled(fields["prompt"]):
        return None
    user = _user_turn(fields["prompt"], fields["input"])
    messages = _prompt_conversations(user, fields["response"], fields["system"])
    return messages, user, fields["response"]


def core_columnar(block: RowBlock, plan: Plan) -> pl.DataFrame | None:
    """The core columns of a block's records, or None when some row needs the per-row
    reader (to be built exactly, or to name the error)."""
    arrays = {
        "reference": _reference_column(block, plan),
        "parent_id": _text_column(block, plan, "parent_id"),
        "model": _text_column(block, plan, "model"),
    }
    if plan.source is None:
        arrays["source"] = _text_column(block, plan, "source")
    columns = {f: _series(a) for f, a in arrays.items() if a is not None}
    if len(columns) < len(arrays):
        return None
    if plan.source is None and not _all_filled(columns["source"]):
        return None
    conversation = _conversation(block, plan)
    if conversation is None:
        return None
    messages, prompt, response = conversation
    reference = columns["reference"].cast(pl.String)
    if plan.source is None:
        source = columns["source"]
    else:
        source = pl.repeat(plan.source, block.length, dtype=pl.String, eager=True)
    core = {
        "id": record_ids(messages, reference),
        "messages": messages,
        "prompt": prompt,
        "response": response,
        "reference": reference,
        "source": source,
        "parent_id": columns["parent_id"],
        "model": columns["model"],
    }
    return pl.DataFrame([core[name].cast(dtype).alias(name) for name, dtype in POLARS_CORE.items()])


def first_rejected(block: RowBlock, plan: Plan) -> int:
    """The first row the columnar path turns down, found by halving: every row before it
    is accepted, so the per-row reader need only look at this one to name a bad row."""
    good, bad = 0, block.length  # rows before `good` are accepted; [good, bad) is not
    while bad - good > 1:
        middle = (good + bad) // 2
        if core_columnar(block.take(good, middle), plan) is not None:
            good = middle
        else:
            bad = middle
    return good
