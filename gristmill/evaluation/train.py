"""Fine-tune a base model on one drawn set of rows with TRL's `SFTTrainer`, loss on the
answers only, with fixed hyper-parameters; save the checkpoint and what the trainer got.

Rows are tokenized here with the model's chat template, as TRL tokenizes a conversational
prompt/completion dataset (prompt with the generation prompt, then prompt + completion;
the answer is what follows their common prefix), so the loss tokens can be counted and cut
to the budget before training. The trainer receives `input_ids` and `completion_mask` with
`completion_only_loss=True`: this works with any chat template, where `assistant_only_loss`
needs `{% generation %}` markers that SmolLM2's template lacks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.evaluation.budget import Draw

#: Per-row JSON lines of what the trainer received: id, tokens, loss tokens, in order.
TRAINING_ROWS = "training_rows.jsonl"
CHECKPOINT = "checkpoint"

Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The fixed hyper-parameters of every training run (recorded with each result)."""

    learning_rate: float = 1e-4
    batch_size: int = 4
    gradient_accumulation: int = 1
    max_length: int = 512
    lr_scheduler: str = "linear"
    #: Warm-up steps, or a fraction of the run's steps when below 1.
    warmup: float = 0.0
    weight_decay: float = 0.0
    #: "auto": bf16 on a GPU that has it, else fp32 (always fp32 on CPU).
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if min(self.batch_size, self.gradient_accumulation, self.max_length) < 1:
            raise ValueError("batch_size, gradient_accumulation and max_length must be >= 1")

    @property
    def rows_per_step(self) -> int:
        """Rows per optimizer step."""
        return self.batch_size * self.gradient_accumulation

    def to_dict(self) -> dict[str, Any]:
        """The hyper-parameters as recorded."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """A dataset tokenized for training: per row, its token ids and answer mask (cut to
    `max_length`) and its loss tokens."""

    ids: tuple[str, ...]
    input_ids: tuple[tuple[int, ...], ...]
    masks: tuple[tuple[int, ...], ...]

    @property
    def loss_tokens(self) -> list[int]:
        """Answer tokens of each row (the tokens that carry loss)."""
        return [sum(m) for m in self.masks]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What one training run did: the checkpoint, rows, loss tokens, steps, losses, time."""

    checkpoint: Path
    rows: int
    tokens: int
    steps: int
    losses: tuple[float, ...]
    seconds: float


def render_ids(
    tokenizer: Any, messages: Sequence[dict[str, str]], *, generation: bool
) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_split(
    tokenizer: Any, prompt: Sequence[dict[str, str]], completion: Sequence[dict[str, str]]
) -> tuple[list[int], int]:
    """Token ids of prompt + answer and where the answer starts (their common prefix)."""
    head = render_ids(tokenizer, prompt, generation=True)
    full = render_ids(tokenizer, [*prompt, *completion], generation=False)
    start = 0
    for a, b in zip(head, full, strict=False):
        if a != b:
            break
        start += 1
    return full, start


def encode_rows(tokenizer: Any, rows: pl.DataFrame, max_length: int) -> Encoded:
    """Tokenize every row: ids and answer masks cut to `max_length`."""
    input_ids, masks = [], []
    for prompt, completion in zip(
        rows["prompt"].to_list(), rows["completion"].to_list(), strict=True
    ):
        full, start = answer_split(tokenizer, prompt, completion)
        mask = [0] * start + [1] * (len(full) - start)
        input_ids.append(tuple(full[:max_length]))
        masks.append(tuple(mask[:max_length]))
    return Encoded(ids=tuple(rows["id"].to_list()), input_ids=tuple(input_ids), masks=tuple(masks))


def drawn_examples(encoded: Encoded, draw: Draw) -> list[dict[str, Any]]:
    """The trainer's rows: drawn rows in order, each cut after its kept loss tokens."""
    out = []
    for row, keep in zip(draw.rows, draw.tokens, strict=True):
        ids, mask = encoded.input_ids[row], encoded.masks[row]
        if keep < sum(mask):  # cut the answer after its `keep`-th token
            seen, end = 0, 0
            for end, bit in enumerate(mask, start=1):  # noqa: B007 - end is used after
                seen += bit
                if seen == keep:
                    break
            ids, mask = ids[:end], mask[:end]
        out.append({"id": encoded.ids[row], "input_ids": list(ids), "completion_mask": list(mask)})
    return out


def _precision(config: TrainConfig) -> tuple[bool, bool]:
    """(use_cpu, bf16) for this machine."""
    import torch

    cuda = torch.cuda.is_available()
    if config.precision == "bf16" and not cuda:
        raise ValueError("precision bf16 needs a GPU; training on CPU runs in fp32")
    bf16 = cuda and (
        config.precision == "bf16"
        or (config.precision == "auto" and torch.cuda.is_bf16_supported())
    )
    return not cuda, bf16


def train_model(
    base_model: str,
    examples: Sequence[dict[str, Any]],
    config: TrainConfig,
    *,
    seed: int,
    out: Path,
    max_steps: int | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune `base_model` (a local HF folder) on `examples` in their order; one pass, or
    `max_steps` steps. Writes `out/checkpoint/` and `out/training_rows.jsonl`."""
    import datasets
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise RuntimeError(
            "gristmill evaluate trains with TRL, which is not installed: "
            "pip install 'gristmill[eval]' (or pip install 'trl>=1.16,<2')"
        ) from exc

    say = progress or (lambda _line: None)
    use_cpu, bf16 = _precision(config)
    rows = len(examples)
    steps = max_steps or math.ceil(rows / config.rows_per_step)

    class Lines(TrainerCallback):
        """A progress line per logged step."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                say(f"    step {state.global_step}/{steps} loss {float(logs['loss']):.4f}")

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        completion_only_loss=True,
        train_sampling_strategy="sequential",  # the seeded draw is the training order
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=base_model,
        args=args,
        train_dataset=datasets.Dataset.from_list(list(examples)),
        processing_class=tokenizer,
        callbacks=[Lines()],
    )
    trainer.remove_callback(PrinterCallback)  # `progress` gets a line per step instead
    received = trainer.train_dataset
    assert isinstance(received, datasets.Dataset)
    out.mkdir(parents=True, exist_ok=True)
    tokens = 0
    with (out / TRAINING_ROWS).open("w") as f:  # what the trainer holds, not what was asked
        for row in received:
            loss = sum(1 for t in row["labels"] if t != -100)
            tokens += loss
            f.write(
                json.dumps({"id": row["id"], "tokens": len(row["input_ids"]), "loss_tokens": loss})
                + "\n"
            )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    checkpoint = out / CHECKPOINT
    trainer.save_model(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    losses = tuple(float(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    result = TrainResult(
        checkpoint=checkpoint,
        rows=len(received),
        tokens=tokens,
        steps=int(trainer.state.global_step),
        losses=losses,
        seconds=seconds,
    )
    _free(trainer)
    return result


def _free(trainer: Any) -> None:
    """Drop the trained model and optimizer state before the next run loads its own (on CPU
    one run of the bundled model peaks at 4.5 GB RSS; four runs in one process at 5.5 GB)."""
    import gc

    import torch

    trainer.model = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
