"""Does a sampled answer agree with the response? The s_i of CLEAR's observed consistency.

BSDetector builds observed consistency on contradiction: two answers that name different
results must disagree, however alike their words. Three ways to judge it:

- `contradiction` (the default): where both texts state a final answer
  (`gristmill.verify.math`), the checker decides, 1 or 0. Otherwise the run's engine is
  asked whether the two answers agree and P(yes) over {yes, no} is read by teacher forcing,
  asked in both orders and averaged (small models favour whichever answer comes first).
- `nli`: 1 − P(contradiction) of an NLI cross-encoder, averaged over both directions.
- `embedding`: cosine of the run's embeddings, clipped to [0, 1]. Cheap, but "the answer
  is 5" and "the answer is 7" are close neighbours, so it cannot see a contradiction.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from gristmill.engines.base import Message
from gristmill.filters.options import option_probabilities
from gristmill.selectors.grape import LogprobEngine
from gristmill.verify.math import answers_equal, extract_answer

AgreementMode = Literal["contradiction", "nli", "embedding"]
AnswerMatch = Literal["off", "strict", "last_number"]

#: The engine's agreement question (our wording); the reply is one word.
AGREEMENT_PROMPT = (
    "Question:\n{question}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\n"
    "Do the two answers agree, giving the same final answer without contradicting each "
    "other? Reply with one word: yes or no."
)
AGREEMENT_OPTIONS = ("yes", "no")


def final_answer(text: str, mode: AnswerMatch) -> str | None:
    """The text's final answer as the checker reads it, or None (and always None when off)."""
    if mode == "off":
        return None
    return extract_answer(text, allow_last_number=mode == "last_number")


def checker_agreement(answer: str | None, sample: str | None) -> float | None:
    """1.0 or 0.0 when both final answers were extracted (the math checker compares them),
    None when either is missing and something else must judge."""
    if answer is None or sample is None:
        return None
    return float(answers_equal(sample, answer))


def agreement_prompt(question: str, first: str, second: str) -> list[Message]:
    """The one-turn conversation that asks whether two answers agree."""
    content = AGREEMENT_PROMPT.format(question=question, first=first, second=second)
    return [{"role": "user", "content": content}]


def engine_agreement(engine: LogprobEngine, items: Sequence[tuple[str, str, str]]) -> np.ndarray:
    """P(yes) per (question, answer, sample), the mean of both orders: one call for all."""
    if not items:
        return np.zeros(0)
    prompts = [agreement_prompt(q, a, s) for q, a, s in items]
    prompts += [agreement_prompt(q, s, a) for q, a, s in items]
    probs = option_probabilities(engine, prompts, AGREEMENT_OPTIONS)[:, 0]
    n = len(items)
    return np.asarray((probs[:n] + probs[n:]) / 2.0)


def contradiction_agreement(
    engine: LogprobEngine,
    questions: Sequence[str],
    answers: Sequence[str],
    samples: Sequence[Sequence[str]],
    mode: AnswerMatch,
) -> tuple[list[np.ndarray], int]:
    """s_i for every answer's samples: the checker where both extract, the engine elsewhere.

    Returns the per-answer arrays and how many pairs the engine judged (the rest the
    checker decided), so a run can say which did the work.
    """
    values: list[list[float | None]] = []
    asked: list[tuple[int, int]] = []
    items: list[tuple[str, str, str]] = []
    for a, (question, answer, group) in enumerate(zip(questions, answers, samples, strict=True)):
        target = final_answer(answer, mode)
        row: list[float | None] = []
        for i, sample in enumerate(group):
            verdict = checker_agreement(target, final_answer(sample, mode))
            if verdict is None:
                asked.append((a, i))
                items.append((question, answer, sample))
            row.append(verdict)
        values.append(row)
    for (a, i), p in zip(asked, engine_agreement(engine, items).tolist(), strict=True):
        values[a][i] = p
    return [np.array(row, dtype=np.float64) for row in values], len(items)


def embedding_agreement(
    vectors: np.ndarray, answer_rows: Sequence[int], sample_rows: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """Cosine between each answer's unit vector and its samples', clipped to [0, 1]."""
    return [
        np.clip(vectors[list(rows)] @ vectors[a], 0.0, 1.0)
        for a, rows in zip(answer_rows, sample_rows, strict=True)
    ]


class NliScorer:
    """A local or hub NLI cross-encoder (transformers sequence classification) that gives
    1 - P(contradiction) for text pairs, averaged over both directions."""

    def __init__(self, model: str, *, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_id = model
        self.batch_size = batch_size
        self._torch = torch
        self._tokenizer: Any = AutoTokenizer.from_pretrained(model)
        self._model: Any = AutoModelForSequenceClassification.from_pretrained(model)
        self._model.eval()
        labels = {int(k): str(v).lower() for k, v in self._model.config.id2label.items()}
        hits = [k for k, v in labels.items() if v.startswith("contradict")]
        if len(hits) != 1:
            raise ValueError(
                f"NLI model {model!r} must have one 'contradiction' label, has {labels}"
            )
        self.contradiction = hits[0]
        self._lock = threading.Lock()

    def contradiction_probs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """P(contradiction) of each (premise, hypothesis) pair."""
        out: list[np.ndarray] = []
        with self._lock, self._torch.no_grad():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                enc = self._tokenizer(
                    [p for p, _ in chunk],
                    [h for _, h in chunk],
                    padding=True,
                    truncation=True,
                    return_tensors="pt",
                )
                logits = self._model(**enc).logits.float()
                probs = self._torch.softmax(logits, dim=-1)[:, self.contradiction]
                out.append(probs.numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    def agreement(
        self, answers: Sequence[str], samples: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """s_i = 1 - (P(contra | answer, sample_i) + P(contra | sample_i, answer)) / 2."""
        pairs = [(a, s) for a, group in zip(answers, samples, strict=True) for s in group]
        forward = self.contradiction_probs(pairs)
        backward = self.contradiction_probs([(s, a) for a, s in pairs])
        agree = 1.0 - (forward + backward) / 2.0
        bounds = np.cumsum([0, *(len(g) for g in samples)])
        return [agree[bounds[i] : bounds[i + 1]] for i in range(len(samples))]


_NLI: dict[str, NliScorer] = {}
_NLI_LOCK = threading.Lock()


def get_nli(model: str) -> NliScorer:
    """One NLI scorer per model per process, loaded on first use."""
    with _NLI_LOCK:
        if model not in _NLI:
            _NLI[model] = NliScorer(model)
        return _NLI[model]
