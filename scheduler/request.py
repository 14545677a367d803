"""The one request record: from the HTTP edge (or the simulator's trace) through the scheduling core
to the worker's outcome. Times are seconds on the core's clock (server: monotonic; simulator:
virtual); the caller converts when it needs wall-clock times."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from predictor.types import Prediction


class RequestStatus(enum.IntEnum):
    """Ordered like vLLM v1's: everything above RUNNING is finished."""

    WAITING = 0  # in the policy's queue (also after an OOM split or a worker death)
    RUNNING = 1  # dispatched to a worker
    FINISHED_STOPPED = 2  # ended by an end token or a stop string
    FINISHED_LENGTH = 3  # reached its max_tokens
    FINISHED_ABORTED = 4  # the client went away
    FINISHED_ERROR = 5  # failed: see ``Request.failure``

    @property
    def finished(self) -> bool:
        return self > RequestStatus.RUNNING


class FailureCode(enum.StrEnum):
    """Why a request failed (FINISHED_ERROR); the HTTP edge maps each to its status code."""

    INSUFFICIENT_MEMORY = "insufficient_memory"  # does not fit in a worker even alone
    WORKER_FAILED = "worker_failed"  # its worker died twice while running it
    GENERATION_FAILED = "generation_failed"  # the worker raised while running its batch
    TIMEOUT = "request_timeout"  # past the server's request timeout
    SHUTTING_DOWN = "shutting_down"  # still waiting when the server stopped
    RETRY_DIVERGED = "retry_diverged"  # a retried batch did not reproduce the text already streamed


@dataclass(frozen=True)
class Failure:
    """What went wrong with a failed request."""

    code: FailureCode
    message: str  # for the client and the log


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when its text ends (besides max_tokens)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # fixed per request so a retried batch reproduces the same text
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    presence_penalty: float = 0.0  # OpenAI: minus this once a token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt and output tokens divided (>0) or multiplied (<0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # end tokens and stop_token_ids are masked until this many were generated
    ignore_eos: bool = False  # an end token does not end the row (benchmarks' fixed lengths)
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the row (finish_reason "stop")
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely ones

    @property
    def processed(self) -> bool:
        """True when the logits are changed before sampling (penalties, bias, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


@dataclass(eq=False)
class Request:
    """One request: what was asked, what was predicted, and what happened to it."""

    id: str
    prompt_tokens: int  # L(p): prompt length in the served model's tokens
    max_tokens: int  # the request's own generation limit
    arrival: float  # when the core received it (HRRN's T_w counts from here)
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # empty in the simulator
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prediction: Prediction | None = None  # from the length predictor (predictive policies only)
    app_text: str = field(default="", repr=False)  # application-level text (instruction / system prompt)
    user_text: str = field(default="", repr=False)  # user-level text
    input_tokens: int = 0  # the user text's length in tokens (a predictor feature)
    priority: int = 0  # as vLLM: lower is served earlier; within a priority the policy's own order
    true_tokens: int | None = None  # the true generation length: only the simulator knows it up front
    # -- what happened (set by the core, and by its driver for the first token) --
    status: RequestStatus = RequestStatus.WAITING
    dispatched_at: float | None = None  # first dispatch to a worker
    first_token_at: float | None = None
    finished_at: float | None = None
    batch_id: int | None = None  # the batch it last ran in
    worker: int | None = None  # the worker it last ran on
    output_tokens: int = 0  # generated tokens, up to and including its end
    finish_reason: str | None = None  # "stop" | "length" when it completed
    failure: Failure | None = None  # when FINISHED_ERROR
    # -- continuous policies: progress while running, and preemption --
    generated: int = 0  # tokens generated so far (a continuous worker's last progress report)
    looping: bool = False  # the worker's repetition-loop detector fired
    resume_ids: list[int] = field(default_factory=list, repr=False)  # tokens kept across a preemption
    preemptions: int = 0  # times it was preempted (put back to wait while running)
    head_ids: list[int] = field(default_factory=list, repr=False)  # its first generated tokens, as reported
    reprediction: Prediction | None = None  # re-estimated from head_ids while it runs (total length)
    # the worker's head states by checkpoint (re-prediction reads the last; the predictor learns from all)
    head_states: dict[int, list[float]] = field(default_factory=dict, repr=False)

    @property
    def head_state(self) -> list[float] | None:
        """The head state of the last checkpoint reported (None: none yet)."""
        return self.head_states[max(self.head_states)] if self.head_states else None

    @property
    def estimate(self) -> Prediction | None:
        """The latest prediction: re-predicted while running when there is one, else the arrival one."""
        return self.reprediction or self.prediction

    @property
    def predicted_tokens(self) -> int | None:
        return None if self.prediction is None else self.prediction.tokens

    @property
    def predicted_high(self) -> int | None:
        return None if self.prediction is None else self.prediction.high

    @property
    def gen_estimate(self) -> int:
        """G(p) used for assembling: the prediction capped by max_tokens, else max_tokens."""
        if self.prediction is None:
            return self.max_tokens
        return max(1, min(self.prediction.tokens, self.max_tokens))
