"""Every stage a recipe can name: the built-in classes, and users' own by `module:Class`.

One table, built from the classes themselves (each declares its name, kind, version,
citation and config), resolves a recipe's stage key. A built-in stage is named by its
`name` (`heuristics`); any other stage by its import path (`mypkg.filters:MinWords`), which
is also what the fingerprint and the manifest record. `gm.stages.Heuristics(...)` builds a
built-in stage in Python. Importing this module loads no model library: stages import
torch, faiss or vLLM only when they run.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping
from typing import Any

from gristmill.filters.clear import Clear
from gristmill.filters.decontam import Decontam
from gristmill.filters.dedup import ExactDedup, MinHashDedup, SemanticDedup
from gristmill.filters.embed import Embed
from gristmill.filters.heuristics import Heuristics
from gristmill.filters.judge import Judge
from gristmill.pipelines.config import RecipeError, build_dataclass, to_plain
from gristmill.pipelines.stage import Filter, Map, Select, Stage, class_path
from gristmill.selectors.baselines import RandomSelect, TopKSelect
from gristmill.selectors.grape import GrapeSelect
from gristmill.selectors.kmeans import KMeansSelect
from gristmill.selectors.s2l import S2LSelect
from gristmill.synth.dart import Dart
from gristmill.synth.generate import Generate
from gristmill.synth.hint_infer import HintInfer
from gristmill.synth.magpie import Magpie
from gristmill.synth.rejection import RejectionSample

#: The built-in stages, in the order the README's table lists them.
BUILTIN: tuple[type[Stage], ...] = (
    Generate,
    Magpie,
    RejectionSample,
    Dart,
    HintInfer,
    Heuristics,
    Embed,
    SemanticDedup,
    ExactDedup,
    MinHashDedup,
    Decontam,
    Judge,
    Clear,
    KMeansSelect,
    GrapeSelect,
    S2LSelect,
    RandomSelect,
    TopKSelect,
)

BY_NAME: dict[str, type[Stage]] = {cls.name: cls for cls in BUILTIN}
assert len(BY_NAME) == len(BUILTIN), "two built-in stages share a name"


def stage_key(cls: type[Stage]) -> str:
    """How a recipe names `cls`: its name if it is built in, else `module:Class`."""
    return cls.name if BY_NAME.get(cls.name) is cls else class_path(cls)


def resolve_stage(key: str, *, where: str = "recipe") -> type[Stage]:
    """The stage class for a recipe key: a built-in name or a `package.module:Class` path."""
    if ":" not in key:
        cls = BY_NAME.get(key)
        if cls is None:
            raise RecipeError(
                f"{where}: unknown stage {key!r}; built-in stages: {', '.join(BY_NAME)}; "
                "a stage of your own is named by its import path, `package.module:Class`"
            )
        return cls
    module_name, _, attr = key.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(
            f"{where}: cannot import module {module_name!r} for stage {key!r}: {exc}. "
            f"Install the package that holds it or add its folder to PYTHONPATH "
            f"(sys.path: {sys.path})"
        ) from exc
    obj: object = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise RecipeError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, Map | Select)):
        raise RecipeError(
            f"{where}: {key!r} is not a gristmill stage: subclass gm.Filter, gm.Map or gm.Select"
        )
    if obj in (Map, Filter, Select):
        raise RecipeError(f"{where}: {key!r} is a stage base class; subclass it")
    return obj


def build_stage(item: object, *, where: str = "recipe") -> Stage:
    """A stage from a Stage object, a key (`- heuristics`) or a one-key mapping
    (`- kmeans: {budget: 10}`): how a recipe's stage list, and a stage nested in another
    stage's config (kMQ's `scorer`), are read."""
    if isinstance(item, Stage):
        return item
    if isinstance(item, type) and issubclass(item, Stage):
        raise RecipeError(f"{where}: {item.__name__} is a class; build it: {item.__name__}()")
    cfg: Any
    if isinstance(item, str):
        key, cfg = item, {}
    elif isinstance(item, Mapping) and len(item) == 1:
        ((key, cfg),) = item.items()
        cfg = cfg or {}
    else:
        raise RecipeError(f"{where}: write a stage as `- name: {{config}}` or `- name`")
    if not isinstance(cfg, Mapping):
        raise RecipeError(f"{where}: config of stage {key!r} must be a mapping")
    cls = resolve_stage(str(key), where=where)
    config = build_dataclass(cls.Config, cfg, where=f"{where} ({key})")
    try:
        return cls(config)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def stage_spec(stage: Stage) -> dict[str, Any]:
    """A stage as plain data, `{key: {field: value}}` with every field resolved: what
    `Recipe.to_dict()` writes and `build_stage` reads back."""
    return {stage_key(type(stage)): to_plain(stage.config)}


def summary(cls: type[Stage]) -> str:
    """The first paragraph of the class docstring, on one line."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def stage_table() -> str:
    """The README's stage table (Markdown), generated from the built-in classes."""
    lines = ["| stage | kind | what it does |", "| --- | --- | --- |"]
    lines += [f"| `{cls.name}` | {cls.kind} | {summary(cls)} |" for cls in BUILTIN]
    return "\n".join(lines)


def describe(cls: type[Stage]) -> str:
    """A stage's key, kind, summary and config fields with defaults, for `gristmill stages`."""
    out = [f"{stage_key(cls)}  ({cls.kind}, v{cls.version})", f"    {summary(cls)}"]
    for f in dataclasses.fields(cls.Config):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        out.append(f"    {f.name} = {default}")
    return "\n".join(out)


__all__ = [
    "BUILTIN",
    "BY_NAME",
    "Clear",
    "Dart",
    "Decontam",
    "Embed",
    "ExactDedup",
    "Generate",
    "GrapeSelect",
    "Heuristics",
    "HintInfer",
    "Judge",
    "KMeansSelect",
    "Magpie",
    "MinHashDedup",
    "RandomSelect",
    "RejectionSample",
    "S2LSelect",
    "SemanticDedup",
    "TopKSelect",
    "build_stage",
    "describe",
    "resolve_stage",
    "stage_key",
    "stage_spec",
    "stage_table",
]
