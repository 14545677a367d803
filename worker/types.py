"""The narrow worker interface: a batch of requests in, per-request results and batch stats out.

Everything here is plain picklable data so a worker can sit in another process (or host).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenRequest:
    """One request of a static batch."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenBatch:
    """A static batch to run."""

    batch_id: int
    requests: list[GenRequest]


@dataclass
class TokenEvent:
    """Streamed while a batch runs: new text for one request (first one marks its first token)."""

    request_id: str
    text: str
    time: float  # wall clock (time.time()) on the worker


@dataclass
class GenResult:
    """The final outcome of one request."""

    id: str
    text: str
    completion_tokens: int  # valid generated tokens (up to and including its end)
    finish_reason: str  # "stop" | "length"
    first_token_time: float | None  # wall clock


@dataclass
class BatchStats:
    """Per-batch statistics (logged and fed to the batch-time estimator)."""

    batch_id: int
    size: int
    max_prompt: int  # L(B): longest prompt, tokens
    max_gen: int  # longest generation in the batch, tokens
    prefill_s: float
    decode_s: float
    valid_tokens: int  # tokens returned to users
    total_tokens: int  # size * decode steps: every token computed, wasted ones included
    peak_mem_bytes: int | None = None  # device peak during the batch, where measurable
    oom: bool = False
    start_time: float = 0.0  # wall clock
    end_time: float = 0.0


@dataclass
class BatchDone:
    """The worker's answer for a batch: results (empty on OOM) and stats."""

    batch_id: int
    results: list[GenResult]
    stats: BatchStats | None  # None when the batch failed before it ran
    error: str | None = None  # "oom: ..." or another failure message
