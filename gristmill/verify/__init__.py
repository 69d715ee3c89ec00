"""Answer checkers: every verifier is a `(response, reference) -> Verdict` callable.

`get_verifier(name, **options)` builds one by name, for recipes: "math" (extract the final
answer and test equivalence) or "code" (run tests in the sandbox).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gristmill.verify.base import Verdict, Verifier

__all__ = ["VERIFIERS", "Verdict", "Verifier", "get_verifier"]

#: The names `get_verifier` knows.
VERIFIERS: tuple[str, ...] = ("math", "code")


def get_verifier(name: str, **options: Any) -> Verifier:
    """The verifier called `name`, configured with `options` (its dataclass fields)."""
    cls: Any
    match name:
        case "math":
            from gristmill.verify.math import MathVerifier

            cls = MathVerifier
        case "code":
            from gristmill.verify.code import CodeVerifier

            cls = CodeVerifier
        case _:
            raise ValueError(f"unknown verifier {name!r}; known verifiers: {list(VERIFIERS)}")
    if dataclasses.is_dataclass(cls):
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [key for key in options if key not in allowed]
        if unknown:
            raise TypeError(
                f"verifier {name!r} has no option(s) {unknown}; its options are {allowed}"
            )
    verifier: Verifier = cls(**options)
    return verifier
