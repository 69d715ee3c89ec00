"""The `s2l` stage: S2L, selection by the loss trajectories of a small proxy model.

From "SmallToLarge (S2L): Scalable Data Selection for Fine-tuning Large Language Models by
Summarizing Training Trajectories of Small Models" (Yang et al. 2024; reference code
BigML-CS-UCLA/S2L, `schedules/s2l.py` and `get_trajectories.py`). A small proxy model is
fine-tuned on the whole pool with the prompt tokens masked; at T checkpoints spread over
training every example's mean response-token loss is recorded; the N×T trajectories are
clustered with k-means, and the budget is spread over sources, then over each source's
clusters, then drawn uniformly inside a cluster.

Water-filling, as the reference does it: groups are visited smallest first (the reference's
comment says "largest clusters first", but it sorts ascending; we follow the code), and
each takes `min(size, left // groups_left)`, so big groups absorb what small ones cannot
use and the total is exactly `min(budget, n)`. Clusters of at most `small_cluster` rows
(the reference: 2) are left out of that pass and only fill what the others could not, drawn
uniformly from all of them together.

Trajectories are saved as Parquet under `<run>/s2l/trajectories-<key>.parquet` (columns
`id`, `source`, `loss_0` … `loss_{T-1}`) with a JSON sidecar (training time, tokens,
tokens/s, model, layers, checkpoint steps). The key fingerprints the input ids and the
training settings, not the budget or the clustering, so a rerun with another budget
selects again without retraining.

Where we differ from the reference, on purpose: the proxy is the bundled SmolLM2, optionally
cut to its first `layers` decoder layers so CPU training is practical (any HF causal LM
works, on GPU too); the chat template renders the examples (prompt = every turn before the
last assistant turn, with the generation prompt); training is a plain seeded AdamW loop
with the reference's schedule (warm-up, cosine decay, accumulated micro-batches);
k-means and the in-cluster draws are seeded; a prompt too long for `max_length` loses its
beginning rather than the response; every source is clustered (the reference skips sources
it takes whole) so each output row carries its `cluster`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import polars as pl
from tqdm import tqdm

from gristmill.atomic import atomic_path
from gristmill.engines.models import DEFAULT_MODEL, resolve_model
from gristmill.pipelines.stage import Select, StageConfig, StageContext, fingerprint
from gristmill.selectors import check_budget, resolve_budget
from gristmill.selectors.kmeans import train_kmeans

if TYPE_CHECKING:  # torch is imported where it is used, so importing s2l stays light
    import torch

log = logging.getLogger(__name__)

#: Bump when training or the file layout changes, so old trajectories are not reused.
#: 2: the reference's schedule (warm-up + cosine, gradient accumulation, weight decay).
TRAJECTORY_VERSION = 2
IGNORE = -100
MAX_GRAD_NORM = 1.0


# ---- water-filling ----------------------------------------------------------------------


def water_fill(sizes: Sequence[int], budget: int) -> list[int]:
    """Rows per group, S2L style: smallest group first, each `min(size, left // groups_left)`.

    Ties go to the lower index. The total is exactly `min(budget, sum(sizes))`: visiting
    groups in ascending size lets the last (largest) ones absorb every remainder.
    """
    quotas = [0] * len(sizes)
    left = min(max(budget, 0), sum(sizes))
    order = np.argsort(np.asarray(sizes, dtype=np.int64), kind="stable")
    for i, g in enumerate(order.tolist()):
        quotas[g] = min(sizes[g], left // (len(sizes) - i))
        left -= quotas[g]
    return quotas


def spread_over_clusters(sizes: Sequence[int], budget: int, small: int) -> tuple[list[int], int]:
    """Water-fill `budget` over clusters larger than `small`; return quotas and the leftover.

    The leftover (rows the big clusters could not supply) is to be drawn from the pooled
    clusters of at most `small` rows, whose quotas here are 0.
    """
    big = [g for g, size in enumerate(sizes) if size > small]
    quotas = [0] * len(sizes)
    for g, q in zip(big, water_fill([sizes[g] for g in big], budget), strict=True):
        quotas[g] = q
    leftover = min(budget, sum(sizes)) - sum(quotas)
    return quotas, leftover


def draw_from_clusters(
    labels: np.ndarray, budget: int, *, small: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of `min(budget, len(labels))` rows: spread over clusters, uniform inside each."""
    k = int(labels.max()) + 1 if len(labels) else 0
    members = [np.flatnonzero(labels == c) for c in range(k)]
    quotas, leftover = spread_over_clusters([len(m) for m in members], budget, small)
    picks = [
        rng.choice(m, size=q, replace=False) for m, q in zip(members, quotas, strict=True) if q
    ]
    if leftover:
        pool = np.concatenate([m for m in members if 0 < len(m) <= small])
        picks.append(rng.choice(pool, size=leftover, replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


# ---- examples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized training example: prompt tokens (masked) followed by response tokens."""

    #: int32 token ids (a compact array: pools can hold millions of tokens).
    input_ids: np.ndarray
    prompt_len: int


def conversation_parts(
    messages: Sequence[dict[str, Any]], *, where: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt turns, conversation up to and including the last assistant turn)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    if last < 0:
        raise ValueError(f"{where}: no assistant turn; S2L trains on the responses")
    full = [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]
    return full[:last], full


def tokenize_examples(
    tokenizer: Any,
    conversations: Sequence[tuple[list[dict[str, str]], list[dict[str, str]]]],
    ids: Sequence[str],
    *,
    max_length: int,
) -> tuple[list[Example], int]:
    """Render each (prompt turns, conversation) pair with the chat template and tokenize it.

    The prompt is the template applied to the prompt turns with the generation prompt; the
    response is the rest of the rendered conversation. When the pair exceeds `max_length`,
    the response keeps at least half of it and the prompt loses its beginning. Returns the
    examples and how many were truncated.
    """
    prompts: list[str] = []
    responses: list[str] = []
    for (prompt_turns, full), row_id in zip(conversations, ids, strict=True):
        prompt = tokenizer.apply_chat_template(
            prompt_turns, tokenize=False, add_generation_prompt=True
        )
        text = tokenizer.apply_chat_template(full, tokenize=False)
        if not text.startswith(prompt):
            raise ValueError(
                f"s2l: row id {row_id!r}: the model's chat template does not render the "
                "prompt as a prefix of the whole conversation, so prompt tokens cannot be masked"
            )
        prompts.append(prompt)
        responses.append(text[len(prompt) :])
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if prompts else []
    examples: list[Example] = []
    truncated = 0
    for p, r, row_id in zip(prompt_ids, response_ids, ids, strict=True):
        if not r:
            raise ValueError(f"s2l: row id {row_id!r}: the response renders to no tokens")
        if len(p) + len(r) > max_length:
            truncated += 1
            keep_r = min(len(r), max(max_length - len(p), max_length // 2))
            keep_p = max_length - keep_r
            p, r = p[len(p) - keep_p :], r[:keep_r]
        examples.append(Example(np.asarray(p + r, dtype=np.int32), len(p)))
    return examples, truncated


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels with prompt and padding masked."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        seq = torch.from_numpy(e.input_ids.astype(np.int64))
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        labels[row, e.prompt_len : len(seq)] = seq[e.prompt_len :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


#: Architectures whose LM head is a plain linear map of the backbone's last hidden state
#: (no logit scaling or soft-capping), so logits can be computed for response tokens only.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


def response_losses(
    model: Any, batch: dict[str, torch.Tensor], *, heads_on_responses: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of response-token cross-entropy, and the response-token counts.

    With `heads_on_responses` (default: for PLAIN_HEAD_MODELS) the LM head runs only on
    the positions that predict a response token, skipping the vocabulary-wide logits of
    the masked prompt; the result is the same as the full forward pass.
    """
    import torch

    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    if heads_on_responses is None:
        heads_on_responses = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
    if heads_on_responses:
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[:, :-1]
        logits = model.lm_head(hidden[keep]).float()
        ce = torch.zeros(target.shape, dtype=logits.dtype, device=logits.device)
        ce[keep] = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
    else:
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        ce = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].float().transpose(1, 2),
            target,
            ignore_index=IGNORE,
            reduction="none",
        )
    return ce.sum(dim=1), keep.sum(dim=1)


# ---- the proxy model --------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """A loaded proxy model with its tokenizer, where it runs, and how it was cut."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str
    path: str
    layers: int
    total_layers: int


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; other names are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("s2l: device 'cuda' was asked for but torch sees no GPU")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' → bfloat16 on a GPU that supports it, float32 otherwise."""
    import torch

    if dtype != "auto":
        return dtype
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report that lists the weights of cut layers as unexpected."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_proxy(model: str, *, layers: int | None, device: str, dtype: str) -> Proxy:
    """Load a causal LM (the bundled SmolLM2 by default), keeping its first `layers` layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    config = AutoConfig.from_pretrained(path)
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ValueError(f"s2l: model {model!r} has no num_hidden_layers in its config")
    if layers is not None:
        if layers > total:
            raise ValueError(f"s2l: layers={layers} but model {model!r} has only {total}")
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    with _quiet_transformers():
        lm: Any = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=getattr(torch, dtype)
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"s2l: model {model!r} has no chat template to render the examples")
    lm.to(device)
    return Proxy(lm, tokenizer, device, dtype, path, config.num_hidden_layers, total)


# ---- training and trajectories ----------------------------------------------------------


Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What determines the trajectories (and so enters their key)."""

    epochs: int
    lr: float
    #: Rows per optimizer step, run as `batch_size / micro_batch_size` accumulated passes.
    batch_size: int
    micro_batch_size: int
    warmup_ratio: float
    schedule: Schedule
    weight_decay: float
    checkpoints: int
    seed: int

    def steps_per_epoch(self, rows: int) -> int:
        """Optimizer steps in one pass over `rows` examples (the last batch may be short)."""
        return math.ceil(rows / self.batch_size)

    def warmup_steps(self, total_steps: int) -> int:
        """Linear warm-up length, rounded up as Hugging Face's Trainer does."""
        return math.ceil(self.warmup_ratio * total_steps)

    def describe(self, total_steps: int) -> dict[str, Any]:
        """The schedule as recorded in the trajectories' sidecar."""
        return {
            "name": self.schedule,
            "lr": self.lr,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps(total_steps),
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "total_steps": total_steps,
            "optimizer": "AdamW",
            "max_grad_norm": MAX_GRAD_NORM,
        }


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Schedule) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Linear warm-up from 0 over `warmup_steps`, then constant or a half cosine down to 0 at
    `total_steps`: the same curve as transformers' `get_cosine_schedule_with_warmup`
    (which the reference's Trainer uses), so the first step of a warm-up runs at lr 0.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainResult:
    """The N×T loss matrix and what training cost."""

    losses: np.ndarray
    steps: list[int]
    total_steps: int
    train_seconds: float
    eval_seconds: float
    train_tokens: int


def checkpoint_steps(total_steps: int, checkpoints: int) -> list[int]:
    """`checkpoints` optimizer steps evenly spread over training, the last one at the end."""
    if total_steps < checkpoints:
        raise ValueError(
            f"s2l: {checkpoints} checkpoints need at least as many optimizer steps, but "
            f"training has {total_steps} (raise epochs, lower batch_size or checkpoints)"
        )
    return [((t + 1) * total_steps + checkpoints // 2) // checkpoints for t in range(checkpoints)]


def evaluate_losses(
    proxy: Proxy, examples: Sequence[Example], batch_size: int, *, progress: bool
) -> np.ndarray:
    """Mean response-token loss of every example, batched by length (no gradients)."""
    import torch

    pad = _pad_id(proxy.tokenizer)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = np.zeros(len(examples), dtype=np.float64)
    proxy.model.eval()
    with torch.no_grad():
        for start in tqdm(
            range(0, len(order), batch_size), desc="s2l losses", leave=False, disable=not progress
        ):
            rows = order[start : start + batch_size]
            batch = _to(collate([examples[i] for i in rows], pad), proxy.device)
            sums, counts = response_losses(proxy.model, batch)
            out[rows] = (sums / counts).double().cpu().numpy()
    return out


def train_trajectories(
    proxy: Proxy, examples: Sequence[Example], settings: TrainSettings, *, progress: bool
) -> TrainResult:
    """Fine-tune the proxy on every example; record all losses at each checkpoint step."""
    import torch

    n = len(examples)
    total = settings.epochs * settings.steps_per_epoch(n)
    steps = checkpoint_steps(total, settings.checkpoints)
    warmup = settings.warmup_steps(total)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    pad = _pad_id(proxy.tokenizer)
    optimizer = torch.optim.AdamW(
        proxy.model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, settings.schedule)
    )
    losses = np.zeros((n, len(steps)), dtype=np.float64)
    train_seconds = eval_seconds = 0.0
    tokens = step = 0
    bar = tqdm(total=total, desc="s2l proxy training", disable=not progress)
    for _ in range(settings.epochs):
        order = rng.permutation(n)
        for start in range(0, n, settings.batch_size):
            began = time.perf_counter()
            proxy.model.train()
            rows = order[start : start + settings.batch_size]
            micro = [
                collate([examples[i] for i in rows[m : m + settings.micro_batch_size]], pad)
                for m in range(0, len(rows), settings.micro_batch_size)
            ]
            # the token mean over the whole batch, however it is split into micro-batches
            targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            loss_sum = 0.0
            for part in micro:
                batch = _to(part, proxy.device)
                sums, _ = response_losses(proxy.model, batch)
                (sums.sum() / targets).backward()
                loss_sum += float(sums.sum().detach())
                tokens += int(part["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(proxy.model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_seconds += time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / targets:.3f}")
            if step in steps:
                began = time.perf_counter()
                losses[:, steps.index(step)] = evaluate_losses(
                    proxy, examples, settings.micro_batch_size, progress=progress
                )
                eval_seconds += time.perf_counter() - began
    bar.close()
    return TrainResult(losses, steps, total, train_seconds, eval_seconds, tokens)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# ---- trajectory files -------------------------------------------------------------------


@dataclass(frozen=True)
class Trajectories:
    """Per-example loss trajectories (N×T, input order) and the training metadata."""

    ids: list[str]
    losses: np.ndarray
    meta: dict[str, Any]


def trajectory_paths(run_dir: Path, key: str) -> tuple[Path, Path]:
    """The Parquet file and its JSON sidecar for one trajectory key."""
    folder = run_dir / "s2l"
    return folder / f"trajectories-{key}.parquet", folder / f"trajectories-{key}.json"


def write_trajectories(
    run_dir: Path, key: str, ids: Sequence[str], sources: Sequence[str], traj: Trajectories
) -> Path:
    """Save the trajectories (Parquet) and then the sidecar, each atomically."""
    table, sidecar = trajectory_paths(run_dir, key)
    columns: dict[str, Any] = {"id": list(ids), "source": list(sources)}
    for t in range(traj.losses.shape[1]):
        columns[f"loss_{t}"] = traj.losses[:, t]
    with atomic_path(table) as tmp:
        pl.DataFrame(columns).write_parquet(tmp)
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(traj.meta, indent=2) + "\n")
    return table


def read_trajectories(run_dir: Path, key: str, ids: Sequence[str]) -> Trajectories | None:
    """Saved trajectories for `key` if complete and for exactly these ids, else None."""
    table, sidecar = trajectory_paths(run_dir, key)
    if not (table.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
        frame = pl.read_parquet(table)
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        log.warning("s2l: ignoring unreadable trajectories %s: %s", table, exc)
        return None
    cols = [f"loss_{t}" for t in range(int(meta.get("checkpoints", 0)))]
    if not cols or any(c not in frame.columns for c in cols):
        return None
    if frame.get_column("id").to_list() != list(ids):
        log.warning("s2l: %s was written for other rows; training again", table)
        return None
    return Trajectories(list(ids), frame.select(cols).to_numpy().astype(np.float64), meta)


# ---- the stage --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class S2LConfig(StageConfig):
    """S2L settings: budget, the proxy and its training, the clustering."""

    #: Rows to select: an int, or a float fraction of the input in (0, 1].
    budget: int | float = 0.1
    #: Proxy model: the bundled SmolLM2, a local HF folder or a hub id.
    model: str = DEFAULT_MODEL
    #: Keep only the first N decoder layers (None: all), to make CPU training practical.
    layers: int | None = None
    #: Training as the reference's proxy runs (configs/pythia-70m-deduped_checkpoints.yml):
    #: 3 epochs, lr 2e-5 with 3% linear warm-up then cosine decay, AdamW without weight
    #: decay, 32 rows per optimizer step (here in micro-batches of 8).
    epochs: int = 3
    lr: float = 2e-5
    #: Rows per optimizer step.
    batch_size: int = 32
    #: Rows per forward pass; gradients accumulate over `batch_size / micro_batch_size`.
    micro_batch_size: int = 8
    #: Fraction of all optimizer steps spent warming the lr up from 0 (rounded up).
    warmup_ratio: float = 0.03
    #: After warm-up: "cosine" decay to 0 at the last step, or "constant".
    schedule: Schedule = "cosine"
    weight_decay: float = 0.0
    #: Tokens per example (prompt + response); longer prompts lose their beginning.
    max_length: int = 512
    #: T: loss checkpoints spread evenly over all epochs of training (the last at the end).
    checkpoints: int = 12
    #: Clusters per source (capped by the source's rows).
    k: int = 100
    #: Clusters of at most this many rows only fill what the others cannot (reference: 2).
    small_cluster: int = 2
    #: k-means iterations (the reference uses faiss's default, 20).
    niter: int = 20
    #: Seed of training, k-means and sampling; None: derived from the run seed.
    seed: int | None = None
    #: Column whose values are spread over first; None treats the input as one source.
    source_field: str | None = "source"
    #: "auto" (cuda when available), "cpu" or "cuda".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16" or "float16".
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        where = "s2l config"
        check_budget(self.budget, where=where)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"{where}: model must be a non-empty string, got {self.model!r}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"{where}: layers must be >= 1 or null, got {self.layers}")
        for name in ("epochs", "batch_size", "micro_batch_size", "checkpoints", "k", "niter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"{where}: micro_batch_size ({self.micro_batch_size}) must be <= batch_size "
                f"({self.batch_size})"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{where}: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"{where}: schedule must be cosine or constant, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_length < 2:
            raise ValueError(f"{where}: max_length must be >= 2, got {self.max_length}")
        if not self.lr > 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr}")
        if self.small_cluster < 0:
            raise ValueError(f"{where}: small_cluster must be >= 0, got {self.small_cluster}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"{where}: device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"{where}: dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )


class S2LSelect(Select):
    """S2L: clusters of small-model loss trajectories, budget water-filled over sources and
    clusters."""

    name: ClassVar[str] = "s2l"
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "selector"
    citation: ClassVar[str | None] = (
        "Yang et al., 2024. SmallToLarge (S2L): Scalable Data Selection for Fine-tuning "
        "Large Language Models by Summarizing Training Trajectories of Small Models. "
        "arXiv:2403.07384"
    )
    Config: ClassVar[type[StageConfig]] = S2LConfig
    config: S2LConfig

    def requires(self) -> tuple[str, ...]:
        cols = ["id", "messages"]
        if self.config.source_field is not None:
            cols.append(self.config.source_field)
        return tuple(cols)

    def reads(self) -> tuple[str, ...]:
        """The ids, the conversations and the source field."""
        return self.requires()

    def produces(self) -> tuple[str, ...]:
        return ("cluster", "s2l_loss")

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Get (or reuse) the trajectories, cluster per source, water-fill, draw."""
        cfg = self.config
        n = data.height
        if n == 0:
            return data.with_columns(
                pl.lit(None, dtype=pl.Int64).alias("cluster"),
                pl.lit(None, dtype=pl.Float64).alias("s2l_loss"),
            )
        ids = [str(x) for x in data.get_column("id").to_list()]
        sources = self._sources(data)
        seed = cfg.seed if cfg.seed is not None else ctx.derive_seed("s2l")
        traj, reused = self._trajectories(data, ids, sources, seed, ctx)
        budget = resolve_budget(cfg.budget, n)

        names = sorted(set(sources))
        source_arr = np.asarray(sources, dtype=object)
        rows_of = [np.flatnonzero(source_arr == s) for s in names]
        quotas = water_fill([len(r) for r in rows_of], budget)
        rng = np.random.default_rng(seed)
        labels = np.zeros(n, dtype=np.int64)
        picks: list[np.ndarray] = []
        per_source: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, rows, quota in zip(names, rows_of, quotas, strict=True):
            k = min(cfg.k, len(rows))
            fit = train_kmeans(
                traj.losses[rows],
                k,
                niter=cfg.niter,
                nredo=1,
                seed=seed,
                max_points_per_centroid=None,
            )
            labels[rows] = fit.labels + offset
            offset += k
            picks.append(
                rows[draw_from_clusters(fit.labels, quota, small=cfg.small_cluster, rng=rng)]
            )
            per_source[name] = {
                "rows": len(rows),
                "quota": quota,
                "k": k,
                "cluster_sizes": np.bincount(fit.labels, minlength=k).tolist(),
            }
        chosen = np.sort(np.concatenate(picks))
        meta = traj.meta
        ctx.extra_stats.update(
            {
                "rows": n,
                "budget": budget,
                "seed": seed,
                "reused": reused,
                "trajectories": meta["file"],
                "N": n,
                "T": traj.losses.shape[1],
                "K": offset,
                "train_seconds": meta["train_seconds"],
                "train_tokens": meta["train_tokens"],
                "tokens_per_s": meta["tokens_per_s"],
                "mean_loss_per_checkpoint": meta["mean_loss_per_checkpoint"],
                "sources": per_source,
            }
        )
        out = data.with_columns(
            pl.Series("cluster", labels, dtype=pl.Int64),
            pl.Series("s2l_loss", traj.losses[:, -1], dtype=pl.Float64),
        )
        return out[chosen]

    def _sources(self, frame: pl.DataFrame) -> list[str]:
        field = self.config.source_field
        if field is None:
            return ["all"] * frame.height
        values = frame.get_column(field)
        nulls = values.is_null()
        if nulls.any():
            row = int(nulls.arg_true()[0])
            raise ValueError(
                f"stage 's2l': source field {field!r} is null in id "
                f"{frame.get_column('id')[row]!r}; fill it or set source_field: null"
            )
        return [str(v) for v in values.to_list()]

    def _trajectories(
        self,
        frame: pl.DataFrame,
        ids: list[str],
        sources: list[str],
        seed: int,
        ctx: StageContext,
    ) -> tuple[Trajectories, bool]:
        """Trajectories saved under the run for these rows and settings, else train anew."""
        cfg = self.config
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        settings = TrainSettings(
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            micro_batch_size=cfg.micro_batch_size,
            warmup_ratio=cfg.warmup_ratio,
            schedule=cfg.schedule,
            weight_decay=cfg.weight_decay,
            checkpoints=cfg.checkpoints,
            seed=seed,
        )
        ids_digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
        key = fingerprint(
            "s2l-trajectories",
            TRAJECTORY_VERSION,
            ids_digest,
            cfg.model,
            cfg.layers,
            cfg.max_length,
            settings,
            device,
            dtype,
        )
        saved = read_trajectories(ctx.run_dir, key, ids)
        if saved is not None:
            log.info(
                "s2l: reusing trajectories %s (trained in %.1fs), no training",
                saved.meta["file"],
                saved.meta["train_seconds"],
            )
            return saved, True
        conversations = [
            conversation_parts(messages, where=f"stage 's2l': row id {row_id!r}")
            for messages, row_id in zip(frame.get_column("messages").to_list(), ids, strict=True)
        ]
        proxy = load_proxy(cfg.model, layers=cfg.layers, device=device, dtype=dtype)
        examples, truncated = tokenize_examples(
            proxy.tokenizer, conversations, ids, max_length=cfg.max_length
        )
        result = train_trajectories(proxy, examples, settings, progress=ctx.show_progress)
        table, _ = trajectory_paths(ctx.run_dir, key)
        meta = {
            "key": key,
            "file": str(table),
            "rows": len(ids),
            "checkpoints": len(result.steps),
            "checkpoint_steps": result.steps,
            "total_steps": result.total_steps,
            "model": cfg.model,
            "model_path": proxy.path,
            "layers": proxy.layers,
            "total_layers": proxy.total_layers,
            "device": device,
            "dtype": dtype,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "schedule": settings.describe(result.total_steps),
            "max_length": cfg.max_length,
            "seed": seed,
            "truncated_rows": truncated,
            "train_seconds": round(result.train_seconds, 3),
            "eval_seconds": round(result.eval_seconds, 3),
            "train_tokens": result.train_tokens,
            "tokens_per_s": round(result.train_tokens / max(result.train_seconds, 1e-9), 1),
            "mean_loss_per_checkpoint": [float(x) for x in result.losses.mean(axis=0)],
        }
        traj = Trajectories(ids, result.losses, meta)
        write_trajectories(ctx.run_dir, key, ids, sources, traj)
        log.info(
            "s2l: trained the proxy (%d of %d layers) in %.1fs, %d tokens, %.0f tokens/s; "
            "trajectories in %s",
            proxy.layers,
            proxy.total_layers,
            result.train_seconds,
            result.train_tokens,
            meta["tokens_per_s"],
            table,
        )
        return traj, False
