"""The `magpie` stage: alignment data written by an aligned chat model from nothing.

After Xu et al. 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned
LLMs with Nothing" (magpie-align/magpie). The model is fed only its pre-query template
(the text right before a user message), so it writes a user instruction; the instruction
is then answered through the model's own chat template. Turn t >= 2 renders the
conversation so far and opens a new user turn, with a system prompt that asks for
follow-up questions, as the reference's multi-turn step does.

One input row (`seed_index`, from `input: {rows: N}`) gives one record. Every prompt gets
its own seed derived from (seed_index, turn, kind), so output does not depend on how rows
are split into parts or generate calls. Each turn makes one `generate` call for all
instructions of the batch, then one for all responses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import polars as pl

from gristmill.engines.base import Completion, Message, Sampling
from gristmill.pipelines.stage import LLMConfig, Map, MeteredEngine, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, first
from gristmill.records import DROP_REASON, make_record, records_frame
from gristmill.synth.templates import (
    FAMILIES,
    TEMPLATE_ERRORS,
    PreQuery,
    Render,
    chat_format,
    detect_family,
    family_for_model,
    pre_query_from_render,
    pre_query_template,
    text_before_user,
)

#: Built-in system prompts that steer instructions toward a domain (our own wording).
DOMAIN_SYSTEM_PROMPTS: dict[str, str] = {
    "math": (
        "You are an AI assistant that helps people solve mathematics problems. Users bring "
        "questions from arithmetic, algebra, geometry, number theory, probability and calculus, "
        "from school exercises to competition puzzles.\nYou work through each problem step by "
        "step, explain the reasoning behind every step and state the final answer clearly."
    ),
    "code": (
        "You are an AI assistant that helps people with programming. Users ask you to write, "
        "explain, review, optimize and debug code in many languages, from short scripts to "
        "algorithms and data structures.\nYou give correct, well-structured code and explain "
        "how it works and why it is written that way."
    ),
}

#: System prompt for writing turn t >= 2: the user keeps asking related follow-ups.
FOLLOWUP_SYSTEM_PROMPT = (
    "You are a helpful AI assistant in a conversation of several rounds. The user opens with "
    "a question and then keeps asking follow-up questions that build on your earlier answers. "
    "Give complete, relevant and accurate replies to every round."
)

#: Extra columns of a Magpie record, with their types.
EXTRA_SCHEMA: dict[str, pl.DataType] = {
    "seed_index": pl.Int64(),
    "finish_reason": pl.String(),
    "instruction_tokens": pl.Int64(),
    "response_tokens": pl.Int64(),
    "pre_query_family": pl.String(),
    DROP_REASON: pl.String(),
}


@dataclass(frozen=True, kw_only=True)
class MagpieConfig(LLMConfig):
    """Sampling for instructions and responses, steering prompts, turns and chat family."""

    #: Instruction sampling; the paper samples at temperature 1, top-p 1.
    instruction_temperature: float = 1.0
    instruction_top_p: float = 1.0
    instruction_max_tokens: int = 256
    #: Response sampling; the reference decodes greedily.
    response_temperature: float = 0.0
    response_top_p: float = 1.0
    response_max_tokens: int = 1024
    #: Magpie's early stopping: end an instruction at its first newline (on by default, as
    #: the reference's `--early_stopping`, magpie-align/magpie exp/gen_ins.py).
    stop_at_newline: bool = True
    #: System prompt shown while the model writes the first instruction.
    system_prompt: str | None = None
    #: A built-in system prompt (`DOMAIN_SYSTEM_PROMPTS`); excludes `system_prompt`.
    domain: Literal["math", "code"] | None = None
    #: Conversation rounds per record (user + assistant each).
    turns: int = 1
    #: System prompt shown while the model writes turn t >= 2 (None: no system turn).
    followup_system_prompt: str | None = FOLLOWUP_SYSTEM_PROMPT
    #: Chat family from the fallback table, overriding the model's own template.
    family: str | None = None
    #: Most prompts per `generate` call (None: the whole batch in one call).
    generate_chunk: int | None = None

    def __post_init__(self) -> None:
        where = "magpie config"
        for kind in ("instruction", "response"):
            temp = getattr(self, f"{kind}_temperature")
            top_p = getattr(self, f"{kind}_top_p")
            max_tokens = getattr(self, f"{kind}_max_tokens")
            if temp < 0:
                raise ValueError(f"{where}: {kind}_temperature must be >= 0, got {temp}")
            if not 0 < top_p <= 1:
                raise ValueError(f"{where}: {kind}_top_p must be in (0, 1], got {top_p}")
            if max_tokens < 1:
                raise ValueError(f"{where}: {kind}_max_tokens must be >= 1, got {max_tokens}")
        if self.turns < 1:
            raise ValueError(f"{where}: turns must be >= 1, got {self.turns}")
        if self.domain is not None and self.domain not in DOMAIN_SYSTEM_PROMPTS:
            raise ValueError(
                f"{where}: domain must be one of {sorted(DOMAIN_SYSTEM_PROMPTS)}, "
                f"got {self.domain!r}"
            )
        if self.domain is not None and self.system_prompt is not None:
            raise ValueError(f"{where}: set either system_prompt or domain, not both")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(
                f"{where}: family must be one of {list(FAMILIES)}, got {self.family!r}"
            )
        if self.generate_chunk is not None and self.generate_chunk < 1:
            raise ValueError(f"{where}: generate_chunk must be >= 1, got {self.generate_chunk}")

    @property
    def first_system_prompt(self) -> str | None:
        """The system prompt in force for the first instruction."""
        if self.domain is not None:
            return DOMAIN_SYSTEM_PROMPTS[self.domain]
        return self.system_prompt


# ---- instruction and response cleaning ---------------------------------------------------

_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<(?:start|end)_of_turn>|\[/?INST\]")
_ROLE_LINE = re.compile(r"^[ \t]*(?:user|assistant|system|model)[ \t]*:?[ \t]*$", re.I | re.M)
_LEADING_USER_HEADER = re.compile(
    r"^\s*(?:<\|im_start\|>|<\|start_header_id\|>|<start_of_turn>|<\|user\|>)?[ \t]*"
    r"user[ \t]*(?:<\|end_header_id\|>)?[ \t]*:?[ \t]*\n",
    re.I,
)
_LEADING_LABEL = re.compile(
    r"^(?:\*\*|#{1,4}[ \t]*)?"
    r"(?:task|prompt|question|query|request|instruction|problem|user|human)"
    r"(?:[ \t]*\d+)?[ \t]*:(?:\*\*)?[ \t]*",
    re.I,
)
_WORD = re.compile(r"\w")


def clean_instruction(text: str, stop: Sequence[str] = ()) -> tuple[str, bool]:
    """Strip leaked headers, labels and later turns from a sampled instruction.

    Returns the cleaned text and whether an end marker followed it (a special token, a
    role header or a stop string): then the instruction ended even if sampling went on.
    """
    body = _LEADING_USER_HEADER.sub("", text, count=1)
    ends = [len(body)]
    for pattern in (_SPECIAL_TOKEN, _ROLE_LINE):
        m = pattern.search(body)
        if m:
            ends.append(m.start())
    ends.extend(i for i in (body.find(s) for s in stop if s) if i >= 0)
    end = min(ends)
    ended = end < len(body)
    body = _LEADING_LABEL.sub("", body[:end].strip(), count=1).strip()
    return body, ended


def clean_response(text: str, stop: Sequence[str] = ()) -> str:
    """A sampled response cut at any stop string that slipped through, stripped."""
    ends = [len(text), *(i for i in (text.find(s) for s in stop if s) if i >= 0)]
    return text[: min(ends)].strip()


# ---- how prompts are written for one model -----------------------------------------------


@dataclass(frozen=True)
class MagpieChat:
    """How one model's conversations become raw prompts: its renderer and pre-query."""

    render: Render
    pre_query: PreQuery

    def instruction_prompt(
        self, conversation: Sequence[Message], *, followup_system_prompt: str | None
    ) -> str:
        """The text after which the model writes the next user message of `conversation`.

        An empty conversation gets the pre-query (with its own system prompt baked in);
        later turns are rendered under `followup_system_prompt`.
        """
        if not conversation:
            return self.pre_query.text
        return text_before_user(self.render, conversation, system_prompt=followup_system_prompt)

    def response_prompt(self, conversation: Sequence[Message]) -> str:
        """The prompt for the assistant's reply to the last user message."""
        return self.render(conversation, True)


def magpie_chat(
    engine: MeteredEngine, *, family: str | None, system_prompt: str | None
) -> MagpieChat:
    """Use the engine's own chat template, else (or when `family` is set) the family table."""
    if family is None and engine.chat_template:

        def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
            return engine.chat_prompt(messages, add_generation_prompt=add_generation_prompt)

        hint = detect_family(engine.chat_template) or family_for_model(engine.model_id)
        try:
            pre = pre_query_from_render(render, system_prompt=system_prompt, family_hint=hint)
            return MagpieChat(render=render, pre_query=pre)
        except TEMPLATE_ERRORS as exc:
            if hint is None:
                raise ValueError(
                    f"magpie: cannot derive a pre-query from {engine.model_id!r}'s chat template "
                    f"({exc}); set `family` to one of {list(FAMILIES)}"
                ) from exc
            family = hint
    if family is None:
        family = family_for_model(engine.model_id)
        if family is None:
            raise ValueError(
                f"magpie: model {engine.model_id!r} has no chat template and its family cannot "
                f"be guessed; set `family` to one of {list(FAMILIES)}"
            )
    fmt = chat_format(family)
    pre = pre_query_template(chat_template=None, family=family, system_prompt=system_prompt)
    return MagpieChat(render=fmt.render, pre_query=pre)


# ---- the stage ---------------------------------------------------------------------------


@dataclass
class _Conversation:
    """One record in the making."""

    seed_index: int
    messages: list[Message] = field(default_factory=list)
    finish_reason: str | None = None
    instruction_tokens: int = 0
    response_tokens: int = 0
    drop_reason: str | None = None
    #: Whether the conversation may take another turn.
    open: bool = True


def _seed_indices(batch: pl.DataFrame) -> list[int]:
    if "seed_index" not in batch.columns:
        raise ValueError(f"magpie: input needs a `seed_index` column, got {batch.columns}")
    column = batch["seed_index"]
    if not column.dtype.is_integer():
        raise ValueError(f"magpie: column `seed_index` must be integers, got {column.dtype}")
    nulls = column.is_null()
    if nulls.any():
        raise ValueError(f"magpie: column `seed_index` is null at row {int(nulls.arg_max() or 0)}")
    return [int(v) for v in column.to_list()]


def _generate(
    engine: MeteredEngine, prompts: list[str], params: list[Sampling], chunk: int | None
) -> list[Completion]:
    step = chunk or max(len(prompts), 1)
    out: list[Completion] = []
    for begin in range(0, len(prompts), step):
        for i, choices in enumerate(
            engine.generate(prompts[begin : begin + step], params[begin : begin + step])
        ):
            if not choices:
                raise RuntimeError(f"magpie: engine returned no completion for prompt {begin + i}")
            out.append(choices[0])
    return out


@dataclass(frozen=True, kw_only=True)
class MagpieStats(ExtraStats):
    """The pre-query template the run used (the same in every part)."""

    pre_query: str | None = first()
    pre_query_family: str | None = first()


class Magpie(Map):
    """Magpie self-synthesis: the model writes instructions from a bare pre-query template, then
    answers them (multi-turn optional)."""

    name: ClassVar[str] = "magpie"
    needs_completions: ClassVar[str | None] = (
        "writes instructions from a bare pre-query template (a raw completion)"
    )
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "synth"
    citation: ClassVar[str | None] = (
        "Xu et al., 2024. Magpie: Alignment Data Synthesis from Scratch by Prompting "
        "Aligned LLMs with Nothing. arXiv:2406.08464"
    )
    Config: ClassVar[type[StageConfig]] = MagpieConfig
    Stats: ClassVar[type[ExtraStats] | None] = MagpieStats
    unhashed: ClassVar[frozenset[str]] = frozenset({"generate_chunk"})
    uses_engine: ClassVar[bool] = True

    config: MagpieConfig

    def requires(self) -> tuple[str, ...]:
        """One output record per `seed_index` row."""
        return ("seed_index",)

    def produces(self) -> tuple[str, ...]:
        """Records plus Magpie's bookkeeping columns."""
        extra = tuple(c for c in EXTRA_SCHEMA if c != DROP_REASON)
        return ("id", "messages", "prompt", "response", "source", "model", *extra)

    # -- format / parse --

    def format_input(self, conversation: Sequence[Message], chat: MagpieChat) -> str:
        """The raw prompt that makes the model write the next user message of `conversation`."""
        return chat.instruction_prompt(
            conversation, followup_system_prompt=self.config.followup_system_prompt
        )

    def parse_instruction(
        self, text: str, completion: Completion, *, stop: Sequence[str] = ()
    ) -> str | None:
        """A clean instruction, or None when it is empty or was cut off by `max_tokens`."""
        cleaned, ended = clean_instruction(text, stop)
        if completion.finish_reason == "length" and not ended:
            return None
        return cleaned if _WORD.search(cleaned) else None

    # -- rounds --

    def _sampling(
        self,
        kind: Literal["instruction", "response"],
        convs: list[_Conversation],
        turn: int,
        ctx: StageContext,
        *,
        stop: tuple[str, ...],
    ) -> list[Sampling]:
        """One Sampling per conversation, seeded by its row, the turn and the kind of text."""
        cfg = self.config
        return [
            Sampling(
                temperature=getattr(cfg, f"{kind}_temperature"),
                top_p=getattr(cfg, f"{kind}_top_p"),
                max_tokens=getattr(cfg, f"{kind}_max_tokens"),
                stop=stop,
                seed=ctx.derive_seed(c.seed_index, turn, kind),
            )
            for c in convs
        ]

    def _instructions(
        self,
        engine: MeteredEngine,
        chat: MagpieChat,
        convs: list[_Conversation],
        turn: int,
        ctx: StageContext,
    ) -> None:
        prompts = [self.format_input(c.messages, chat) for c in convs]
        params = self._sampling("instruction", convs, turn, ctx, stop=self._stop(chat))
        comps = _generate(engine, prompts, params, self.config.generate_chunk)
        for conv, comp in zip(convs, comps, strict=True):
            self._take_instruction(conv, comp, chat)

    def _stop(self, chat: MagpieChat) -> tuple[str, ...]:
        """Where an instruction ends: the template's stops, and a newline when asked."""
        return chat.pre_query.stop + (("\n",) if self.config.stop_at_newline else ())

    def _take_instruction(self, conv: _Conversation, comp: Completion, chat: MagpieChat) -> None:
        """The written instruction as the conversation's next user turn, or why it ends."""
        conv.instruction_tokens += comp.output_tokens
        text = self.parse_instruction(comp.text, comp, stop=chat.pre_query.stop)
        if text is None:
            conv.drop_reason = (
                "instruction_truncated" if comp.finish_reason == "length" else "empty_instruction"
            )
            conv.messages.append({"role": "user", "content": comp.text})
            conv.open = False
        else:
            conv.messages.append({"role": "user", "content": text})

    def _responses(
        self,
        engine: MeteredEngine,
        chat: MagpieChat,
        convs: list[_Conversation],
        turn: int,
        ctx: StageContext,
    ) -> None:
        prompts = [chat.response_prompt(c.messages) for c in convs]
        params = self._sampling("response", convs, turn, ctx, stop=chat.pre_query.stop)
        comps = _generate(engine, prompts, params, self.config.generate_chunk)
        for conv, comp in zip(convs, comps, strict=True):
            self._take_response(conv, comp, chat)

    @staticmethod
    def _take_response(conv: _Conversation, comp: Completion, chat: MagpieChat) -> None:
        """The answer as the conversation's next assistant turn, or why it ends."""
        conv.response_tokens += comp.output_tokens
        conv.finish_reason = comp.finish_reason
        text = clean_response(comp.text, chat.pre_query.stop)
        if not text:
            conv.drop_reason = "empty_response"
            conv.open = False
            return
        conv.messages.append({"role": "assistant", "content": text})
        # A truncated answer is kept (a filter drops it) but not built upon.
        if comp.finish_reason != "stop":
            conv.open = False

    def _flow(
        self, engine: MeteredEngine, chat: MagpieChat, convs: list[_Conversation], ctx: StageContext
    ) -> None:
        """Continuous mode: each conversation asks its answer as soon as its instruction is
        back, and its next instruction as soon as its answer is; the same requests and seeds
        as the turn-by-turn path."""
        turns = self.config.turns
        pending: dict[Future[list[Completion]], tuple[_Conversation, str, int]] = {}

        def ask(conv: _Conversation, kind: Literal["instruction", "response"], turn: int) -> None:
            if kind == "instruction":
                prompt, stop = self.format_input(conv.messages, chat), self._stop(chat)
            else:
                prompt, stop = chat.response_prompt(conv.messages), chat.pre_query.stop
            (sampling,) = self._sampling(kind, [conv], turn, ctx, stop=stop)
            pending[engine.submit(prompt, sampling)] = (conv, kind, turn)

        for conv in convs:
            ask(conv, "instruction", 1)
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                conv, kind, turn = pending.pop(future)
                choices = future.result()
                if not choices:
                    raise RuntimeError("magpie: engine returned no completion")
                if kind == "instruction":
                    self._take_instruction(conv, choices[0], chat)
                    if conv.open:
                        ask(conv, "response", turn)
                else:
                    self._take_response(conv, choices[0], chat)
                    if conv.open and turn < turns:
                        ask(conv, "instruction", turn + 1)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Write `turns` rounds for every seed row: instructions first, then responses."""
        cfg = self.config
        seeds = _seed_indices(batch)
        engine = ctx.engine()
        chat = magpie_chat(engine, family=cfg.family, system_prompt=cfg.first_system_prompt)
        convs = [_Conversation(seed_index=s) for s in seeds]
        if engine.continuous and cfg.generate_chunk is None:
            self._flow(engine, chat, convs, ctx)
        else:
            for turn in range(1, cfg.turns + 1):
                asking = [c for c in convs if c.open]
                if asking:
                    self._instructions(engine, chat, asking, turn, ctx)
                answering = [c for c in asking if c.open]
                if answering:
                    self._responses(engine, chat, answering, turn, ctx)
        stats = MagpieStats(pre_query=chat.pre_query.text, pre_query_family=chat.pre_query.family)
        ctx.extra_stats.update(stats.to_dict())
        rows = [self._record(c, engine.model_id, chat.pre_query.family) for c in convs]
        return records_frame(rows, extra_schema=EXTRA_SCHEMA)

    @staticmethod
    def _record(conv: _Conversation, model: str, family: str) -> dict[str, Any]:
        return make_record(
            conv.messages,
            source="magpie",
            model=model,
            seed_index=conv.seed_index,
            finish_reason=conv.finish_reason,
            instruction_tokens=conv.instruction_tokens,
            response_tokens=conv.response_tokens,
            pre_query_family=family,
            **{DROP_REASON: conv.drop_reason},
        )
