"""The `clear` stage: a confidence score per (instruction, response), auto-filter, auto-correct.

After CLEAR (Chen & Mueller 2024, "Automated Data Curation for Robust Language Model
Fine-Tuning"), whose confidence estimate is BSDetector's (Chen & Mueller 2023,
"Quantifying Uncertainty in Answers from any Language Model"):

- Observed consistency O: the model samples `samples` answers to the prompt (temperature
  1.0); each sample i agrees with the given response by
  `o_i = α·s_i + (1-α)·r_i`, where s_i is semantic agreement (cosine of the run's
  embeddings, clipped to [0, 1]; or, with `nli_model`, 1 - P(contradiction) averaged over
  both directions) and r_i is 1 when the sample's extracted final answer equals the
  response's (`gristmill.verify.math`). When no answer can be extracted from the response,
  `o_i = s_i`. O is the mean over samples; α = 0.8.
- Self-reflection S: the model is asked whether the response is "(A) Correct (B) Incorrect
  (C) I am not sure" and the three replies are scored 1 / 0 / 0.5. We read the options'
  probabilities by teacher forcing (prompt log-probs of the reply "A", "B" and "C",
  normalised over the three) and take the expected score, instead of sampling a letter.
  BSDetector asks a second, "are you really sure" question after the first reply; we ask one.
- Confidence C = β·O + (1-β)·S with β = 0.7, written as `score__clear`, with O in
  `clear_observed` and S in `clear_reflection`.

Auto-correct (`auto_correct: true`): the model's own greedy answer gets a confidence the
same way (against the same samples). When it reaches `correct_new_min`, the original's is
below `correct_original_max`, and an LLM-judge comparison (both orders, to cancel position
bias; probabilities read as for S) prefers the new answer with probability at least
`correct_judge_min`, the response is replaced. A corrected record is a new record: its
`id` is recomputed from the new conversation, `parent_id` points to the original's id,
`model` names the engine's model, and the original is appended to the `history` column
(list of {id, response, reason, score}); `score__clear`, O and S are the new answer's.
`clear_judge` holds the judge's probability where one was asked.

Auto-filter, applied after correction: rows below `min_confidence` are dropped as
`low_confidence`; `drop_fraction` drops the lowest-confidence fraction of the rows as
`lowest_confidence` (ties: the later row goes first). This is a map stage (it streams and
resumes part by part, which matters for the most model-hungry filter), so the fraction is
taken within each part. For an exact fraction of the whole dataset, leave `drop_fraction`
unset and follow `clear` with the `topk` selector on `score__clear`.

Samples are seeded from the run seed and the rendered prompt, so rows that share a prompt
(candidates of one instruction) share their samples, and the output does not depend on how
rows are split into parts. Per batch, the model is called once per kind: one `generate`
call (samples and greedy answers), one prompt-log-probs call for the reflections, one for
the judge.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl

from gristmill.engines.base import Message, Messages, Sampling
from gristmill.pipelines.stage import LLMConfig, Map, MeteredEngine, StageConfig, StageContext
from gristmill.records import DROP_REASON, record_id, score_column
from gristmill.selectors.grape import LogprobEngine, score_responses, split_conversation
from gristmill.verify.math import answers_equal, extract_answer

SCORE = score_column("clear")
OBSERVED = "clear_observed"
REFLECTION = "clear_reflection"
JUDGE = "clear_judge"
HISTORY = "history"

HISTORY_TYPE = pl.List(
    pl.Struct(
        {"id": pl.String(), "response": pl.String(), "reason": pl.String(), "score": pl.Float64()}
    )
)

#: Self-reflection question (our wording of BSDetector's); the reply is one letter.
REFLECTION_PROMPT = (
    "Question:\n{question}\n\nProposed answer:\n{answer}\n\n"
    "Is the proposed answer:\n(A) Correct\n(B) Incorrect\n(C) I am not sure\n"
    "Reply with one letter: A, B or C."
)
#: Replies to the reflection question and their scores.
REFLECTION_OPTIONS: tuple[tuple[str, float], ...] = (("A", 1.0), ("B", 0.0), ("C", 0.5))

#: Pairwise judge question for auto-correct; the reply is "1" or "2".
JUDGE_PROMPT = (
    "Question:\n{question}\n\nResponse 1:\n{first}\n\nResponse 2:\n{second}\n\n"
    "Which response answers the question more correctly and helpfully? "
    "Reply with one digit: 1 or 2."
)

AnswerMatch = Literal["off", "strict", "last_number"]


# ---- pieces of the confidence -------------------------------------------------------------


def option_probabilities(
    engine: LogprobEngine, prompts: Sequence[Messages], options: Sequence[str]
) -> np.ndarray:
    """P(reply = option | prompt), normalised over `options`, by teacher forcing: one
    prompt-log-probs call for every (prompt, option) text. Shape (len(prompts), len(options))."""
    if not prompts:
        return np.zeros((0, len(options)))
    flat_prompts = [p for p in prompts for _ in options]
    flat_options = [o for _ in prompts for o in options]
    scored = score_responses(
        engine, flat_prompts, flat_options, normalize=False, batch_size=len(flat_options)
    )
    logp = np.array([s.score for s in scored]).reshape(len(prompts), len(options))
    logp -= logp.max(axis=1, keepdims=True)
    probs = np.exp(logp)
    return np.asarray(probs / probs.sum(axis=1, keepdims=True))


def reflection_prompt(question: str, answer: str) -> list[Message]:
    """The one-turn conversation that asks the model to judge `answer`."""
    return [{"role": "user", "content": REFLECTION_PROMPT.format(question=question, answer=answer)}]


def reflection_scores(
    engine: LogprobEngine, questions: Sequence[str], answers: Sequence[str]
) -> np.ndarray:
    """Self-reflection certainty S per answer: the expected score of the model's reply."""
    prompts = [reflection_prompt(q, a) for q, a in zip(questions, answers, strict=True)]
    probs = option_probabilities(engine, prompts, [o for o, _ in REFLECTION_OPTIONS])
    return np.asarray(probs @ np.array([s for _, s in REFLECTION_OPTIONS]))


def answer_matches(answer: str, samples: Sequence[str], mode: AnswerMatch) -> np.ndarray | None:
    """r_i per sample (1.0 when its final answer equals `answer`'s), or None when `answer`
    states no extractable answer (or matching is off)."""
    if mode == "off":
        return None
    last = mode == "last_number"
    target = extract_answer(answer, allow_last_number=last)
    if target is None:
        return None
    found = [extract_answer(s, allow_last_number=last) for s in samples]
    return np.array([float(a is not None and answers_equal(a, target)) for a in found])


def observed_consistency(semantic: np.ndarray, matches: np.ndarray | None, alpha: float) -> float:
    """O = mean_i of α·s_i + (1-α)·r_i (just s_i where no answer could be matched)."""
    if len(semantic) == 0:
        return 0.0
    per_sample = semantic if matches is None else alpha * semantic + (1 - alpha) * matches
    return float(np.mean(per_sample))


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


def question_text(before: Sequence[Message]) -> str:
    """The prompt as the reflection and judge questions show it: the user's text for a
    single user turn, else every turn as "role: content" blocks."""
    if len(before) == 1 and before[0]["role"] == "user":
        return before[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in before)


# ---- the stage ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClearConfig(LLMConfig):
    """BSDetector's constants, sampling, the auto-filter and the auto-correct thresholds."""

    #: Sampled answers per prompt for observed consistency (k).
    samples: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    #: Longest sampled (and greedy) answer, in tokens.
    max_tokens: int = 512
    #: Weight of semantic agreement against exact answer match inside O.
    alpha: float = 0.8
    #: Weight of observed consistency O against self-reflection S.
    beta: float = 0.7
    #: Final-answer matching: "strict" (boxed, ####, "the answer is"), "last_number" (also
    #: the last number in the text: math word problems), or "off".
    answer_match: AnswerMatch = "strict"
    #: An NLI model (local folder or hub id, transformers sequence classification with a
    #: "contradiction" label) for semantic agreement; None: embedding cosine.
    nli_model: str | None = None
    #: Drop rows whose confidence is below this.
    min_confidence: float | None = None
    #: Drop this lowest-confidence fraction of each part's rows.
    drop_fraction: float | None = None
    #: Replace low-confidence responses by the model's own, judged better, answer.
    auto_correct: bool = False
    correct_new_min: float = 0.8
    correct_original_max: float = 0.5
    correct_judge_min: float = 0.7

    def __post_init__(self) -> None:
        where = "clear config"
        if self.samples < 1:
            raise ValueError(f"{where}: samples must be >= 1, got {self.samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{where}: need temperature >= 0 and top_p in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("alpha", "beta", "correct_new_min", "correct_original_max"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{where}: {name} must be in [0, 1], got {value}")
        if not 0 <= self.correct_judge_min <= 1:
            raise ValueError(f"{where}: correct_judge_min must be in [0, 1]")
        if self.answer_match not in ("off", "strict", "last_number"):
            raise ValueError(
                f"{where}: answer_match must be 'off', 'strict' or 'last_number', "
                f"got {self.answer_match!r}"
            )
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ValueError(f"{where}: min_confidence must be in [0, 1] or null")
        if self.drop_fraction is not None and not 0 < self.drop_fraction < 1:
            raise ValueError(f"{where}: drop_fraction must be in (0, 1) or null")


@dataclass(frozen=True)
class _Row:
    """One scorable row: its position in the batch, prompt turns and response."""

    index: int
    before: list[Message]
    response: str
    prompt_text: str


def lowest_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the round-half-up `fraction·n` lowest scores (ties: later rows first)."""
    n = len(scores)
    count = min(n, int(np.floor(fraction * n + 0.5)))
    order = np.lexsort((-np.arange(n), scores))
    return np.sort(order[:count])


class Clear(Map):
    """CLEAR/BSDetector confidence (`score__clear`), then optional auto-correct and auto-filter."""

    name: ClassVar[str] = "clear"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "filter"
    citation: ClassVar[str | None] = (
        "Chen and Mueller, 2024. Automated Data Curation for Robust Language Model "
        "Fine-Tuning (CLEAR). arXiv:2403.12776; Chen and Mueller, 2023. Quantifying "
        "Uncertainty in Answers from any Language Model (BSDetector). arXiv:2308.16175"
    )
    Config: ClassVar[type[StageConfig]] = ClearConfig
    uses_engine: ClassVar[bool] = True
    uses_embedder: ClassVar[bool] = True
    config: ClearConfig

    def requires(self) -> tuple[str, ...]:
        return ("id", "messages")

    def produces(self) -> tuple[str, ...]:
        cols = (SCORE, OBSERVED, REFLECTION)
        return (*cols, JUDGE, HISTORY) if self.config.auto_correct else cols

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Score every row with a response; correct and drop as configured."""
        cfg = self.config
        engine = ctx.engine()
        rows: list[_Row] = []
        for i, messages in enumerate(batch.get_column("messages").to_list()):
            split = split_conversation(messages)
            if split is not None:
                before, response = split
                prompt = engine.chat_prompt(before, add_generation_prompt=True)
                rows.append(_Row(i, before, response, prompt))
        samples, greedy = self._sample(engine, rows, ctx)
        questions = [question_text(r.before) for r in rows]
        # the greedy answers that could replace a response, scored in the same calls
        tried = [
            k
            for k, r in enumerate(rows)
            if cfg.auto_correct and greedy[k] and _norm(greedy[k]) != _norm(r.response)
        ]
        conf, observed, reflection = self._confidence(
            engine,
            ctx,
            questions + [questions[k] for k in tried],
            [r.response for r in rows] + [greedy[k] for k in tried],
            samples + [samples[k] for k in tried],
        )
        m = len(rows)
        scores = _Scores(conf[:m].copy(), observed[:m].copy(), reflection[:m].copy())
        out = batch
        judged = np.full(m, np.nan)
        corrected = 0
        if cfg.auto_correct:
            new = _Scores(conf[m:], observed[m:], reflection[m:])
            out, judged, corrected = self._correct(
                batch, engine, rows, questions, tried, greedy, scores, new
            )
        n = batch.height
        out = out.with_columns(
            _scatter(SCORE, n, rows, scores.confidence),
            _scatter(OBSERVED, n, rows, scores.observed),
            _scatter(REFLECTION, n, rows, scores.reflection),
        )
        if cfg.auto_correct:
            out = out.with_columns(_scatter(JUDGE, n, rows, judged))
        reasons = self._drop_reasons(n, rows, scores.confidence)
        ctx.extra_stats.update(
            {
                "rows": n,
                "scored": m,
                "mean_confidence": float(np.mean(scores.confidence)) if m else None,
                "low_confidence": reasons.count("low_confidence"),
                "lowest_confidence": reasons.count("lowest_confidence"),
                "judged": int(np.isfinite(judged).sum()),
                "corrected": corrected,
            }
        )
        return out.with_columns(pl.Series(DROP_REASON, reasons, dtype=pl.String))

    def _drop_reasons(self, n: int, rows: list[_Row], confidence: np.ndarray) -> list[str | None]:
        """no_response, then low_confidence (threshold), then lowest_confidence (fraction)."""
        cfg = self.config
        reasons: list[str | None] = ["no_response"] * n
        for r in rows:
            reasons[r.index] = None
        if cfg.min_confidence is not None:
            for r, c in zip(rows, confidence, strict=True):
                if c < cfg.min_confidence:
                    reasons[r.index] = "low_confidence"
        if cfg.drop_fraction is not None and rows:
            for k in lowest_fraction(confidence, cfg.drop_fraction):
                if reasons[rows[k].index] is None:
                    reasons[rows[k].index] = "lowest_confidence"
        return reasons

    # ---- model calls ---------------------------------------------------------------------
    def _sample(
        self, engine: MeteredEngine, rows: list[_Row], ctx: StageContext
    ) -> tuple[list[list[str]], list[str]]:
        """One generate call: k samples (and a greedy answer) per distinct prompt."""
        cfg = self.config
        prompts = list(dict.fromkeys(r.prompt_text for r in rows))
        sampled = [
            Sampling(
                n=cfg.samples,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_tokens,
                seed=ctx.derive_seed("samples", p),
            )
            for p in prompts
        ]
        greedy = [Sampling(temperature=0.0, max_tokens=cfg.max_tokens)] * len(prompts)
        texts = prompts + prompts if cfg.auto_correct else prompts
        done = engine.generate(texts, sampled + greedy if cfg.auto_correct else sampled)
        by_prompt = {p: [c.text for c in done[k]] for k, p in enumerate(prompts)}
        best = {
            p: done[len(prompts) + k][0].text.strip()
            for k, p in enumerate(prompts)
            if cfg.auto_correct
        }
        return (
            [by_prompt[r.prompt_text] for r in rows],
            [best.get(r.prompt_text, "") for r in rows],
        )

    def _confidence(
        self,
        engine: MeteredEngine,
        ctx: StageContext,
        questions: list[str],
        answers: list[str],
        samples: list[list[str]],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(C, O, S) per answer: one embedding (or NLI) pass and one reflection call."""
        cfg = self.config
        observed = self._observed(ctx, answers, samples)
        reflection = reflection_scores(engine, questions, answers)
        return cfg.beta * observed + (1 - cfg.beta) * reflection, observed, reflection

    def _observed(
        self, ctx: StageContext, answers: Sequence[str], samples: Sequence[Sequence[str]]
    ) -> np.ndarray:
        """O per answer against its samples."""
        cfg = self.config
        if not answers:
            return np.zeros(0)
        if cfg.nli_model is not None:
            semantic = get_nli(cfg.nli_model).agreement(answers, samples)
        else:
            texts = list(dict.fromkeys([*answers, *(s for group in samples for s in group)]))
            position = {t: k for k, t in enumerate(texts)}
            vectors = ctx.embedder().embed(texts)
            semantic = embedding_agreement(
                vectors,
                [position[a] for a in answers],
                [[position[s] for s in group] for group in samples],
            )
        return np.array(
            [
                observed_consistency(s, answer_matches(a, group, cfg.answer_match), cfg.alpha)
                for a, group, s in zip(answers, samples, semantic, strict=True)
            ]
        )

    def _correct(
        self,
        batch: pl.DataFrame,
        engine: MeteredEngine,
        rows: list[_Row],
        questions: list[str],
        tried: list[int],
        greedy: list[str],
        scores: _Scores,
        new: _Scores,
    ) -> tuple[pl.DataFrame, np.ndarray, int]:
        """Ask the judge where the greedy answer is confident and the original is not;
        replace the responses it prefers. Updates `scores` in place for corrected rows;
        returns the new batch, the judge's P(new answer is better) (NaN: not asked) and
        how many rows were corrected."""
        cfg = self.config
        judged = np.full(len(rows), np.nan)
        eligible = [
            (k, j)
            for j, k in enumerate(tried)
            if new.confidence[j] >= cfg.correct_new_min
            and scores.confidence[k] < cfg.correct_original_max
        ]
        prompts: list[Messages] = []
        for k, _ in eligible:
            q, old, cand = questions[k], rows[k].response, greedy[k]
            prompts.append(judge_prompt(q, old, cand))
            prompts.append(judge_prompt(q, cand, old))
        probs = option_probabilities(engine, prompts, ["1", "2"])
        for e, (k, _) in enumerate(eligible):
            judged[k] = (probs[2 * e, 1] + probs[2 * e + 1, 0]) / 2.0
        chosen = [(k, j) for k, j in eligible if judged[k] >= cfg.correct_judge_min]
        out = self._replace(batch, engine, rows, greedy, chosen, scores, new)
        return out, judged, len(chosen)

    def _replace(
        self,
        batch: pl.DataFrame,
        engine: MeteredEngine,
        rows: list[_Row],
        greedy: list[str],
        chosen: list[tuple[int, int]],
        scores: _Scores,
        new: _Scores,
    ) -> pl.DataFrame:
        """The batch with the chosen responses replaced, lineage and history kept."""
        n = batch.height
        history = _history(batch)
        columns = {
            name: batch.get_column(name).to_list()
            for name in ("id", "messages", "response", "parent_id", "model")
            if name in batch.columns
        }
        references = (
            batch.get_column("reference").to_list() if "reference" in batch.columns else [None] * n
        )
        for k, j in chosen:
            r = rows[k]
            i = r.index
            old_id = columns["id"][i]
            messages = [*r.before, {"role": "assistant", "content": greedy[k]}]
            history[i] = [
                *history[i],
                {
                    "id": old_id,
                    "response": r.response,
                    "reason": "clear_auto_correct",
                    "score": float(scores.confidence[k]),
                },
            ]
            columns["messages"][i] = messages
            columns["id"][i] = record_id(messages, references[i])
            if "response" in columns:
                columns["response"][i] = greedy[k]
            if "parent_id" in columns:
                columns["parent_id"][i] = old_id
            if "model" in columns:
                columns["model"][i] = engine.model_id
            scores.confidence[k] = new.confidence[j]
            scores.observed[k] = new.observed[j]
            scores.reflection[k] = new.reflection[j]
        return batch.with_columns(
            *(
                pl.Series(name, values, dtype=batch.schema[name])
                for name, values in columns.items()
            ),
            pl.Series(HISTORY, history, dtype=HISTORY_TYPE),
        )


@dataclass(frozen=True)
class _Scores:
    """C, O and S of a list of answers (arrays, mutable in place)."""

    confidence: np.ndarray
    observed: np.ndarray
    reflection: np.ndarray


def judge_prompt(question: str, first: str, second: str) -> list[Message]:
    """The one-turn conversation that asks which of two responses is better."""
    content = JUDGE_PROMPT.format(question=question, first=first, second=second)
    return [{"role": "user", "content": content}]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _history(batch: pl.DataFrame) -> list[list[dict[str, Any]]]:
    """The rows' existing history lists (empty where there is none)."""
    if HISTORY not in batch.columns:
        return [[] for _ in range(batch.height)]
    column = batch.get_column(HISTORY)
    if column.dtype != HISTORY_TYPE:
        raise ValueError(
            f"stage 'clear': input column {HISTORY!r} has type {column.dtype}, "
            f"expected {HISTORY_TYPE}"
        )
    return [list(h) if h is not None else [] for h in column.to_list()]


def _scatter(name: str, n: int, rows: Sequence[_Row], values: np.ndarray) -> pl.Series:
    """A float column of length n with `values` at the rows' positions, null elsewhere
    (and where a value is NaN)."""
    full: list[float | None] = [None] * n
    for r, v in zip(rows, values.tolist(), strict=True):
        full[r.index] = None if math.isnan(v) else v
    return pl.Series(name, full, dtype=pl.Float64)
