"""The `clear` stage: a confidence score per (instruction, response), auto-filter, auto-correct.

After CLEAR (Chen & Mueller 2024, "Automated Data Curation for Robust Language Model
Fine-Tuning"), whose confidence estimate is BSDetector's (Chen & Mueller 2023,
"Quantifying Uncertainty in Answers from any Language Model"):

- Observed consistency O: the model samples `samples` answers to the prompt (temperature
  1.0); each sample i agrees with the given response by `o_i = α·s_i + (1-α)·r_i`, O is
  the mean over samples, α = 0.8. s_i is agreement judged with contradiction in mind
  (`gristmill.filters.agreement`): the math checker where both state a final answer,
  else the run's engine asked whether the two agree (P(yes), both orders); an NLI model or
  embedding cosine on request. r_i is BSDetector's indicator: 1 when the sample's final
  answer equals the response's (`gristmill.verify.math`), or, when the response states
  none, when the two texts are the same; so O stays on BSDetector's scale for free text.
- Self-reflection S: the model is asked whether the response is "(A) Correct (B) Incorrect
  (C) I am not sure" and the three replies are scored 1 / 0 / 0.5. We read the options'
  probabilities by teacher forcing (prompt log-probs of the reply "A", "B" and "C",
  normalised over the three) and take the expected score, instead of sampling a letter.
  BSDetector asks a second, "are you really sure" question after the first reply; we ask one.
- Confidence C = β·O + (1-β)·S with β = 0.7, written as `score__clear`, with O in
  `clear_observed` and S in `clear_reflection`.

Auto-correct (`auto_correct: true`): a candidate answer gets a confidence with the same
measure (C = βO + (1-β)S, O against the samples; a sample that is the candidate is left
out of its own O). When it reaches `correct_new_min`, the current response's is below
`correct_original_max`, and an LLM-judge comparison (both orders, to cancel position bias;
probabilities read as for S) prefers the candidate with probability at least
`correct_judge_min`, the response is replaced. Candidates, one per row and round: the
model's greedy answer first, then its samples, most agreed-upon final answer first. Rounds
repeat, up to `correct_rounds`, for the rows still below `correct_original_max` that have
a candidate left, so they stop once nothing more can change. A corrected record is a new record: its
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
rows are split into parts. Per batch and round, the model is called once per kind: one
`generate` call (samples and greedy answers, first round only), one prompt-log-probs call
for the agreement questions (where the checker could not decide), one for the
reflections, one for the judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from gristmill.engines.base import Message, Messages, Sampling
from gristmill.filters.agreement import (
    AgreementMode,
    AnswerMatch,
    checker_agreement,
    contradiction_agreement,
    embedding_agreement,
    final_answer,
    get_nli,
)
from gristmill.filters.options import option_probabilities
from gristmill.pipelines.stage import LLMConfig, Map, MeteredEngine, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, first, per_round, summed
from gristmill.records import DROP_REASON, record_id, score_column
from gristmill.selectors.grape import LogprobEngine, split_conversation

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


# ---- pieces of the confidence -------------------------------------------------------------


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


def answer_matches(answer: str, samples: Sequence[str], mode: AnswerMatch) -> np.ndarray:
    """BSDetector's r_i per sample: 1.0 when its final answer equals `answer`'s; when
    `answer` states none (or matching is off), 1.0 only for the same text."""
    target = final_answer(answer, mode)
    if target is None:
        same = _norm(answer)
        return np.array([float(_norm(s) == same) for s in samples])
    return np.array([checker_agreement(target, final_answer(s, mode)) or 0.0 for s in samples])


def observed_consistency(semantic: np.ndarray, matches: np.ndarray, alpha: float) -> float:
    """O = mean_i of α·s_i + (1-α)·r_i."""
    if len(semantic) == 0:
        return 0.0
    return float(np.mean(alpha * semantic + (1 - alpha) * matches))


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
    #: How s_i is judged: "contradiction" (the checker where both answers extract, else
    #: the engine's yes/no), "nli" (needs `nli_model`) or "embedding" (cosine). The checker
    #: compares final answers only, so an off-topic answer with an unmatched number scores
    #: like a wrong number; cosine sees topicality (bench/README.md, `--wrong swapped`).
    agreement: AgreementMode = "contradiction"
    #: An NLI model (local folder or hub id, transformers sequence classification with a
    #: "contradiction" label), for `agreement: nli`.
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
    #: Most auto-correct rounds (each tries one more candidate for rows still unsure).
    correct_rounds: int = 1

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
        if self.agreement not in ("contradiction", "nli", "embedding"):
            raise ValueError(
                f"{where}: agreement must be 'contradiction', 'nli' or 'embedding', "
                f"got {self.agreement!r}"
            )
        if (self.agreement == "nli") != (self.nli_model is not None):
            raise ValueError(
                f"{where}: agreement 'nli' and nli_model go together "
                f"(agreement={self.agreement!r}, nli_model={self.nli_model!r})"
            )
        if self.correct_rounds < 1:
            raise ValueError(f"{where}: correct_rounds must be >= 1, got {self.correct_rounds}")
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


@dataclass(frozen=True, kw_only=True)
class ClearStats(ExtraStats):
    """Rows scored, dropped and corrected (summed over parts); the mean confidence follows."""

    rows: int = summed()
    scored: int = summed()
    confidence_sum: float = summed(0.0)
    low_confidence: int = summed()
    lowest_confidence: int = summed()
    #: How sample agreement was judged (the config's; the same in every part).
    agreement: str | None = first()
    agreement_pairs: int = summed()
    agreement_by_checker: int = summed()
    agreement_by_engine: int = summed()
    judged: int = summed()
    corrected: int = summed()
    #: Rows each auto-correct round replaced.
    corrected_per_round: tuple[int, ...] = per_round()

    def derived(self) -> dict[str, Any]:
        """The mean confidence over the scored rows (None: none scored)."""
        return {"mean_confidence": self.confidence_sum / self.scored if self.scored else None}


class Clear(Map):
    """CLEAR/BSDetector confidence (`score__clear`), then optional auto-correct and auto-filter."""

    name: ClassVar[str] = "clear"
    needs_completions: ClassVar[str | None] = (
        "reads its self-reflection from prompt log-probabilities"
    )
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "filter"
    citation: ClassVar[str | None] = (
        "Chen and Mueller, 2024. Automated Data Curation for Robust Language Model "
        "Fine-Tuning (CLEAR). arXiv:2403.12776; Chen and Mueller, 2023. Quantifying "
        "Uncertainty in Answers from any Language Model (BSDetector). arXiv:2308.16175"
    )
    Config: ClassVar[type[StageConfig]] = ClearConfig
    Stats: ClassVar[type[ExtraStats] | None] = ClearStats
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
        tally = _Tally()
        queues = (
            [self._candidates(r.response, greedy[k], samples[k]) for k, r in enumerate(rows)]
            if cfg.auto_correct
            else []
        )
        # the first candidates are scored with the responses, in the same calls
        first = [k for k, queue in enumerate(queues) if queue]
        conf, observed, reflection = self._confidence(
            engine,
            ctx,
            questions + [questions[k] for k in first],
            [r.response for r in rows] + [queues[k][0].text for k in first],
            samples + [queues[k][0].against(samples[k]) for k in first],
            tally,
        )
        m = len(rows)
        scores = _Scores(conf[:m].copy(), observed[:m].copy(), reflection[:m].copy())
        out = batch
        judged = np.full(m, np.nan)
        per_round: list[int] = []
        if cfg.auto_correct:
            ready = _Scores(conf[m:], observed[m:], reflection[m:])
            out, judged, per_round = self._correct(
                batch, engine, ctx, rows, questions, samples, queues, scores, (first, ready), tally
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
        stats = ClearStats(
            rows=n,
            scored=m,
            confidence_sum=float(np.sum(scores.confidence)),
            low_confidence=reasons.count("low_confidence"),
            lowest_confidence=reasons.count("lowest_confidence"),
            agreement=cfg.agreement,
            agreement_pairs=tally.pairs,
            agreement_by_checker=tally.by_checker,
            agreement_by_engine=tally.by_engine,
            judged=int(np.isfinite(judged).sum()),
            corrected=sum(per_round),
            corrected_per_round=tuple(per_round),
        )
        ctx.extra_stats.update(stats.to_dict())
        return out.with_columns(pl.Series(DROP_REASON, reasons, dtype=pl.String))

    def _candidates(self, response: str, greedy: str, samples: Sequence[str]) -> list[_Candidate]:
        """What may replace `response`, in the order tried: the greedy answer, then the
        samples whose final answer most samples share (ties: sample order); no text twice,
        never the response itself."""
        mode = self.config.answer_match
        seen = {_norm(response)}
        out: list[_Candidate] = []
        if greedy and _norm(greedy) not in seen:
            out.append(_Candidate(greedy, None))
            seen.add(_norm(greedy))
        answers = [final_answer(s, mode) for s in samples]
        votes: dict[str, int] = {}
        for a in answers:
            if a is not None:
                votes[_norm(a)] = votes.get(_norm(a), 0) + 1

        def rank(i: int) -> tuple[int, int]:
            found = answers[i]
            return (-votes[_norm(found)] if found is not None else 0, i)

        order = sorted(range(len(samples)), key=rank)
        for i in order:
            text = samples[i].strip()
            if text and _norm(text) not in seen:
                out.append(_Candidate(text, i))
                seen.add(_norm(text))
        return out

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
        tally: _Tally,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(C, O, S) per answer: one agreement pass and one reflection call."""
        cfg = self.config
        observed = self._observed(engine, ctx, questions, answers, samples, tally)
        reflection = reflection_scores(engine, questions, answers)
        return cfg.beta * observed + (1 - cfg.beta) * reflection, observed, reflection

    def _observed(
        self,
        engine: MeteredEngine,
        ctx: StageContext,
        questions: Sequence[str],
        answers: Sequence[str],
        samples: Sequence[Sequence[str]],
        tally: _Tally,
    ) -> np.ndarray:
        """O per answer against its samples."""
        cfg = self.config
        if not answers:
            return np.zeros(0)
        pairs = sum(len(group) for group in samples)
        tally.pairs += pairs
        if cfg.agreement == "contradiction":
            semantic, asked = contradiction_agreement(
                engine, questions, answers, samples, cfg.answer_match
            )
            tally.by_engine += asked
            tally.by_checker += pairs - asked
        elif cfg.agreement == "nli":
            assert cfg.nli_model is not None  # checked by the config
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
        ctx: StageContext,
        rows: list[_Row],
        questions: list[str],
        samples: list[list[str]],
        queues: list[list[_Candidate]],
        scores: _Scores,
        first: tuple[list[int], _Scores],
        tally: _Tally,
    ) -> tuple[pl.DataFrame, np.ndarray, list[int]]:
        """Rounds of: the next candidate of every row still below `correct_original_max`,
        scored with the same confidence; the judge asked where that reaches
        `correct_new_min`; the preferred ones swapped in. Stops when no row is left to try
        (each row's outcome depends only on that row, so not on how rows form parts).
        Updates `scores` in place; returns the new batch, the judge's last P(candidate is
        better) per row (NaN: never asked) and how many rows each round corrected."""
        cfg = self.config
        judged = np.full(len(rows), np.nan)
        responses = [r.response for r in rows]
        tried = [0] * len(rows)
        out = batch
        per_round: list[int] = []
        for round_no in range(cfg.correct_rounds):
            todo = [
                k
                for k in range(len(rows))
                if scores.confidence[k] < cfg.correct_original_max and tried[k] < len(queues[k])
            ]
            if not todo:
                break
            candidates = [queues[k][tried[k]] for k in todo]
            if round_no == 0:  # scored with the responses already
                where = {k: j for j, k in enumerate(first[0])}
                picked = [where[k] for k in todo]
                new = _Scores(
                    first[1].confidence[picked],
                    first[1].observed[picked],
                    first[1].reflection[picked],
                )
            else:
                new = _Scores(
                    *self._confidence(
                        engine,
                        ctx,
                        [questions[k] for k in todo],
                        [c.text for c in candidates],
                        [c.against(samples[k]) for k, c in zip(todo, candidates, strict=True)],
                        tally,
                    )
                )
            for k in todo:
                tried[k] += 1
            eligible = [j for j in range(len(todo)) if new.confidence[j] >= cfg.correct_new_min]
            prompts: list[Messages] = []
            for j in eligible:
                q, old, cand = questions[todo[j]], responses[todo[j]], candidates[j].text
                prompts.append(judge_prompt(q, old, cand))
                prompts.append(judge_prompt(q, cand, old))
            probs = option_probabilities(engine, prompts, ["1", "2"])
            chosen: list[tuple[int, int]] = []
            for e, j in enumerate(eligible):
                k = todo[j]
                judged[k] = (probs[2 * e, 1] + probs[2 * e + 1, 0]) / 2.0
                if judged[k] >= cfg.correct_judge_min:
                    chosen.append((k, j))
            out = self._replace(out, engine, rows, responses, candidates, chosen, scores, new)
            per_round.append(len(chosen))
        return out, judged, per_round

    def _replace(
        self,
        batch: pl.DataFrame,
        engine: MeteredEngine,
        rows: list[_Row],
        responses: list[str],
        candidates: list[_Candidate],
        chosen: list[tuple[int, int]],
        scores: _Scores,
        new: _Scores,
    ) -> pl.DataFrame:
        """The batch with the chosen responses replaced, lineage and history kept; updates
        `responses` and `scores` for the replaced rows."""
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
            text = candidates[j].text
            old_id = columns["id"][i]
            messages = [*r.before, {"role": "assistant", "content": text}]
            history[i] = [
                *history[i],
                {
                    "id": old_id,
                    "response": responses[k],
                    "reason": "clear_auto_correct",
                    "score": float(scores.confidence[k]),
                },
            ]
            columns["messages"][i] = messages
            columns["id"][i] = record_id(messages, references[i])
            if "response" in columns:
                columns["response"][i] = text
            if "parent_id" in columns:
                columns["parent_id"][i] = old_id
            if "model" in columns:
                columns["model"][i] = engine.model_id
            responses[k] = text
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
class _Candidate:
    """A possible replacement answer: its text, and which sample it is (None: greedy)."""

    text: str
    sample: int | None

    def against(self, samples: Sequence[str]) -> list[str]:
        """The samples its observed consistency is measured against: all but itself."""
        return [s for i, s in enumerate(samples) if i != self.sample]


@dataclass
class _Tally:
    """How many (answer, sample) pairs were judged, and by what."""

    pairs: int = 0
    by_checker: int = 0
    by_engine: int = 0


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
