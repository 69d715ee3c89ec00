"""Option probabilities by teacher forcing: how likely the model's one-token reply is each
of a few options, read from prompt log-probs instead of sampled (CLEAR's questions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gristmill.engines.base import Messages
from gristmill.selectors.grape import LogprobEngine, score_responses


def option_probabilities(
    engine: LogprobEngine, prompts: Sequence[Messages], options: Sequence[str]
) -> np.ndarray:
    """P(reply = option | prompt), normalised over `options`, by teacher forcing: one
    prompt-log-probs call for every (prompt, option) text. Shape (len(prompts), len(options))."""
    if not prompts:
        return np.zeros((0, len(options)))
    flat_prompts = [p for p in prompts for _ in options]
    flat_options = [o for _ in prompts for o in options]
    scored = score_responses(
        engine, flat_prompts, flat_options, normalize=False, batch_size=len(flat_options)
    )
    logp = np.array([s.score for s in scored]).reshape(len(prompts), len(options))
    logp -= logp.max(axis=1, keepdims=True)
    probs = np.exp(logp)
    return np.asarray(probs / probs.sum(axis=1, keepdims=True))
