"""TRL trains on what gristmill writes, loaded exactly as a user would load it.

Two small DART runs on the real engine produce an SFT dataset (`output.format: messages`)
and a preference dataset (`emit: dpo`, `output.format: preference`); `datasets` loads their
Parquet folders, and TRL's `SFTTrainer` and `DPOTrainer` take a few optimizer steps on the
bundled SmolLM2 on CPU.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from dart_small import DART_RECIPE, DART_SMALL
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe

RECIPE = DART_RECIPE

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# As small as the shared DART run; the engine spec stays the recipe's, so the run reuses the
# session's engine.
SMALL = [
    "stages.dart.max_tokens=160",
    "stages.dart.samples_per_round=2",
    "stages.dart.k_p=2",
    "stages.dart.max_trials=6",
]
SFT_RUN = [*DART_SMALL, "output.format=messages"]
# A pair needs a right and a wrong answer to one problem: levels 1-3 and four probes each
# give the tiny model both.
DPO_RUN = [
    *SMALL,
    "input.rows=9",
    "input.options={levels: [1, 2, 3]}",
    "stages.dart.probe_samples=4",
    "stages.dart.emit=dpo",
    "output.format=preference",
]
STEPS = 2


def load_output(run: Path) -> datasets.Dataset:
    """The run's dataset the way the README tells a user to load it."""
    ds = datasets.load_dataset("parquet", data_dir=str(run / "dataset" / "data"), split="train")
    assert isinstance(ds, datasets.Dataset)
    return ds


@pytest.fixture(scope="module")
def sft_run(dart_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared DART run exported again as `messages`: only the output changes, so every
    stage is reused from its checkpoint and nothing is generated again."""
    out = tmp_path_factory.mktemp("sft") / "run"
    shutil.copytree(dart_run, out)
    parts = {p: p.stat().st_mtime_ns for p in out.glob("01_dart-*/part-*.parquet")}
    assert parts
    run_recipe(RECIPE, out, SFT_RUN, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("01_dart-*/part-*.parquet")} == parts
    return out


@pytest.fixture(scope="module")
def dpo_run(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "run"
    run_recipe(RECIPE, out, DPO_RUN, show_progress=False)
    return out


def common_args(out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "max_length": 128,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def step_logs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The per-step entries of a trainer's log history (the last entry is the run summary)."""
    return [h for h in history if "loss" in h]


def snapshot(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A copy of the last decoder layer's weights, to show the optimizer moved them."""
    last = model.model.layers[-1]
    return {name: p.detach().clone() for name, p in last.named_parameters()}


def moved(model: PreTrainedModel, before: dict[str, torch.Tensor]) -> bool:
    last = dict(model.model.layers[-1].named_parameters())
    return any(not torch.equal(last[name].detach(), value) for name, value in before.items())


def train_steps(trainer: SFTTrainer | DPOTrainer, ds: datasets.Dataset) -> list[dict[str, float]]:
    """Train for STEPS and check what every trainer run must show; returns the step logs."""
    model = trainer.model
    # TRL loaded the model (float32) and its tokenizer from the folder, as the README shows
    assert isinstance(model, PreTrainedModel) and model.dtype == torch.float32
    # every produced row survived TRL's preparation (none dropped for length or format)
    assert len(trainer.train_dataset) == len(ds)
    before = snapshot(model)
    trainer.train()
    assert trainer.state.global_step == STEPS
    logs = step_logs(trainer.state.log_history)
    assert len(logs) == STEPS
    assert moved(model, before), "the optimizer steps changed the weights"
    print(f"{type(trainer).__name__}: {len(ds)} rows, step logs {logs}")
    return logs


def test_sft_trainer_takes_steps_on_a_messages_dataset(
    sft_run: Path, bundled_model_path: Path, tmp_path: Path
) -> None:
    ds = load_output(sft_run)
    assert set(ds.column_names) == {"id", "messages"}
    assert len(ds) >= 2, "the model solves some level-1 sums"
    for row in ds:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] and row["messages"][-1]["content"].strip()

    trainer = SFTTrainer(
        model=str(bundled_model_path),
        args=SFTConfig(**common_args(tmp_path)),
        train_dataset=ds,
    )
    # the chat template was applied: one assistant turn per tokenized row
    text = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert text.count("<|im_start|>assistant") == 1
    logs = train_steps(trainer, ds)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logs)


@pytest.mark.heavy
def test_dpo_trainer_takes_steps_on_a_preference_dataset(
    dpo_run: Path, bundled_model_path: Path, tmp_path: Path
) -> None:
    ds = load_output(dpo_run)
    assert set(ds.column_names) == {"id", "prompt", "chosen", "rejected"}
    assert len(ds) >= 1, "some problem got both a right and a wrong answer"
    for row in ds:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]

    trainer = DPOTrainer(
        model=str(bundled_model_path),
        args=DPOConfig(**common_args(tmp_path)),
        train_dataset=ds,
    )
    logs = train_steps(trainer, ds)
    assert all(math.isfinite(h["loss"]) for h in logs)
    # step 1: the policy is still the reference, so every reward is 0 and the loss log(2)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    # step 2: the first update moved the policy away from the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(h[key]) for h in logs), key
    assert logs[1]["rewards/chosen"] != 0.0 or logs[1]["rewards/rejected"] != 0.0
