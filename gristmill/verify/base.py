"""What every answer checker returns, and the one signature they share.

A verifier is a plain callable `(response, reference) -> Verdict`: math answer checking,
code tests run in the sandbox and user-written checkers all plug into the same place
(rejection sampling, DART, Hint-RFT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The outcome of checking one response: correct or not, what was compared, and why."""

    correct: bool
    #: The answer taken from the response (or a summary of what ran), None when none was found.
    extracted: str | None
    #: A short machine-friendly reason: "equal", "not_equal", "no_answer", "timeout", ...
    reason: str


#: `(response, reference) -> Verdict`; must never raise on bad model output.
Verifier = Callable[[str, str], Verdict]
