"""Recipes: YAML that names the input, the engine and the stages with their configs.

`gristmill run recipe.yaml` and the Prefect flow both turn a recipe into the same
`Pipeline`. `--set KEY=VALUE` overrides any value (`stages.magpie.turns=2`, `input.rows=50`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from gristmill.embed import DEFAULT_EMBEDDER
from gristmill.engines.factory import EngineSpec
from gristmill.pipelines.stage import Stage, StageConfig

if TYPE_CHECKING:
    from gristmill.flows.schedule import ScheduleSpec


class RecipeError(ValueError):
    """A recipe that cannot be run, with the file and key at fault."""


def stage_class(name: str) -> type[Stage]:
    """The stage class for a recipe name (explicit dispatch, imported lazily)."""
    match name:
        case "magpie":
            from gristmill.synth.magpie import Magpie

            return Magpie
        case "heuristics":
            from gristmill.filters.heuristics import Heuristics

            return Heuristics
        case "embed":
            from gristmill.filters.embed import Embed

            return Embed
        case "semantic_dedup":
            from gristmill.filters.dedup import SemanticDedup

            return SemanticDedup
        case "kmeans":
            from gristmill.selectors.kmeans import KMeansSelect

            return KMeansSelect
        case "random":
            from gristmill.selectors.baselines import RandomSelect

            return RandomSelect
        case "topk":
            from gristmill.selectors.baselines import TopKSelect

            return TopKSelect
        case "rejection":
            from gristmill.synth.rejection import RejectionSample

            return RejectionSample
        case "dart":
            from gristmill.synth.dart import Dart

            return Dart
        case "hint_infer":
            from gristmill.synth.hint_infer import HintInfer

            return HintInfer
        case "exact_dedup":
            from gristmill.filters.dedup import ExactDedup

            return ExactDedup
        case "minhash_dedup":
            from gristmill.filters.dedup import MinHashDedup

            return MinHashDedup
        case "decontam":
            from gristmill.filters.decontam import Decontam

            return Decontam
        case "clear":
            from gristmill.filters.clear import Clear

            return Clear
        case "grape":
            from gristmill.selectors.grape import GrapeSelect

            return GrapeSelect
        case "s2l":
            from gristmill.selectors.s2l import S2LSelect

            return S2LSelect
        case _:
            raise RecipeError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")


STAGE_NAMES = (
    "magpie",
    "rejection",
    "dart",
    "hint_infer",
    "heuristics",
    "embed",
    "semantic_dedup",
    "exact_dedup",
    "minhash_dedup",
    "decontam",
    "clear",
    "kmeans",
    "grape",
    "s2l",
    "random",
    "topk",
)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """Where records come from: a file (with a column mapping), N blank seed rows, or N rows
    from a built-in generator (`generator: arith`, with its `options`)."""

    path: str | None = None
    format: str | None = None
    mapping: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    rows: int | None = None
    limit: int | None = None
    generator: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if (self.path is None) == (self.rows is None):
            raise RecipeError("input: give exactly one of `path` (a dataset file) or `rows`")
        if self.rows is not None and self.rows < 1:
            raise RecipeError(f"input.rows must be >= 1, got {self.rows}")
        if self.generator is not None and self.rows is None:
            raise RecipeError("input.generator needs `rows` (how many rows to generate)")
        if self.options and self.generator is None:
            raise RecipeError("input.options are the options of a `generator`; none is set")


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """How the final dataset is written."""

    shard_rows: int = 100_000
    drop_columns: tuple[str, ...] = ("embedding",)
    split: str = "train"
    #: `records`: every column (lineage, scores); or a trainer format with only its columns:
    #: `messages` (SFT), `prompt_completion`, `preference` (TRL DPO: prompt/chosen/rejected
    #: message lists), `chat_preference` (Axolotl / LLaMA-Factory DPO: messages plus chosen and
    #: rejected as single messages).
    format: Literal["records", "messages", "prompt_completion", "preference", "chat_preference"] = (
        "records"
    )


@dataclass(frozen=True, kw_only=True)
class StageEntry:
    """One stage of a recipe: its class and validated config."""

    cls: type[Stage]
    config: StageConfig

    @property
    def name(self) -> str:
        return self.cls.name

    def build(self) -> Stage:
        """Instantiate the stage."""
        return self.cls(self.config)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated recipe. `raw` is the resolved YAML mapping, kept for provenance."""

    name: str
    seed: int
    part_rows: int
    input: InputSpec
    engine: EngineSpec | None
    embedder: str
    stages: tuple[StageEntry, ...]
    output: OutputSpec
    raw: Mapping[str, Any]
    path: str | None = None
    #: When `gristmill serve` runs it (cron or interval); not part of any fingerprint.
    schedule: ScheduleSpec | None = None


TOP_KEYS = {
    "name",
    "seed",
    "part_rows",
    "input",
    "engine",
    "embedder",
    "stages",
    "output",
    "schedule",
}


def read_recipe_raw(path: str | Path) -> dict[str, Any]:
    """A recipe file's top-level mapping, unvalidated."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RecipeError(f"recipe not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping at the top level")
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `KEY=VALUE` overrides, validate everything."""
    raw = apply_overrides(read_recipe_raw(path), overrides, where=str(path))
    return recipe_from_mapping(raw, where=str(path), path=str(path))


def recipe_from_mapping(raw: Mapping[str, Any], *, where: str, path: str | None = None) -> Recipe:
    """Validate a recipe mapping (already overridden)."""
    raw = copy.deepcopy(dict(raw))
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown top-level key(s) {sorted(unknown)}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{where}: `stages` must be a non-empty list")
    stages = tuple(
        _stage_entry(item, where=f"{where}: stages[{i}]") for i, item in enumerate(stages_raw)
    )
    input_raw = raw.get("input")
    if not isinstance(input_raw, dict):
        raise RecipeError(f"{where}: `input` must be a mapping with `path` or `rows`")
    input_raw = dict(input_raw)
    for key in ("mapping", "options"):
        if isinstance(input_raw.get(key), dict):
            input_raw[key] = tuple(sorted(input_raw[key].items()))
    engine_raw = raw.get("engine")
    try:
        engine = EngineSpec.from_mapping(engine_raw) if engine_raw else None
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: engine: {exc}") from exc
    embed_raw = raw.get("embedder", DEFAULT_EMBEDDER)
    embedder = (
        embed_raw.get("model", DEFAULT_EMBEDDER) if isinstance(embed_raw, dict) else embed_raw
    )
    seed = raw.get("seed", 0)
    part_rows = raw.get("part_rows", 64)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RecipeError(f"{where}: seed must be an integer, got {seed!r}")
    if not isinstance(part_rows, int) or part_rows < 1:
        raise RecipeError(f"{where}: part_rows must be a positive integer, got {part_rows!r}")
    schedule = None
    if raw.get("schedule") is not None:
        from gristmill.flows.schedule import ScheduleSpec

        schedule = ScheduleSpec.from_mapping(raw["schedule"], where=where)
    return Recipe(
        schedule=schedule,
        name=str(raw.get("name") or (Path(path).stem if path else "recipe")),
        seed=seed,
        part_rows=part_rows,
        input=build_dataclass(InputSpec, input_raw, where=f"{where}: input"),
        engine=engine,
        embedder=str(embedder),
        stages=stages,
        output=build_dataclass(OutputSpec, raw.get("output") or {}, where=f"{where}: output"),
        raw=raw,
        path=path,
    )


def _stage_entry(item: object, *, where: str) -> StageEntry:
    cfg: Any
    if isinstance(item, str):
        name, cfg = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        ((name, cfg),) = item.items()
        cfg = cfg or {}
    else:
        raise RecipeError(f"{where}: write a stage as `- name: {{config}}` or `- name`")
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: config of stage {name!r} must be a mapping")
    cls = stage_class(str(name))
    config = build_dataclass(cls.Config, cfg, where=f"{where} ({name})")
    return StageEntry(cls=cls, config=config)


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


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], *, where: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; `stages.<name or index>.<key>` addresses a stage."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(text) if text else ""
        parts = key.split(".")
        target: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if depth == 0 and part == "stages":
                continue
            if depth == 1 and parts[0] == "stages":
                target = _stage_config(raw, part, where=f"--set {item!r}")
                continue
            if not isinstance(target, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[:depth])} is not a mapping")
            target = target.setdefault(part, {})
        if parts[0] == "stages" and len(parts) < 3:
            raise RecipeError(f"--set {item!r}: use stages.<name or index>.<key>=value")
        if not isinstance(target, dict):
            raise RecipeError(f"--set {item!r}: cannot set a key inside {target!r}")
        target[parts[-1]] = value
    return raw


def _stage_config(raw: dict[str, Any], selector: str, *, where: str) -> dict[str, Any]:
    stages = raw.get("stages")
    if not isinstance(stages, list):
        raise RecipeError(f"{where}: the recipe has no `stages` list")
    if selector.isdigit():
        index = int(selector)
        if index >= len(stages):
            raise RecipeError(f"{where}: there are only {len(stages)} stages")
    else:
        names = [s if isinstance(s, str) else next(iter(s)) for s in stages]
        matches = [i for i, n in enumerate(names) if n == selector]
        if len(matches) != 1:
            raise RecipeError(
                f"{where}: stage {selector!r} matches {len(matches)} stages {names}; "
                "use its index instead"
            )
        index = matches[0]
    entry = stages[index]
    if isinstance(entry, str):
        entry = stages[index] = {entry: {}}
    name = next(iter(entry))
    if entry[name] is None:
        entry[name] = {}
    cfg = entry[name]
    if not isinstance(cfg, dict):
        raise RecipeError(f"{where}: config of stage {name!r} is not a mapping")
    return cfg
