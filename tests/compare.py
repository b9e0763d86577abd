"""Compare two greedy runs token by token, tolerating genuine near-ties.

Runs through different attention paths (the stock kernel, a torch path, transformers) agree
to ~1e-6 in fp32, so a greedy choice between two tokens whose logprobs are that close can go
either way. The comparison checks every shared logprob to `atol`; where the chosen tokens
differ it requires the two candidates to be tied within `atol` in both runs and stops there.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence


def assert_same_greedy(
    tokens_a: Sequence[Hashable],
    top_a: Sequence[Mapping[Hashable, float]],
    tokens_b: Sequence[Hashable],
    top_b: Sequence[Mapping[Hashable, float]],
    atol: float = 1e-4,
) -> int:
    """Returns how many leading tokens were identical."""
    assert len(tokens_a) == len(tokens_b)
    for step, (a, b) in enumerate(zip(tokens_a, tokens_b, strict=True)):
        la, lb = top_a[step], top_b[step]
        for token in la.keys() & lb.keys():
            assert abs(la[token] - lb[token]) <= atol, (step, token, la[token], lb[token])
        if a != b:
            gap_a = la[a] - la.get(b, -math.inf)
            gap_b = lb[b] - lb.get(a, -math.inf)
            assert gap_a <= atol and gap_b <= atol, f"step {step}: {a!r} vs {b!r} is no tie"
            return step
    return len(tokens_a)
