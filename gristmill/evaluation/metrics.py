"""Held-out metrics of a checkpoint: per-token NLL of the reference answers given the prompts,
and greedy accuracy checked by the project's verifier (generated with the project's engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.evaluation.data import EvalSet
from gristmill.evaluation.train import answer_split


@dataclass(frozen=True, kw_only=True)
class NLL:
    """Mean negative log-likelihood per answer token (nats), over `tokens` answer tokens."""

    value: float
    tokens: int


@dataclass(frozen=True, kw_only=True)
class Accuracy:
    """Share of eval prompts whose greedy answer the verifier accepts."""

    value: float
    correct: int
    total: int
    #: Per eval row: id, the greedy answer, whether it passed, what the verifier extracted.
    answers: tuple[dict[str, Any], ...] = ()


def answer_nll(
    model_path: str | Path, evals: EvalSet, *, max_length: int, batch_size: int = 8
) -> NLL:
    """Token-weighted mean NLL of each reference answer given its prompt (answer tokens only,
    the tokens training puts loss on: the answer and its end-of-turn), in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int]] = []
    for prompt, answer in zip(
        evals.rows["prompt"].to_list(), evals.rows["answer"].to_list(), strict=True
    ):
        full, start = answer_split(tokenizer, prompt, [{"role": "assistant", "content": answer}])
        seqs.append((full[:max_length], start))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, (row, start) in enumerate(batch):
                ids[j, : len(row)] = torch.tensor(row)
                attn[j, : len(row)] = 1
                target[j, start : len(row)] = True
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            mask = target[:, 1:].to(device)
            total += float(-(picked * mask).sum())
            count += int(mask.sum())
    if count == 0:
        raise ValueError(f"{evals.path}: no answer token fits in max_length={max_length}")
    return NLL(value=total / count, tokens=count)


def greedy_accuracy(
    model_path: str | Path,
    evals: EvalSet,
    *,
    max_new_tokens: int,
    max_model_len: int,
    engine_options: dict[str, Any] | None = None,
) -> Accuracy:
    """Greedy answers from the project's vLLM engine on `model_path`, checked by the eval
    set's verifier. Starts (and closes) an engine: tens of seconds on CPU."""
    if evals.verifier is None:
        raise ValueError(f"{evals.path}: the eval set has no verifier, so no accuracy")
    from gristmill.engines.base import Sampling
    from gristmill.engines.factory import EngineSpec, build_engine
    from gristmill.verify import get_verifier
    from gristmill.verify.base import verify_many

    options = {"max_model_len": max_model_len, **(engine_options or {})}
    engine = build_engine(EngineSpec(model=str(model_path), options=options))
    try:
        prompts = [engine.chat_prompt(p) for p in evals.rows["prompt"].to_list()]
        sampling = Sampling(temperature=0.0, max_tokens=max_new_tokens, seed=0)
        texts = [c[0].text for c in engine.generate(prompts, sampling)]
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    verdicts = verify_many(
        get_verifier(evals.verifier),
        list(zip(texts, evals.rows["reference"].to_list(), strict=True)),
        workers=4,
    )
    correct = sum(v.correct for v in verdicts)
    answers = tuple(
        {"id": i, "answer": t, "correct": v.correct, "extracted": v.extracted, "reason": v.reason}
        for i, t, v in zip(evals.rows["id"].to_list(), texts, verdicts, strict=True)
    )
    return Accuracy(
        value=correct / len(verdicts), correct=correct, total=len(verdicts), answers=answers
    )
