"""Typed, mergeable per-stage statistics (the `extra` of `_SUCCESS.json`).

A map stage writes one `ExtraStats` per part; the pipeline merges the parts' into the
stage's. Each field says how it merges (`summed`, `most`, `counts`, `per_round`, `union`,
`first`, `by_key`), so no stage hand-writes a merge. Values that follow from the merged ones (means,
rates) come from `derived()` and are recomputed after the merge, never summed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

MERGE = "merge"
OF = "of"


def summed(default: float = 0) -> Any:
    """A number that adds up over parts."""
    return field(default=default, metadata={MERGE: "sum"})


def most(default: float = 0) -> Any:
    """A number whose stage value is the largest part's (rounds a loop took)."""
    return field(default=default, metadata={MERGE: "max"})


def counts() -> Any:
    """A `{name: count}` mapping whose counts add up key by key."""
    return field(default_factory=dict, metadata={MERGE: "counts"})


def per_round() -> Any:
    """A tuple of numbers, one per round of a loop, summed round by round (a part that
    stopped early has fewer rounds)."""
    return field(default_factory=tuple, metadata={MERGE: "per_round"})


def union() -> Any:
    """A sorted tuple of distinct values seen in any part."""
    return field(default_factory=tuple, metadata={MERGE: "union"})


def first(default: Any = None) -> Any:
    """A value that is the same in every part (an index's size); the first part's is kept."""
    return field(default=default, metadata={MERGE: "first"})


def by_key(of: type[ExtraStats]) -> Any:
    """A `{name: stats}` mapping of nested stats (buckets), merged name by name."""
    return field(default_factory=dict, metadata={MERGE: "by_key", OF: of})


@dataclass(frozen=True, kw_only=True)
class ExtraStats:
    """Base of a stage's statistics: fields declare their merge; `derived` adds the rest."""

    #: Fields `to_dict` leaves out when they hold their default (keeps old JSON readable).
    omit_defaults: ClassVar[bool] = False

    def derived(self) -> dict[str, Any]:
        """Values computed from the fields (means, rates), added to `to_dict`."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the fields, nested stats as dicts, then `derived()`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(MERGE) == "by_key":
                value = {k: v.to_dict() for k, v in sorted(value.items())}
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return {**out, **self.derived()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Read back `to_dict`'s form (derived keys and unknown keys are ignored)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.metadata.get(MERGE) == "by_key":
                sub: type[ExtraStats] = f.metadata[OF]
                value = {str(k): sub.from_dict(v) for k, v in value.items()}
            elif f.metadata.get(MERGE) == "union":  # a bare string is one value, not letters
                value = (value,) if isinstance(value, str) else tuple(value)
            elif f.metadata.get(MERGE) == "per_round":
                value = tuple(value)
            values[f.name] = value
        return cls(**values)

    @classmethod
    def merge(cls, parts: Sequence[Self]) -> Self:
        """The stage's stats from its parts', field by field as each field declares."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            how = f.metadata.get(MERGE)
            items = [getattr(p, f.name) for p in parts]
            if not items:
                continue
            match how:
                case "sum":
                    values[f.name] = sum(items)
                case "max":
                    values[f.name] = max(items)
                case "counts":
                    merged: dict[str, Any] = {}
                    for item in items:
                        for k, n in item.items():
                            merged[k] = merged.get(k, 0) + n
                    values[f.name] = merged
                case "per_round":
                    rounds = max(len(item) for item in items)
                    values[f.name] = tuple(
                        sum(item[r] for item in items if r < len(item)) for r in range(rounds)
                    )
                case "union":
                    values[f.name] = tuple(sorted({v for item in items for v in item}))
                case "first":
                    values[f.name] = next((v for v in items if v is not None), None)
                case "by_key":
                    sub: type[ExtraStats] = f.metadata[OF]
                    keys = sorted({k for item in items for k in item})
                    values[f.name] = {
                        k: sub.merge([item[k] for item in items if k in item]) for k in keys
                    }
                case _:
                    raise TypeError(
                        f"{cls.__name__}.{f.name}: declare how it merges "
                        "(summed, most, counts, per_round, union, first or by_key)"
                    )
        return cls(**values)
