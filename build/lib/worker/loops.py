"""Repetition-loop detection on generated token ids (a runaway marker for re-prediction)."""

from __future__ import annotations

from collections.abc import Sequence


def is_looping(ids: Sequence[int], max_period: int = 32, min_span: int = 48, min_repeats: int = 3) -> bool:
    """True when the tail of ``ids`` repeats with some period ``p <= max_period``: the last
    ``max(min_span, min_repeats * p)`` tokens all equal the token ``p`` before them. Greedy
    decoding that has entered such a cycle stays in it until ``max_tokens``."""
    n = len(ids)
    for p in range(1, max_period + 1):
        span = max(min_span, min_repeats * p)
        if n < span + p:
            break
        if all(ids[n - k] == ids[n - k - p] for k in range(1, span + 1)):
            return True
    return False
