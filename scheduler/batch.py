"""Batches: what a policy groups requests into, and what a finished one reports to the learners."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from scheduler.request import Request

_batch_ids = itertools.count(1)


def new_batch_id() -> int:
    """A process-unique, increasing batch id."""
    return next(_batch_ids)


def continue_batch_ids_after(last: int) -> None:
    """Make the next batch ids larger than ``last`` (a restarted server appending to a request log
    that already holds batches up to ``last`` must not reuse, and so overwrite, their ids)."""
    global _batch_ids
    nxt = next(_batch_ids)
    _batch_ids = itertools.count(max(nxt, last + 1))


@dataclass
class Batch:
    """A waiting or running static batch."""

    requests: list[Request]
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
    worker: int | None = None  # the worker that ran it
