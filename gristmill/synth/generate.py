"""The `generate` stage: answer the input's conversations with one engine or several.

The most common synthesis job: distil a teacher's answers to your own prompts, or sample
candidates from several models for a selector (GRAPE) to choose from. Per input row and per
engine, `n` candidates come from ONE request (`n` samples, a seed derived from the row and
the engine), and each engine gets ONE batched call per part. Every candidate is a row whose
`parent_id` is the instruction it answers and whose `model` is the engine's model, with its
finish reason and token counts.

The prompt is the row's conversation (before its final assistant turn, if it has one),
optionally with a system prompt, or a `template` over the row's fields
(`"Answer in one sentence: {prompt}"`). With `keep_input`, the input rows stay in the
output and the new candidates join them: a second `generate` stage on another engine then
adds that model's answers to the same instructions, so two models need not be loaded at once
(an input answer without a `parent_id` becomes a candidate of its own instruction).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import polars as pl

from gristmill.engines.base import (
    PLAIN_STOP,
    Message,
    PromptFormat,
    Sampling,
    render_prompt,
    uses_chat_template,
)
from gristmill.pipelines.stage import Map, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, counts, summed
from gristmill.records import DROP_REASON, make_record, records_frame

#: Columns every candidate row gets besides the record's.
CANDIDATE_SCHEMA: dict[str, pl.DataType] = {
    "engine": pl.String(),
    "candidate": pl.Int64(),
    "finish_reason": pl.String(),
    "prompt_tokens": pl.Int64(),
    "output_tokens": pl.Int64(),
}


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(StageConfig):
    """Which engines answer, how many candidates each, with which prompt and sampling."""

    #: Names of recipe engines, each answering every prompt; empty: the recipe's only one.
    engines: tuple[str, ...] = ()
    #: Candidates per prompt per engine.
    n: int = 1
    #: A system turn put before the conversation (replacing the row's own, if any).
    system_prompt: str | None = None
    #: The user turn as a template over the row's fields (`{prompt}`, `{input}`, any column);
    #: None: the row's conversation as it is.
    template: str | None = None
    #: `auto`: the model's chat template, or a plain transcript for a base model without one.
    prompt_format: PromptFormat = "auto"
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    #: Drop candidates cut at `max_tokens` (reason `truncated`) instead of keeping them.
    drop_truncated: bool = False
    #: Keep the input rows in the output, the new candidates after them (see the module doc).
    keep_input: bool = False

    def __post_init__(self) -> None:
        where = "generate config"
        object.__setattr__(self, "engines", tuple(self.engines))
        object.__setattr__(self, "stop", tuple(self.stop))
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"{where}: engines {list(self.engines)} name one engine twice")
        if self.n < 1:
            raise ValueError(f"{where}: n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be >= 1, got {self.max_tokens}")
        if self.template is not None:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
            if not fields:
                raise ValueError(f"{where}: template {self.template!r} names no row field")
        Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


@dataclass(frozen=True)
class _Prompt:
    """One distinct prompt to answer: the turns, and the instruction the answers belong to."""

    turns: list[Message]
    parent_id: str
    source: str
    reference: str | None


@dataclass(frozen=True, kw_only=True)
class GenerateStats(ExtraStats):
    """Prompts asked, and candidates written per engine, summed over parts."""

    prompts: int = summed()
    candidates: dict[str, int] = counts()


class Generate(Map):
    """Answers each row's conversation: `n` candidates per prompt from one engine or several,
    each a row with `parent_id`, `model`, finish reason and token counts."""

    name: ClassVar[str] = "generate"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "synth"
    Config: ClassVar[type[StageConfig]] = GenerateConfig
    Stats: ClassVar[type[ExtraStats] | None] = GenerateStats
    uses_engine: ClassVar[bool] = True
    config: GenerateConfig

    def engine_names(self) -> tuple[str | None, ...]:
        return self.config.engines or (None,)

    def completions_reason(self) -> str | None:
        if self.config.prompt_format == "plain":
            return "has prompt_format: plain (raw transcripts for base models)"
        return None

    def requires(self) -> tuple[str, ...]:
        return ("id",) if self.config.template else ("id", "messages")

    def produces(self) -> tuple[str, ...]:
        return ("messages", "parent_id", "model", *CANDIDATE_SCHEMA)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """One batched call per engine over the part's distinct prompts; a row per candidate."""
        cfg = self.config
        rows = batch.to_dicts()
        prompts: dict[tuple[str, str], _Prompt] = {}
        rejected: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            prompt = self._prompt(row, where=f"part {ctx.part_index} row {i} (id {row['id']!r})")
            if prompt is None:
                rejected.append({**row, DROP_REASON: "no_prompt"})
                continue
            prompts.setdefault((prompt.parent_id, repr(prompt.turns)), prompt)
        todo = list(prompts.values())
        out: list[dict[str, Any]] = []
        written: dict[str, int] = {}
        for name in ctx.engine_names:
            engine = ctx.engine(name)
            chat = uses_chat_template(engine, cfg.prompt_format)
            texts = [render_prompt(engine, p.turns, fmt=cfg.prompt_format) for p in todo]
            stop = cfg.stop if chat else (*cfg.stop, *PLAIN_STOP)
            samplings = [
                Sampling(
                    n=cfg.n,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_tokens,
                    stop=stop,
                    seed=ctx.derive_seed(p.parent_id, repr(p.turns), name),
                )
                for p in todo
            ]
            completions = engine.generate(texts, samplings) if todo else []
            for p, comps in zip(todo, completions, strict=True):
                for k, comp in enumerate(comps):
                    out.append(self._candidate(p, comp.text, k, name, engine.model_id, comp))
            written[name] = sum(len(c) for c in completions)
        ctx.extra_stats.update(GenerateStats(prompts=len(todo), candidates=written).to_dict())
        frame = records_frame(out, extra_schema={**CANDIDATE_SCHEMA, DROP_REASON: pl.String()})
        parts = [_own_parent(batch), frame] if cfg.keep_input else [frame]
        if rejected:
            parts.append(pl.DataFrame(rejected, infer_schema_length=None))
        return pl.concat(parts, how="diagonal_relaxed")

    def _prompt(self, row: Mapping[str, Any], *, where: str) -> _Prompt | None:
        """The turns to answer for `row` and the instruction they belong to (None: no user
        turn to answer)."""
        cfg = self.config
        messages = [dict(m) for m in (row.get("messages") or [])]
        answered = bool(messages) and messages[-1]["role"] == "assistant"
        if answered:
            messages = messages[:-1]
        if cfg.template is not None:
            try:
                content = cfg.template.format_map(_Fields(row))
            except KeyError as exc:
                raise ValueError(
                    f"stage 'generate': {where}: template field {exc.args[0]!r} is not a column "
                    f"of the input ({sorted(row)})"
                ) from None
            system = [m for m in messages if m["role"] == "system"][:1]
            messages = [*system, {"role": "user", "content": content}]
        if cfg.system_prompt is not None:
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        if not any(m["role"] == "user" for m in messages):
            return None
        turns: list[Message] = [{"role": m["role"], "content": m["content"]} for m in messages]
        # A row that is itself an answer (a candidate) belongs to its instruction.
        parent = row.get("parent_id") if answered and row.get("parent_id") else row["id"]
        return _Prompt(
            turns=turns,
            parent_id=str(parent),
            source=str(row.get("source") or "generate"),
            reference=row.get("reference"),
        )

    def _candidate(
        self, p: _Prompt, text: str, k: int, engine: str, model: str, comp: Any
    ) -> dict[str, Any]:
        reply = text.strip()
        record = make_record(
            [*p.turns, {"role": "assistant", "content": reply}],
            source=p.source,
            reference=p.reference,
            parent_id=p.parent_id,
            model=model,
            engine=engine,
            candidate=k,
            finish_reason=comp.finish_reason,
            prompt_tokens=comp.prompt_tokens,
            output_tokens=comp.output_tokens,
        )
        reason = None
        if not reply:
            reason = "empty_response"
        elif self.config.drop_truncated and comp.finish_reason == "length":
            reason = "truncated"
        record[DROP_REASON] = reason
        return record


def _own_parent(batch: pl.DataFrame) -> pl.DataFrame:
    """Kept input rows with a `parent_id`: an answer without one is a candidate of its own
    instruction, grouped with the new answers to it (whose parent is that row)."""
    own = pl.col("id")
    if "parent_id" not in batch.columns:
        return batch.with_columns(own.alias("parent_id"))
    return batch.with_columns(pl.col("parent_id").fill_null(own))


class _Fields(dict[str, Any]):
    """A row's fields for `str.format_map`; None renders as an empty string."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        super().__init__({k: "" if v is None else v for k, v in row.items()})
