"""CCB: conservative continuous batching (DESIGN §3), the iteration-level baseline.

The batching itself lives in the worker: it runs its admitted requests continuously, adding a
request to the running set between decode steps and removing each one as it ends. The policy
is FCFS and hands out single requests (``Batch`` of size 1); it admits one to a worker only if
the memory reserved for ``prompt + max_tokens`` of every request admitted there still fits
(:class:`CCBAdmission`) -- conservative because it reserves the maximum generation length.

Priority: the queue is ordered by ``(priority, arrival)``; the head-of-line rule holds for the
best request (a better-priority request that does not fit yet blocks the worse ones too).

Contract with the worker: call ``next_batch(worker, now)`` whenever it could take another
request (not only when idle); report each finished request with ``on_batch_done`` (its
reservation is then released) or ``on_batch_oom``.
"""

from __future__ import annotations

from scheduler.batch import Batch, BatchOutcome
from scheduler.costmodel import default_memory
from scheduler.memory import MemoryModel
from scheduler.policy import Policy
from scheduler.request import Request
from scheduler.waitqueue import PriorityQueue


class CCBAdmission:
    """Memory reservations of one worker: ``(prompt + max_tokens) * delta`` per admitted request."""

    def __init__(self, theta: float, delta: float, max_running: int | None = None) -> None:
        if theta <= 0 or delta <= 0:
            raise ValueError("theta and delta must be positive")
        self.theta = theta
        self.delta = delta
        self.max_running = max_running
        self.reserved: dict[str, float] = {}  # request id -> bytes
        self.used = 0.0

    def need(self, req: Request) -> float:
        """Bytes reserved for ``req``: its prompt plus its whole generation limit."""
        return (req.prompt_tokens + req.max_tokens) * self.delta

    def can_admit(self, req: Request) -> bool:
        if self.max_running is not None and len(self.reserved) >= self.max_running:
            return False
        return self.used + self.need(req) <= self.theta

    def admit(self, req: Request) -> bool:
        """Reserve memory for ``req`` if it fits; True when admitted."""
        if not self.can_admit(req):
            return False
        b = self.need(req)
        self.reserved[req.id] = b
        self.used += b
        return True

    def force(self, req: Request) -> None:
        """Admit regardless of memory (a request too large even for an empty worker runs alone)."""
        b = self.need(req)
        self.reserved[req.id] = b
        self.used += b

    def release(self, request_id: str) -> bool:
        b = self.reserved.pop(request_id, None)
        if b is None:
            return False
        self.used -= b
        if not self.reserved:
            self.used = 0.0  # no float drift when empty
        return True

    @property
    def running(self) -> int:
        return len(self.reserved)


class CCBPolicy(Policy):
    """FCFS (within a priority) single-request hand-out with conservative per-worker memory admission."""

    name = "ccb"
    continuous = True
    runner = "transformers"

    def __init__(self, memory: MemoryModel | None = None, max_batch_size: int = 256) -> None:
        """``max_batch_size``: the most requests running at once on a worker."""
        if memory is None:
            memory = default_memory()
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.memory = memory
        self.max_running = max_batch_size
        self._queue = PriorityQueue()
        self._admission: dict[int, CCBAdmission] = {}
        self._worker_of: dict[str, int] = {}  # running request id -> worker

    def set_worker(self, worker: int, kind: str | None = None, theta: float | None = None) -> None:
        """Each worker admits within its own Theta (the workers of a cluster may differ)."""
        if theta is not None:
            self.admission(worker).theta = theta

    def admission(self, worker: int) -> CCBAdmission:
        """The worker's reservations (created on first use)."""
        adm = self._admission.get(worker)
        if adm is None:
            adm = CCBAdmission(self.memory.theta, self.memory.delta, self.max_running)
            self._admission[worker] = adm
        return adm

    def on_arrival(self, req: Request, now: float) -> None:
        self._queue.append(req)

    def next_batch(self, worker: int, now: float) -> Batch | None:
        head = self._queue.head()  # strict FCFS: no overtaking of a head that does not fit yet
        if head is None:
            return None
        adm = self.admission(worker)
        if not adm.admit(head):
            if adm.running or adm.need(head) <= adm.theta:
                return None
            adm.force(head)  # can never fit: run alone, the worker's OOM report fails it
        self._queue.popleft()
        self._worker_of[head.id] = worker
        return Batch(requests=[head], created=now)

    def next_wakeup(self, now: float) -> float | None:
        head = self._queue.head()
        if head is None:
            return None
        if not self._admission or any(a.can_admit(head) or not a.running for a in self._admission.values()):
            return now
        return None  # a completion (on_batch_done) frees memory first

    def release(self, request_id: str) -> bool:
        """Free a running request's reservation (finished, failed or cancelled mid-run)."""
        worker = self._worker_of.pop(request_id, None)
        return worker is not None and self.admission(worker).release(request_id)

    def on_batch_done(self, outcome: BatchOutcome, now: float) -> None:
        for r in outcome.batch.requests:
            self.release(r.id)

    def on_batch_failed(self, batch: Batch, now: float) -> None:
        for r in batch.requests:
            self.release(r.id)

    def on_batch_oom(self, batch: Batch, now: float) -> list[Request]:
        for r in batch.requests:
            self.release(r.id)
        return super().on_batch_oom(batch, now)

    def requeue(self, batch: Batch, now: float) -> None:
        """Back to the head of their priorities, oldest first (they arrived before anything waiting)."""
        for r in batch.requests:
            self.release(r.id)
        for r in sorted(batch.requests, key=lambda r: r.arrival, reverse=True):
            self._queue.appendleft(r)

    def cancel(self, request_id: str, now: float) -> bool:
        return self._queue.remove(request_id) is not None

    def waiting(self) -> int:
        return len(self._queue)

    def waiting_tokens(self) -> int:
        return sum(r.prompt_tokens + r.max_tokens for r in self._queue)
