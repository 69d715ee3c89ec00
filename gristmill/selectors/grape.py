"""The `grape` stage: per instruction, keep the candidate the target model finds likeliest.

After GRAPE (Zhang et al. 2025, "The Best Instruction-Tuning Data are Those That Fit"):
candidates of one instruction (rows sharing `parent_id`: several models' answers or several
samples) are scored by the target model's length-normalised log-probability of the
response given the chat-formatted prompt, `(1/|y|) Σ_t log p(y_t | x, y_<t)` (or the sum,
with `normalize: false`), and the best `keep` per instruction are kept. Every scored row
gets `score__grape`, `grape_tokens` (|y|) and `grape_rank` (1 = best in its group); the
rows not kept go to `rejected/` with reason `not_best`, scores and all, so the choice can
be audited.

How a response is scored:

- The prompt x is the conversation before the final assistant turn, rendered by the
  engine's chat template with the generation prompt; the scored text is `x + response`.
  Only the response's tokens count: the end-of-turn token is not scored, as in the
  reference, so a candidate is not rewarded or punished for where the template ends it.
- Log-probs come from the engine's prompt log-probs (teacher forcing), one call per chunk
  of `batch_size` texts.
- Tokenisation boundary: BPE can merge the prompt's last token with the response's first
  characters (SmolLM2: the template's closing "\\n" and a response that starts with
  "\\n" or two spaces). When `tokens(x) + tokens(y) != tokens(x + y)` the one token that
  straddles the boundary is scored too, so every character of the response is covered;
  such rows are counted in the stage stats (`boundary_merges`).
- `max_tokens` keeps over-long responses inside the context: a longer response is scored
  on its longest prefix of at most `max_tokens` tokens (`truncated` in the stats).

Grouping: by `parent_id` (default; a row with a null `parent_id` is a group of its own and
passes through with its score), or, with `group_by: prompt`, by the conversation before the
final assistant turn, for candidate sets that carry no lineage. Ties are broken by input
order (the earlier row wins). Rows without a response to score (no final assistant turn, or
an empty one) are rejected as `no_response`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import polars as pl

from gristmill.engines.base import (
    ChatRenderer,
    Message,
    Messages,
    PromptFormat,
    render_prompt,
    uses_chat_template,
)
from gristmill.pipelines.stage import LLMConfig, Select, StageConfig, StageContext
from gristmill.records import DROP_REASON, score_column

SCORE = score_column("grape")
TOKENS = "grape_tokens"
RANK = "grape_rank"


class LogprobEngine(ChatRenderer, Protocol):
    """The part of the engine protocol GRAPE needs (an Engine or a stage's MeteredEngine)."""

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]: ...

    def count_tokens(self, text: str) -> int: ...


def scoring_prompt(engine: LogprobEngine, messages: Messages, fmt: PromptFormat) -> str:
    """The text a response is appended to for scoring: the generation prompt in `fmt` (a
    plain transcript gets the space its `Assistant:` turns put before the reply)."""
    prompt = render_prompt(engine, messages, fmt=fmt)
    return prompt if uses_chat_template(engine, fmt) else prompt + " "


@dataclass(frozen=True)
class ResponseScore:
    """One response's GRAPE score and how it was obtained."""

    score: float
    #: Tokens scored (|y|), including a prompt/response boundary token when one was merged.
    tokens: int
    #: Whether the response was cut to `max_tokens` tokens before scoring.
    truncated: bool
    #: Whether the prompt's last token merged with the response's first characters.
    boundary_merged: bool


def token_prefix(engine: LogprobEngine, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` with at most `max_tokens` tokens (binary search on chars)."""
    if engine.count_tokens(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)  # count(text[:lo]) <= max_tokens < count(text[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if engine.count_tokens(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid
    return text[:lo]


@dataclass(frozen=True)
class _Plan:
    text: str
    tokens: int
    truncated: bool
    merged: bool


def _plan(engine: LogprobEngine, prompt: str, response: str, max_tokens: int | None) -> _Plan:
    cut = token_prefix(engine, response, max_tokens) if max_tokens is not None else response
    n_prompt = engine.count_tokens(prompt)
    n_response = engine.count_tokens(cut)
    n_full = engine.count_tokens(prompt + cut)
    merged = n_prompt + n_response != n_full
    tokens = n_full - n_prompt + 1 if merged else n_response
    return _Plan(
        text=prompt + cut,
        tokens=max(1, min(tokens, n_full - 1)),
        truncated=len(cut) < len(response),
        merged=merged,
    )


def score_responses(
    engine: LogprobEngine,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    *,
    normalize: bool = True,
    batch_size: int = 64,
    max_tokens: int | None = None,
    prompt_format: PromptFormat = "auto",
) -> list[ResponseScore]:
    """GRAPE scores with their token counts: one prompt-logprobs call per `batch_size` texts.

    `prompts[i]` is the conversation before response i (it must end with a user turn or
    similar; the generation prompt is added). An empty response is an error.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    plans: list[_Plan] = []
    for i, (messages, response) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(response, str) or not response:
            raise ValueError(f"response {i} is empty or not a string: nothing to score")
        prompt = scoring_prompt(engine, messages, prompt_format)
        plans.append(_plan(engine, prompt, response, max_tokens))
    out: list[ResponseScore] = []
    for start in range(0, len(plans), batch_size):
        chunk = plans[start : start + batch_size]
        rows = engine.prompt_logprobs([p.text for p in chunk])
        for i, (plan, row) in enumerate(zip(chunk, rows, strict=True), start=start):
            tail = row[-plan.tokens :] if len(row) > plan.tokens else []
            if len(tail) != plan.tokens or any(v is None for v in tail):
                raise RuntimeError(
                    f"response {i}: the engine returned {len(row)} log-probs, "
                    f"too few for {plan.tokens} response tokens"
                )
            total = float(sum(v for v in tail if v is not None))
            out.append(
                ResponseScore(
                    score=total / plan.tokens if normalize else total,
                    tokens=plan.tokens,
                    truncated=plan.truncated,
                    boundary_merged=plan.merged,
                )
            )
    return out


def grape_scores(
    engine: LogprobEngine,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    *,
    normalize: bool = True,
    batch_size: int = 64,
    max_tokens: int | None = None,
    prompt_format: PromptFormat = "auto",
) -> list[float]:
    """Per response: mean (or, with normalize=False, summed) log-prob of its tokens given
    the chat-formatted prompt, under `engine`'s model. For benchmarks and notebooks."""
    scored = score_responses(
        engine,
        prompts,
        responses,
        normalize=normalize,
        batch_size=batch_size,
        max_tokens=max_tokens,
        prompt_format=prompt_format,
    )
    return [s.score for s in scored]


def rank_in_groups(groups: Sequence[object], scores: np.ndarray) -> np.ndarray:
    """1-based rank of each row inside its group by descending score; ties: earlier row first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: earlier row wins
    seen: dict[object, int] = {}
    ranks = np.zeros(len(scores), dtype=np.int64)
    for i in order:
        seen[groups[i]] = seen.get(groups[i], 0) + 1
        ranks[i] = seen[groups[i]]
    return ranks


@dataclass(frozen=True, kw_only=True)
class GrapeConfig(LLMConfig):
    """How candidates are grouped, scored and how many are kept per instruction."""

    #: Mean log-prob per response token (True, GRAPE's score) or the summed log-prob.
    normalize: bool = True
    #: Candidates kept per instruction (the k best).
    keep: int = 1
    #: What makes rows candidates of one instruction: the shared `parent_id`, or the same
    #: conversation before the final assistant turn.
    group_by: Literal["parent_id", "prompt"] = "parent_id"
    #: Responses longer than this are scored on their first `max_tokens` tokens; None: never
    #: cut (the engine then rejects texts beyond its context length).
    max_tokens: int | None = 1024
    #: Texts per prompt-logprobs call; does not change the output.
    batch_size: int = 64
    #: How the target model sees the instruction: its chat template, or a plain transcript
    #: for a base model without one (`auto` picks by whether the model has a template).
    prompt_format: PromptFormat = "auto"

    def __post_init__(self) -> None:
        where = "grape config"
        if self.keep < 1:
            raise ValueError(f"{where}: keep must be >= 1, got {self.keep}")
        if self.group_by not in ("parent_id", "prompt"):
            raise ValueError(
                f"{where}: group_by must be 'parent_id' or 'prompt', got {self.group_by!r}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be >= 1 or null, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {self.batch_size}")


def split_conversation(messages: list[dict[str, Any]] | None) -> tuple[list[Message], str] | None:
    """(turns before the final assistant turn, its content), or None when there is no response."""
    if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        return None
    before: list[Message] = [
        {"role": str(m["role"]), "content": str(m["content"])} for m in messages[:-1]
    ]
    return before, str(messages[-1]["content"])


class GrapeSelect(Select):
    """GRAPE: per instruction, the candidate the target model finds most likely; `score__grape` on
    every candidate."""

    name: ClassVar[str] = "grape"
    needs_completions: ClassVar[str | None] = (
        "scores responses by their prompt log-probabilities under the target model"
    )
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "selector"
    citation: ClassVar[str | None] = (
        "Zhang et al., 2025. The Best Instruction-Tuning Data are Those That Fit (GRAPE). "
        "arXiv:2502.04194"
    )
    Config: ClassVar[type[StageConfig]] = GrapeConfig
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    uses_engine: ClassVar[bool] = True
    config: GrapeConfig

    def requires(self) -> tuple[str, ...]:
        return ("messages",) if self.config.group_by == "prompt" else ("messages", "parent_id")

    def reads(self) -> tuple[str, ...]:
        """The conversations, the groups' lineage and the ids."""
        return ("id", "messages", "parent_id")

    def produces(self) -> tuple[str, ...]:
        return (SCORE, TOKENS, RANK)

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Score every candidate, rank inside its group, keep the best `keep` of each."""
        cfg = self.config
        n = data.height
        split = [split_conversation(m) for m in data.get_column("messages").to_list()]
        todo = [i for i, s in enumerate(split) if s is not None]
        candidates = [s for s in split if s is not None]
        scored = score_responses(
            ctx.engine(),
            [prompt for prompt, _ in candidates],
            [response for _, response in candidates],
            normalize=cfg.normalize,
            batch_size=cfg.batch_size,
            max_tokens=cfg.max_tokens,
            prompt_format=cfg.prompt_format,
        )
        groups = self._groups(data, split)
        ranks = rank_in_groups([groups[i] for i in todo], np.array([s.score for s in scored]))
        score: list[float | None] = [None] * n
        tokens: list[int | None] = [None] * n
        rank: list[int | None] = [None] * n
        reason: list[str | None] = ["no_response"] * n
        for i, s, r in zip(todo, scored, ranks.tolist(), strict=True):
            score[i], tokens[i], rank[i] = s.score, s.tokens, r
            reason[i] = None if r <= cfg.keep else "not_best"
        out = data.with_columns(
            pl.Series(SCORE, score, dtype=pl.Float64),
            pl.Series(TOKENS, tokens, dtype=pl.Int64),
            pl.Series(RANK, rank, dtype=pl.Int64),
            pl.Series(DROP_REASON, reason, dtype=pl.String),
        )
        ctx.extra_stats.update(
            {
                "rows": n,
                "scored": len(todo),
                "groups": len({groups[i] for i in todo}),
                "kept": int((ranks <= cfg.keep).sum()),
                "no_response": n - len(todo),
                "normalize": cfg.normalize,
                "boundary_merges": sum(s.boundary_merged for s in scored),
                "truncated": sum(s.truncated for s in scored),
            }
        )
        return out

    def _groups(
        self, frame: pl.DataFrame, split: list[tuple[list[Message], str] | None]
    ) -> list[object]:
        """One hashable group key per row; a row without a key is a group of its own."""
        if self.config.group_by == "prompt":
            return [
                ("prompt", json.dumps(s[0], sort_keys=True)) if s is not None else ("row", i)
                for i, s in enumerate(split)
            ]
        parents = frame.get_column("parent_id").to_list()
        return [("parent", p) if p is not None else ("row", i) for i, p in enumerate(parents)]
