"""What every answer checker returns, and the one signature they share.

A verifier is a plain callable `(response, reference) -> Verdict`: math answer checking,
code tests run in the sandbox and user-written checkers all plug into the same place
(rejection sampling, DART, Hint-RFT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def verify_many(
    verifier: Verifier, pairs: Sequence[tuple[str, str]], workers: int
) -> list[Verdict]:
    """Verify (response, reference) pairs in order, on `workers` threads; a verifier that
    raises gives a `verifier_error` verdict instead of taking the batch down."""

    def one(pair: tuple[str, str]) -> Verdict:
        try:
            return verifier(*pair)
        except Exception as exc:
            return Verdict(correct=False, extracted=None, reason=f"verifier_error: {exc!r}"[:200])

    if workers <= 1 or len(pairs) < 2:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, pairs))
