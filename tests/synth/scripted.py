"""The part every scripted test engine shares: it records each `generate` call, can die on a
given call (to test resume), renders a chat as `<role>text` turns and counts words as tokens.
Subclasses write `generate` from `self.record(prompts, sampling)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gristmill.engines.base import Messages, Sampling, per_prompt


@dataclass(kw_only=True)
class ScriptedBase:
    fail_on_call: int | None = None
    model_id: str = "scripted"
    calls: list[list[tuple[str, Sampling]]] = field(default_factory=list)

    def record(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[Sampling]:
        """Log the call (or fail it, as scripted) and return each prompt's sampling settings."""
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("engine died (scripted)")
        params = per_prompt(sampling, len(prompts))
        self.calls.append(list(zip(prompts, params, strict=True)))
        return params

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        raise NotImplementedError

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def chat_template(self) -> str | None:
        return None
