"""The per-row reader: checks and builds one record at a time, naming the first bad row.

It is the reference the columnar path must agree with, and it runs wherever that path cannot
vouch for a block (a bad value somewhere, or a type it does not take), so that errors read
exactly as they always have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from gristmill.reader.blocks import MISSING, RowBlock
from gristmill.reader.plan import Plan
from gristmill.records import (
    InvalidValue,
    RecordError,
    check_messages,
    describe_value,
    last_turn,
    make_record,
    records_frame,
)


def text_value(field: str, value: Any, *, nullable: bool) -> str | None:
    """A text field's value, checked: a string, or None where the field may be null."""
    if value is None:
        if nullable:
            return None
        raise InvalidValue(field, "is null, expected a string")
    if not isinstance(value, str):
        raise InvalidValue(field, f"expected a string, got {describe_value(value)}")
    return value


def reference_text(value: Any) -> str | None:
    """References may be numbers (numeric answers); they are stored as text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return text_value("reference", value, nullable=True)


def _messages_from_prompt(
    prompt: str, input_text: str | None, response: str | None, system: str | None
) -> list[dict[str, str]]:
    """A conversation from single-turn fields (Alpaca: a non-empty input after a blank line)."""
    if not prompt.strip():
        raise InvalidValue("prompt", "is empty")
    user = f"{prompt}\n\n{input_text}" if input_text and input_text.strip() else prompt
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _record_at(
    block: RowBlock, plan: Plan, values: Mapping[str, list[Any]], i: int
) -> dict[str, Any]:
    """Validate row `i` and build its record; errors name the file, the row and the field."""

    def get(field: str) -> Any:
        if field not in values:
            return None
        value = values[field][i]
        if value is MISSING:
            if field in plan.explicit:
                raise InvalidValue(
                    field, f"column {plan.columns[field]!r} is missing from this row"
                )
            return None
        return value

    try:
        if plan.conversation == "messages":
            messages = check_messages(get("messages"))
            if not str(last_turn(messages, "user")).strip():
                raise InvalidValue("messages", "the last user turn is empty")
        else:
            messages = _messages_from_prompt(
                str(text_value("prompt", get("prompt"), nullable=False)),
                text_value("input", get("input"), nullable=True),
                text_value("response", get("response"), nullable=True),
                text_value("system", get("system"), nullable=True),
            )
        source = plan.source
        if source is None:
            source = str(text_value("source", get("source"), nullable=False))
            if not source.strip():
                raise InvalidValue("source", "is empty")
        return make_record(
            messages,
            source=source,
            reference=reference_text(get("reference")),
            parent_id=text_value("parent_id", get("parent_id"), nullable=True),
            model=text_value("model", get("model"), nullable=True),
        )
    except InvalidValue as bad:
        raise RecordError(
            block.where,
            bad.problem,
            line=block.line_of(i),
            row=block.row_of(i),
            field=bad.field,
            column=plan.columns.get(bad.field),
        ) from None


def core_by_row(block: RowBlock, plan: Plan) -> pl.DataFrame:
    """The core columns of a block's records, row by row; the first bad row raises."""
    values = {field: block.values(column) for field, column in plan.columns.items()}
    return records_frame(_record_at(block, plan, values, i) for i in range(block.length))


def _extra_column(block: RowBlock, name: str) -> pl.Series:
    """One extra JSON column as a typed Series; mixed types name the first clashing row."""
    values = [None if v is MISSING else v for v in block.values(name)]
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
            block.where,
            f"value {describe_value(values[bad])} does not fit the type of the rows before it "
            f"({exc})",
            line=block.line_of(bad),
            row=block.row_of(bad),
            field=name,
        ) from None


def extras_frame(block: RowBlock, names: Sequence[str]) -> pl.DataFrame:
    """The columns a block keeps as they are: typed by Arrow from the JSON values, or taken
    from the Parquet/HF table."""
    if block.table is not None:
        frame = pl.from_arrow(block.table.select(list(names)), rechunk=True)
        assert isinstance(frame, pl.DataFrame)
        return frame
    return pl.DataFrame([_extra_column(block, name) for name in names])
