"""The predictive policies of DESIGN §3: GLP, ABP and Magnus.

All three place arrivals with the WMA assembler (predicted lengths, capped by ``max_tokens``):

* GLP: fixed batch size (``batch_size`` caps every batch), FCFS dispatch by earliest arrival;
* ABP: batch size bounded by memory (``MEM(B) <= Theta``) and a sanity cap, FCFS dispatch;
* Magnus: ABP + batch-time estimator + HRRN dispatch.

A waiting batch is dispatchable as soon as a worker is idle (as in the paper). With
``min_wait > 0`` a batch that is not full waits until its oldest request has waited that long,
so companions can join; a full or requeued (OOM half) batch is always dispatchable.

Priority (``Request.priority``, lower first): a waiting batch holds requests of one priority (the
assembler places a request only among batches of its own priority), and the batch dispatched is
chosen by the policy's own rule among the dispatchable batches of the best priority among them.
A better-priority batch still gathering companions (``min_wait``) does not keep a worker idle:
a dispatchable worse-priority batch goes meanwhile. A requeued OOM half keeps its priority.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scheduler.batch import Batch, BatchOutcome
from scheduler.costmodel import default_memory
from scheduler.estimator import BatchTimeEstimator
from scheduler.hrrn import pick_hrrn
from scheduler.memory import MemoryModel
from scheduler.policy import Policy
from scheduler.request import Request
from scheduler.wma import DEFAULT_PHI, WaitingBatch, WmaAssembler

#: A sanity cap for the adaptive policies (memory is the real bound).
DEFAULT_MAX_BATCH_SIZE = 256


class PredictivePolicy(Policy):
    """WMA assembly plus a dispatch order (FCFS here; HRRN in Magnus)."""

    name = "predictive"
    needs_prediction = True

    def __init__(
        self,
        *,
        phi: float = DEFAULT_PHI,
        memory: MemoryModel | None = None,
        max_batch_size: int | None = DEFAULT_MAX_BATCH_SIZE,
        min_wait: float = 0.0,
    ) -> None:
        if min_wait < 0:
            raise ValueError("min_wait must be >= 0")
        self.assembler = WmaAssembler(phi=phi, memory=memory, max_batch_size=max_batch_size)
        self.min_wait = min_wait

    @property
    def phi(self) -> float:
        return self.assembler.phi

    @property
    def memory(self) -> MemoryModel | None:
        return self.assembler.memory

    @property
    def max_batch_size(self) -> int | None:
        return self.assembler.max_batch_size

    def set_worker(self, worker: int, kind: str | None = None, theta: float | None = None) -> None:
        """Batches are assembled before a worker takes them: under the smallest worker's Theta."""
        mem = self.assembler.memory
        if theta is not None and mem is not None and theta < mem.theta:
            self.assembler.memory = dataclasses.replace(mem, theta=theta)

    def on_arrival(self, req: Request, now: float) -> None:
        self.assembler.place(req, now)

    def _full(self, b: WaitingBatch) -> bool:
        cap = self.assembler.max_batch_size
        return b.sealed or (cap is not None and b.size >= cap)

    def _ready(self, b: WaitingBatch, now: float) -> bool:
        return self._full(b) or now >= b.since + self.min_wait

    def _choose(self, ready: Sequence[WaitingBatch], now: float) -> WaitingBatch:
        """FCFS: the batch holding the earliest arrival (``ready``: dispatchable, one priority)."""
        return min(ready, key=lambda b: (b.since, b.id))

    def next_batch(self, worker: int, now: float) -> Batch | None:
        batches = self.assembler.batches.values()
        if self.min_wait > 0:
            ready = [b for b in batches if self._ready(b, now)]
        else:
            ready = list(batches)
        if not ready:
            return None
        best = min(b.priority for b in ready)
        chosen = self._choose([b for b in ready if b.priority == best], now)
        return self.assembler.pop(chosen.id).to_batch()

    def next_wakeup(self, now: float) -> float | None:
        batches = self.assembler.batches.values()
        if not batches:
            return None
        if self.min_wait <= 0:
            return now
        earliest = math.inf
        for b in batches:
            if self._full(b):
                return now
            earliest = min(earliest, b.since + self.min_wait)
        return max(earliest, now)

    def requeue(self, batch: Batch, now: float) -> None:
        """Requeue as a sealed batch (no new members: it already ran out of memory once);
        arrival times are the requests' own, so T_w keeps counting. Its priority is its members'
        (the best of them, should a batch ever mix priorities)."""
        half = WaitingBatch(list(batch.requests), batch.created, batch.id, batch.retries, sealed=True,
                            priority=min((r.priority for r in batch.requests), default=0))
        self.assembler.insert(half)

    def cancel(self, request_id: str, now: float) -> bool:
        return self.assembler.cancel(request_id) is not None

    def waiting(self) -> int:
        return self.assembler.n_requests

    def waiting_tokens(self) -> int:
        return self.assembler.tokens

    def waiting_batches(self) -> list[Batch]:
        """Snapshot of the waiting queue (for metrics and tests)."""
        return [b.to_batch() for b in self.assembler.batches.values()]


class GLPPolicy(PredictivePolicy):
    """GLP: VS + length predictor + WMA assembler, fixed batch size, FCFS dispatch.
    ``memory`` is optional (the fixed size is what keeps VS-like policies within memory)."""

    name = "glp"

    def __init__(
        self,
        batch_size: int = 8,
        *,
        phi: float = DEFAULT_PHI,
        memory: MemoryModel | None = None,
        min_wait: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        super().__init__(phi=phi, memory=memory, max_batch_size=batch_size, min_wait=min_wait)
        self.batch_size = batch_size


class ABPPolicy(PredictivePolicy):
    """ABP: GLP with adaptive, memory-bounded batch size (``memory`` defaults to the paper's
    setup, see :func:`default_memory`), FCFS dispatch."""

    name = "abp"

    def __init__(
        self,
        *,
        phi: float = DEFAULT_PHI,
        memory: MemoryModel | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        min_wait: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        super().__init__(
            phi=phi, memory=memory if memory is not None else default_memory(),
            max_batch_size=max_batch_size, min_wait=min_wait,
        )


class MagnusPolicy(ABPPolicy):
    """Magnus: ABP + batch-time estimator + HRRN dispatch. ``estimator`` defaults to a
    :class:`BatchTimeEstimator` with the paper-setup cost model as cold-start prior."""

    name = "magnus"
    uses_estimator = True

    def __init__(
        self,
        *,
        phi: float = DEFAULT_PHI,
        memory: MemoryModel | None = None,
        estimator: BatchTimeEstimator | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        min_wait: float = 0.0,
    ) -> None:
        super().__init__(phi=phi, memory=memory, max_batch_size=max_batch_size, min_wait=min_wait)
        self.estimator = estimator if estimator is not None else BatchTimeEstimator()
        self._tp: dict[int, tuple[tuple, float]] = {}  # batch id -> (key, T_p)
        self._kind: dict[int, str] = {}  # worker -> its kind, where it reported one
        self._asking: str | None = None  # the kind of the worker that asks for a batch now

    def set_worker(self, worker: int, kind: str | None = None, theta: float | None = None) -> None:
        super().set_worker(worker, kind, theta)
        if kind is not None:
            self._kind[worker] = kind

    def next_batch(self, worker: int, now: float) -> Batch | None:
        """HRRN with the batch times of the asking worker's kind (a slower GPU's batches take longer)."""
        self._asking = self._kind.get(worker)
        return super().next_batch(worker, now)

    def processing_times(self, batches: Sequence[WaitingBatch]) -> list[float]:
        """T_p of each batch on the asking worker's kind, cached per (shape, kind, estimator
        version); misses in one query."""
        est = self.estimator.for_kind(self._asking)
        version = est.version
        out: list[float] = [0.0] * len(batches)
        miss: list[int] = []
        for i, b in enumerate(batches):
            hit = self._tp.get(b.id)
            if hit is not None and hit[0] == (b.size, b.max_prompt, b.max_gen, self._asking, version):
                out[i] = hit[1]
            else:
                miss.append(i)
        if miss:
            shapes = [(batches[i].size, batches[i].max_prompt, batches[i].max_gen) for i in miss]
            for i, tp in zip(miss, est.estimate_many(shapes), strict=True):
                b = batches[i]
                out[i] = tp
                self._tp[b.id] = ((b.size, b.max_prompt, b.max_gen, self._asking, version), tp)
        if len(self._tp) > 2 * len(self.assembler.batches) + 64:  # forget dispatched/cancelled ones
            live = self.assembler.batches
            self._tp = {k: v for k, v in self._tp.items() if k in live}
        return out

    def _choose(self, ready: Sequence[WaitingBatch], now: float) -> WaitingBatch:
        chosen = pick_hrrn(ready, self.processing_times, now)
        assert chosen is not None
        return chosen

    def on_batch_done(self, outcome: BatchOutcome, now: float) -> None:
        est = self.estimator.for_kind(None if outcome.worker is None else self._kind.get(outcome.worker))
        est.record(outcome, now)
        est.maybe_update(now)
