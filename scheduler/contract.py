"""The worker contract: what a dispatched batch carries to a worker and what the worker sends back.

Plain picklable data, so a worker can sit in another process or on another host. The server's
workers (``worker/``) and the simulator's cost-model workers produce the same records, and the
scheduling core (``scheduler.core``) consumes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from predictor.types import CHECKPOINTS
from scheduler.request import Request, SamplingParams

#: How many first generated tokens a continuous worker reports for re-prediction.
HEAD_IDS = CHECKPOINTS[-1]


@dataclass
class WorkItem:
    """One row of a batch: everything a worker needs to generate for one request."""

    request_id: str  # the request's id, echoed in every output about it
    prompt_ids: list[int]  # prompt token ids of the served model
    max_tokens: int  # the row ends after this many generated tokens
    sampling: SamplingParams  # temperature, top_p, seed and stop strings
    resume_ids: list[int] = field(default_factory=list)  # tokens generated before a preemption (continued, not redone)

    @classmethod
    def of(cls, req: Request) -> WorkItem:
        return cls(req.id, req.prompt_ids, req.max_tokens, req.sampling, list(req.resume_ids))


@dataclass
class WorkBatch:
    """A batch to run: a static batch (rows decoded together), or requests joining a continuous worker."""

    batch_id: int  # the scheduler's batch id, echoed in the BatchOutput
    items: list[WorkItem]  # the rows, in the order the policy gave them


@dataclass
class TokenLogprob:
    """One generated token's log-probability (of the model's raw distribution, as vLLM's default)."""

    token_id: int
    token: str  # the token decoded alone
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # the k most likely: (id, text, logprob)


@dataclass
class TokenEvent:
    """Streamed while a batch runs: new text of one request (its first one marks the first token)."""

    request_id: str  # which request the text belongs to
    text: str  # the new characters (a possible stop-string prefix is held back until resolved)
    time: float  # when it was produced: wall clock (time.time()) of the worker
    offset: int = 0  # where ``text`` starts in the request's whole text (a resumed row continues, a retry restarts)
    tokens: int = 0  # generated tokens since the row's previous event (inter-token latency)
    token_offset: int = 0  # index of this event's first new token in the request's output
    logprobs: list[TokenLogprob | None] | None = None  # the new tokens', when asked (None: replayed ones)


@dataclass
class RowOutput:
    """The final outcome of one row."""

    request_id: str  # which request
    text: str  # the whole generated text, cut at a stop string
    output_tokens: int  # generated tokens, up to and including its end
    finish_reason: str  # "stop" (end token or stop string) | "length" (max_tokens)
    first_token_time: float | None  # wall clock of the first generated token
    logprobs: list[TokenLogprob | None] | None = None  # every generated token's, when asked (None: replayed)
    head_ids: list[int] = field(default_factory=list)  # its first HEAD_IDS tokens: the re-predictor learns from them


@dataclass
class BatchStats:
    """Per-batch statistics: logged, and fed to the batch-time estimator."""

    batch_id: int  # the batch they describe
    size: int  # rows in the batch
    max_prompt: int  # L(B): longest prompt, tokens
    max_gen: int  # longest generation in the batch, tokens
    prefill_s: float  # seconds of the prompt forward pass
    decode_s: float  # seconds of the decode steps
    valid_tokens: int  # tokens returned to users
    total_tokens: int  # every token computed, wasted ones (padding rows, post-end) included
    peak_mem_bytes: int | None = None  # device peak during the batch, where measurable
    oom: bool = False  # the batch ran out of memory
    start_time: float = 0.0  # wall clock on the worker
    end_time: float = 0.0  # wall clock on the worker


@dataclass
class RowProgress:
    """A continuous worker's periodic report on a running row (re-prediction while decoding)."""

    request_id: str
    generated: int  # tokens generated so far (resumed ones included)
    looping: bool  # the repetition-loop detector fired: the row will likely run to max_tokens
    head_ids: list[int] = field(default_factory=list)  # its first HEAD_IDS tokens, sent while it has few more
    # its head state at the last re-prediction checkpoint it reached (``worker.iteration``'s
    # ``state_layer``), sent once; None: none new
    state: list[float] | None = None


@dataclass
class Preempted:
    """A row a continuous worker dropped on the scheduler's order (or on running out of memory):
    its request waits again and later continues from ``generated_ids``."""

    request_id: str
    generated_ids: list[int]  # every token generated so far
    oom: bool = False  # dropped because the worker ran out of memory, not on order


class Outcome(enum.Enum):
    """How a batch ended on its worker."""

    OK = "ok"  # every row has its RowOutput
    OOM = "oom"  # out of memory: no rows; the scheduler splits and retries
    ERROR = "error"  # any other failure: no rows; its requests fail


@dataclass
class BatchOutput:
    """The worker's answer for one batch (a continuous worker answers per request, as a batch of one)."""

    batch_id: int  # the WorkBatch it answers
    outcome: Outcome  # OK, OOM or ERROR
    rows: list[RowOutput]  # one per row when OK, else empty
    stats: BatchStats | None  # None when the batch failed before it ran
    error: str | None = None  # the failure's message (a traceback for ERROR)
