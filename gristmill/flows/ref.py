"""What flow tasks receive instead of a Pipeline: the resolved recipe and the run folder.

A `PipelineRef` is small, frozen and picklable, so Dask and Ray can ship it to worker
processes; each process rebuilds the `Pipeline` from it once (`pipeline_for` caches it) and
keeps it, with its engine lock, for every part it runs. The flow's own process goes through
the same cache, so with the threads runner the flow and its tasks share one Pipeline.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.pipelines.pipeline import Pipeline, PlannedStage
from gristmill.pipelines.recipe import (
    Recipe,
    apply_overrides,
    load_recipe,
    read_recipe_raw,
    recipe_from_mapping,
)

#: Top-level recipe keys read by the flows layer, not by the pipeline (see flows.schedule).
FLOW_KEYS = ("schedule",)


@dataclass(frozen=True, kw_only=True)
class PipelineRef:
    """A recipe resolved to JSON (overrides applied) plus the run folder it writes."""

    recipe_json: str
    recipe_path: str | None
    run_dir: str
    show_progress: bool = True

    @classmethod
    def of(cls, recipe: Recipe, run_dir: str | Path, *, show_progress: bool = True) -> PipelineRef:
        """Freeze a loaded recipe; every process rebuilds exactly this recipe from it."""
        return cls(
            recipe_json=json.dumps(recipe.raw, sort_keys=True, default=_json_scalar),
            recipe_path=recipe.path,
            run_dir=str(run_dir),
            show_progress=show_progress,
        )


def _json_scalar(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"recipe value {value!r} ({type(value).__name__}) is not JSON")


#: Pipelines kept per process; a long-lived worker forgets the oldest runs.
CACHE_SIZE = 4
_PIPELINES: OrderedDict[PipelineRef, Pipeline] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def pipeline_for(ref: PipelineRef) -> Pipeline:
    """The process-wide Pipeline for `ref` (built on first use in each process).

    Built under a lock: two threads of one worker asking at once must get the same object,
    since its engine lock is what keeps them from calling one vLLM engine concurrently.
    """
    with _PIPELINES_LOCK:
        pipeline = _PIPELINES.get(ref)
        if pipeline is None:
            where = ref.recipe_path or "recipe"
            recipe = recipe_from_mapping(
                json.loads(ref.recipe_json), where=where, path=ref.recipe_path
            )
            pipeline = _PIPELINES[ref] = Pipeline(
                recipe, ref.run_dir, show_progress=ref.show_progress
            )
            while len(_PIPELINES) > CACHE_SIZE:
                _PIPELINES.popitem(last=False)
        else:
            _PIPELINES.move_to_end(ref)
        return pipeline


def planned_stage(ref: PipelineRef, index: int) -> PlannedStage:
    """Stage number `index` (1-based, as in folder names) of the referenced pipeline."""
    stages = pipeline_for(ref).stages
    if not 1 <= index <= len(stages):
        raise IndexError(f"stage {index} out of range: the recipe has {len(stages)} stages")
    return stages[index - 1]


def load_flow_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """`load_recipe`, accepting the flow-level keys (`schedule:`) the pipeline does not read."""
    raw = read_recipe_raw(path)
    if not any(key in raw for key in FLOW_KEYS):
        return load_recipe(path, overrides)
    pipeline_raw: dict[str, Any] = {k: v for k, v in raw.items() if k not in FLOW_KEYS}
    resolved = apply_overrides(pipeline_raw, overrides, where=str(path))
    return recipe_from_mapping(resolved, where=str(path), path=str(path))
