"""What flow tasks receive instead of a Pipeline: the resolved recipe and the run folder.

A `PipelineRef` is small, frozen and picklable: the typed recipe's `to_dict()` as JSON,
which is exact (`Recipe.from_dict` reads back an equal recipe), so Dask and Ray can ship it
to worker processes. Each process rebuilds the `Pipeline` from it once (`pipeline_for`
caches it), importing users' stage modules by their `module:Class` path, and keeps it,
with its engine lock, for every part it runs. The flow's own process goes through the same
cache, so with the threads runner the flow and its tasks share one Pipeline.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from gristmill.pipelines.pipeline import Pipeline, PlannedStage
from gristmill.pipelines.recipe import Recipe


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
            recipe_json=json.dumps(recipe.to_dict(), sort_keys=True),
            recipe_path=recipe.path,
            run_dir=str(run_dir),
            show_progress=show_progress,
        )

    def recipe(self) -> Recipe:
        """The recipe, rebuilt (its users' stages imported by their paths)."""
        where = self.recipe_path or "recipe"
        return Recipe.from_dict(json.loads(self.recipe_json), where=where, path=self.recipe_path)


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
            pipeline = _PIPELINES[ref] = Pipeline(
                ref.recipe(), ref.run_dir, show_progress=ref.show_progress
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
