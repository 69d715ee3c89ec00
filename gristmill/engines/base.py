"""The Engine protocol every LLM backend implements, its value types, and its errors.

Raw-text prompts are the primitive: Magpie feeds a bare pre-query template, hint-infer
continues a partial answer. Chat formatting goes through `Engine.chat_prompt`, which uses
the model's own chat template.

Errors say whether trying again later may help (`is_transient`): a server answering 5xx or
429, a timeout, a dropped connection may pass; a refused request, a config error or a bug
fails the same way every time. Backends turn their own transport errors into `ServerError`
(with `transient` set), so this module needs no HTTP client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict, runtime_checkable


class Message(TypedDict):
    """One chat turn, in TRL's conversational format."""

    role: str
    content: str


Messages = Sequence[Message]

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling settings for one prompt (or one `generate` call when shared by all prompts)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"Sampling.max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):  # a bare string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    stop: str | None = None  # the stop string that ended generation, if any


@dataclass
class EngineStats:
    """Counters an engine keeps so stages can report calls, tokens and throughput.

    `seconds` is the time at least one request of this counter was in flight: requests that
    overlap (submitted together into a continuous batch) count their shared time once.
    """

    calls: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _active: int = field(default=0, repr=False, compare=False)
    _since: float = field(default=0.0, repr=False, compare=False)

    def begin(self) -> None:
        """A request (or a batch of them) starts (thread-safe)."""
        with self._lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1

    def end(self, *, prompts: int, prompt_tokens: int, output_tokens: int) -> None:
        """The request or batch `begin` announced has finished with these counts."""
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.seconds += time.perf_counter() - self._since
            self.calls += 1
            self.prompts += prompts
            self.prompt_tokens += prompt_tokens
            self.output_tokens += output_tokens

    def snapshot(self) -> dict[str, float]:
        """A plain-dict copy, for stage stats and manifests."""
        with self._lock:
            tps = self.output_tokens / self.seconds if self.seconds > 0 else 0.0
            return {
                "calls": self.calls,
                "prompts": self.prompts,
                "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens,
                "seconds": round(self.seconds, 3),
                "output_tokens_per_s": round(tps, 1),
            }


def sum_engine_stats(snapshots: list[dict[str, float]]) -> dict[str, float]:
    """Add up `EngineStats.snapshot()` dicts, recomputing throughput over the total."""
    keys = ("calls", "prompts", "prompt_tokens", "output_tokens", "seconds")
    out: dict[str, float] = {k: sum(s.get(k, 0) for s in snapshots) for k in keys}
    out["seconds"] = round(out["seconds"], 3)
    out["output_tokens_per_s"] = (
        round(out["output_tokens"] / out["seconds"], 1) if out["seconds"] > 0 else 0.0
    )
    return out


@runtime_checkable
class Engine(Protocol):
    """What every LLM backend offers. Put a whole round's prompts into one `generate` call."""

    model_id: str

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        """Sample continuations of raw-text prompts.

        `sampling` is shared by all prompts or given one per prompt (e.g. per-row seeds).
        Returns, per prompt, `n` completions in order.
        """
        ...

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        """Log-probability of each token of each text given its prefix (first token: None)."""
        ...

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """Render a conversation through the model's own chat template, as raw text."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer gives `text` (no special tokens added)."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template source, when it has one."""
        ...


def check_prompts(prompts: Sequence[str], *, allow_empty: bool = False) -> None:
    """Raise a clear error for a bare string, a non-string or (unless allowed) an empty prompt."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str")
        if not prompt and not allow_empty:
            raise ValueError(f"prompt {i} is empty")


def check_messages(messages: Messages) -> list[dict[str, str]]:
    """Plain role/content dicts for a chat template, or a clear error naming the bad turn."""
    turns = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(
                f"messages[{i}] needs string 'role' and 'content', got {dict(message)!r}"
            )
        turns.append({"role": role, "content": content})
    return turns


def per_prompt(sampling: Sampling | Sequence[Sampling], count: int) -> list[Sampling]:
    """Expand a shared Sampling to one per prompt, checking a given list's length."""
    if isinstance(sampling, Sampling):
        return [sampling] * count
    items = list(sampling)
    if len(items) != count:
        raise ValueError(f"got {len(items)} Sampling objects for {count} prompts")
    return items


# ---- errors, and which of them are worth retrying ------------------------------------------

#: HTTP statuses worth retrying: rate limits and server-side failures.
#: 408 is the server timing out our request; 501/505 would fail the same way again.
RETRY_STATUSES = frozenset({408, 429}) | (frozenset(range(500, 600)) - {501, 505})

#: Exceptions that are transient whatever raised them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError)


class ServerError(RuntimeError):
    """A request to an engine's server failed (refused, or still failing after retries)."""

    def __init__(
        self, message: str, *, kind: str, status: int | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        #: True when the server may recover (it kept failing with retryable errors, or the
        #: connection failed): a flow-level retry later is worth it; False for refusals.
        self.transient = transient


class TransientError(RuntimeError):
    """Raise (or chain) this from a stage for a failure that may pass on a later try."""


def is_transient(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is worth retrying."""
    return any(_transient_one(e) for e in _chain(exc))


def _transient_one(exc: BaseException) -> bool:
    """Whether this one exception (not its causes) is worth retrying."""
    if isinstance(exc, (TransientError, *TRANSIENT_ERRORS)):
        return True
    if isinstance(exc, ServerError):
        if exc.transient:  # retries used up or the transport failed: it may pass later
            return True
        return exc.status is not None and exc.status in RETRY_STATUSES
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from (cause, else context), each exception once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# ---- prompts for chat models and base models ------------------------------------------------

#: How a stage turns a conversation into a raw prompt: the model's chat template (`chat`), a
#: plain `User:`/`Assistant:` transcript for base models (`plain`), or `auto`: the chat
#: template when the model has one, else plain.
PromptFormat = Literal["auto", "chat", "plain"]

#: Where a base model answering a plain transcript should stop: at the next user turn.
PLAIN_STOP: tuple[str, ...] = ("\nUser:",)


def plain_prompt(messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """A conversation as a plain transcript a base model can continue: the system turn as a
    first paragraph, then `User: ...` and `Assistant: ...` turns; with
    `add_generation_prompt`, it ends with `Assistant:` for the model to write the reply."""
    parts: list[str] = []
    for m in messages:
        match m["role"]:
            case "system":
                parts.append(m["content"].strip())
            case "user":
                parts.append(f"User: {m['content'].strip()}")
            case "assistant":
                parts.append(f"Assistant: {m['content'].strip()}")
            case other:
                raise ValueError(f"unknown message role {other!r}")
    text = "\n\n".join(parts)
    return text + "\n\nAssistant:" if add_generation_prompt else text


class ChatRenderer(Protocol):
    """What prompt rendering needs of an engine (an Engine or a stage's MeteredEngine)."""

    @property
    def model_id(self) -> str: ...

    @property
    def chat_template(self) -> str | None: ...

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str: ...


def uses_chat_template(engine: ChatRenderer, fmt: PromptFormat) -> bool:
    """Whether `fmt` on `engine` means its chat template (`chat` without one is an error)."""
    if fmt == "chat" and engine.chat_template is None:
        raise ValueError(
            f"model {engine.model_id!r} has no chat template; use prompt_format: plain (or auto)"
        )
    return fmt == "chat" or (fmt == "auto" and engine.chat_template is not None)


def render_prompt(
    engine: ChatRenderer,
    messages: Messages,
    *,
    fmt: PromptFormat = "auto",
    add_generation_prompt: bool = True,
) -> str:
    """A conversation as the raw prompt `engine` should see, in format `fmt`."""
    if uses_chat_template(engine, fmt):
        return engine.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
    return plain_prompt(messages, add_generation_prompt=add_generation_prompt)
