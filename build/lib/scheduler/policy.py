"""The policy interface the service (and the simulator) calls."""

from __future__ import annotations

from abc import ABC, abstractmethod

from scheduler.batch import Batch, BatchOutcome
from scheduler.request import Request


class Policy(ABC):
    """A batching/scheduling policy. Pure: time is always passed in, nothing runs on its own.

    Its caller is ``scheduler.core.SchedulerCore``: ``on_arrival`` for each request; whenever a
    worker is idle, ``next_batch``; when a batch finishes, ``on_batch_done``; when it runs out of
    memory, ``on_batch_oom`` (the policy decides whether to split and requeue).
    ``next_wakeup`` tells the caller when to call ``next_batch`` again even if nothing arrives
    (e.g. a partial batch whose maximum wait expires).
    """

    name: str = "base"
    #: the caller must set ``Request.prediction`` before ``on_arrival``
    needs_prediction: bool = False
    #: the policy's workers are iteration-level (requests join and leave between decode steps)
    continuous: bool = False
    #: the worker mode it runs on: "static" batches, transformers' continuous batching
    #: ("transformers"), or magnus' own iteration-level runner ("iteration")
    runner: str = "static"
    #: the policy serves a model with weights quantized to this many bits (None: as loaded)
    quantize_bits: int | None = None
    #: the policy takes a batch-time estimator (``estimator=`` in its constructor)
    uses_estimator: bool = False

    @abstractmethod
    def on_arrival(self, req: Request, now: float) -> None:
        """A request arrived."""

    @abstractmethod
    def next_batch(self, worker: int, now: float) -> Batch | None:
        """Worker ``worker`` is idle: the batch it should run now, or None to wait."""

    def set_worker(self, worker: int, kind: str | None = None, theta: float | None = None) -> None:
        """A worker has loaded: its ``kind`` (a device name; a policy with a batch-time estimator
        learns each kind's batch times apart) and its own KV budget ``theta`` in bytes (the workers
        of a cluster may differ). Default: ignored."""
        return None

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time at which ``next_batch`` may return a batch with no new arrival."""
        return None

    def on_batch_done(self, outcome: BatchOutcome, now: float) -> None:
        """A batch finished; learners may use its true lengths and time."""
        return None

    def on_batch_oom(self, batch: Batch, now: float) -> list[Request]:
        """A batch ran out of memory. Requeue what can be retried; return the requests that
        must fail (default: split in halves and requeue; a lone request fails)."""
        if batch.size <= 1:
            return list(batch.requests)
        half = batch.size // 2
        for part in (batch.requests[:half], batch.requests[half:]):
            self.requeue(Batch(requests=part, created=batch.created, retries=batch.retries + 1), now)
        return []

    def on_batch_failed(self, batch: Batch, now: float) -> None:
        """A batch failed for a reason other than memory; its requests are failed by the caller."""
        return None

    def on_progress(self, worker: int, running: list[Request], now: float) -> list[Request]:
        """Continuous workers: ``running`` requests' ``generated``/``looping`` were just updated.
        Return the requests to preempt (default: none)."""
        return []

    def on_preempted(self, reqs: list[Request], worker: int, oom: bool, now: float) -> None:
        """A continuous worker dropped running requests (on order, or all of them on ``oom``):
        they wait again and keep their arrival times. Default: requeue each alone."""
        for r in reqs:
            self.requeue(Batch(requests=[r], created=now), now)

    @abstractmethod
    def requeue(self, batch: Batch, now: float) -> None:
        """Put a batch back into the waiting queue, keeping its requests' arrival times."""

    @abstractmethod
    def cancel(self, request_id: str, now: float) -> bool:
        """Remove a waiting request; True if it was waiting (and is now gone)."""

    @abstractmethod
    def waiting(self) -> int:
        """Number of waiting requests."""

    def waiting_tokens(self) -> int:
        """Prompt plus max tokens of all waiting requests (for backpressure)."""
        return 0
