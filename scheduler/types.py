"""Records the scheduling core works on: pure data, no clocks, no threads."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_batch_ids = itertools.count(1)


def new_batch_id() -> int:
    """A process-unique, increasing batch id."""
    return next(_batch_ids)


@dataclass
class SchedRequest:
    """One request as the scheduler sees it.

    Times are seconds on whatever clock the caller passes in (server: monotonic; simulator: virtual).
    """

    id: str
    prompt_tokens: int  # L(p): prompt length in tokens of the served model
    max_tokens: int  # the request's own generation limit
    arrival: float  # when it arrived (the waiting time counts from here)
    predicted_tokens: int | None = None  # G'(p) from the length predictor, None when no prediction
    predicted_high: int | None = None  # a high quantile of G'(p), when the predictor gives one
    app: str = ""  # application-level text (instruction / system prompt); informational
    true_tokens: int | None = None  # the true generation length; only the simulator knows it up front

    @property
    def gen_estimate(self) -> int:
        """G(p) used for assembling: the prediction capped by max_tokens, else max_tokens."""
        if self.predicted_tokens is None:
            return self.max_tokens
        return max(1, min(self.predicted_tokens, self.max_tokens))


@dataclass
class Batch:
    """A waiting or running static batch."""

    requests: list[SchedRequest]
    created: float  # when the batch was opened
    id: int = field(default_factory=new_batch_id)
    retries: int = 0  # how many times this batch (or its parent) was split after an OOM

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def max_prompt(self) -> int:
        """L(B)."""
        return max((r.prompt_tokens for r in self.requests), default=0)

    @property
    def max_gen(self) -> int:
        """G(B) from predicted lengths (capped by each request's max_tokens)."""
        return max((r.gen_estimate for r in self.requests), default=0)

    @property
    def max_tokens(self) -> int:
        """The most any request in the batch may generate."""
        return max((r.max_tokens for r in self.requests), default=0)

    @property
    def waiting_since(self) -> float:
        """Earliest arrival in the batch: HRRN's T_w counts from here."""
        return min((r.arrival for r in self.requests), default=self.created)


@dataclass
class BatchOutcome:
    """What the worker reports back for a finished batch (fed to the learners)."""

    batch: Batch
    true_gen: dict[str, int]  # request id -> generated tokens
    duration: float  # seconds from dispatch to the end of the batch
    prefill_s: float = 0.0
    decode_s: float = 0.0
