"""How an input's columns become record fields: the mapping, resolved once per input."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gristmill.reader.blocks import RowBlock
from gristmill.records import CORE_COLUMNS, RecordError

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
PROMPT_FIELDS = ("prompt", "input", "response", "system")
#: Fields whose value is text (or null), whatever the conversation is made from.
TEXT_FIELDS = ("prompt", "input", "response", "system", "source", "parent_id", "model")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How file columns become record fields, resolved once per input."""

    conversation: Literal["messages", "prompt"]
    columns: dict[str, str]  # record field -> file column
    explicit: frozenset[str]  # fields the user mapped: their column must be in every row
    source: str | None  # a constant source, or None to read the `source` column
    extras: tuple[str, ...]  # file columns kept as they are
    input_columns: tuple[str, ...]  # every column of the input the plan was made for


def make_plan(
    block: RowBlock, mapping: Mapping[str, str] | None, source: str | None, default_source: str
) -> Plan:
    """Resolve the mapping against the columns of the input's first rows (unmapped fields:
    same-named columns); errors name the first row."""
    where, given = block.where, dict(mapping or {})
    unknown = sorted(set(given) - set(MAPPABLE_FIELDS))
    if unknown:
        raise RecordError(
            where, f"mapping has unknown field(s) {unknown}; mappable: {list(MAPPABLE_FIELDS)}"
        )
    if "messages" in given and any(f in given for f in PROMPT_FIELDS):
        raise RecordError(where, "map either 'messages' or 'prompt' (+ input/response/system)")
    if source is not None and "source" in given:
        raise RecordError(where, "give either source= or a mapped 'source' column, not both")
    for field, column in given.items():
        if column not in block.columns:
            raise RecordError(
                where,
                f"column {column!r} not found; the input has columns {list(block.columns)}",
                line=block.line_of(0),
                row=block.row_of(0),
                field=field,
                column=column,
            )

    columns = dict(given)
    conversation: Literal["messages", "prompt"]
    if "messages" in given or ("prompt" not in given and "messages" in block.columns):
        conversation = "messages"
    elif "prompt" in given or "prompt" in block.columns:
        conversation = "prompt"
    else:
        raise RecordError(
            where,
            "no conversation: map 'messages' or 'prompt' to a column, e.g. "
            f"mapping={{'prompt': 'instruction', 'response': 'output'}}; "
            f"the input has columns {list(block.columns)}",
        )
    if conversation == "messages" and any(f in given for f in PROMPT_FIELDS):
        raise RecordError(where, "'input', 'response' and 'system' need a mapped 'prompt'")
    defaults = ["reference", "parent_id", "model", conversation]
    if conversation == "prompt":
        defaults += ["response", "system"]
    if source is None:
        defaults.append("source")
    for field in defaults:
        if field not in columns and field in block.columns:
            columns[field] = field

    used = set(columns.values())
    extras = tuple(c for c in block.columns if c not in used and c not in CORE_COLUMNS)
    if source is None and "source" not in columns:
        source = default_source
    return Plan(
        conversation=conversation,
        columns=columns,
        explicit=frozenset(given),
        source=source,
        extras=extras,
        input_columns=block.columns,
    )
