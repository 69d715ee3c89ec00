"""Config values: YAML/keyword values checked against a config dataclass, and back to plain data.

One path builds every config (a stage's, the input's, the output's), from a recipe file or
from keyword arguments in Python, so both get the same checks and the same error messages;
`to_plain` is its inverse, for `Recipe.to_dict()` and the manifest.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe or stage config that cannot be run, with the file and key at fault."""


def build_dataclass(cls: type[Any], values: Mapping[str, Any], *, where: str) -> Any:
    """Build a frozen config dataclass from YAML values, checking names and simple types."""
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    converted = {k: _coerce(v, hints[k], where=f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, *, where: str) -> Any:
    """Convert YAML lists to tuples and check scalars against a type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where=where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(f"{where}: {value!r} does not fit {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (Mapping, dict) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where=f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def to_plain(value: Any) -> Any:
    """A config value as plain YAML/JSON data: dataclasses as mappings of every field,
    tuples as lists, mappings as dicts (the inverse of `build_dataclass`'s coercion)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
