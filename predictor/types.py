"""The predictor's records: what it reads of a request and what it answers. Plain data, no imports
of the heavy parts, so the scheduler can carry a prediction without loading the predictor."""

from __future__ import annotations

from dataclasses import dataclass

#: Generated-token counts at which a running request is re-predicted from its first tokens.
CHECKPOINTS = (8, 16, 24, 32, 48, 64)


def last_checkpoint(k: int) -> int:
    """The last of ``CHECKPOINTS`` at or below ``k`` generated tokens (0: none yet)."""
    return max((c for c in CHECKPOINTS if c <= k), default=0)


@dataclass
class PredictInput:
    """One request as the predictor sees it."""

    app_text: str  # instruction / system prompt ("" if none)
    user_text: str  # user input
    input_tokens: int  # user input length in the served model's tokens
    max_tokens: int  # the request's limit (cold-start fallback uses it)


@dataclass(frozen=True)
class Prediction:
    """A predicted generation length."""

    tokens: int  # point estimate G'(p), >= 1, NOT capped (the scheduler caps by max_tokens)
    high: int  # high quantile (>= tokens)
    source: str  # "mixture" | "probe" | "forest" (the paper form) | "repredicted" | "app_median" | "max_tokens" | "oracle" | "noisy" | "file" (simulator)
    p_runaway: float | None = None  # probability that it runs to max_tokens (None: not estimated)
