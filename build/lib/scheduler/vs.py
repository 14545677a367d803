"""VS: the paper's vanilla baseline, first-come-first-served with a fixed batch size."""

from __future__ import annotations

from collections import deque

from scheduler.batch import Batch
from scheduler.policy import Policy
from scheduler.request import Request
from scheduler.waitqueue import PriorityQueue


class VanillaPolicy(Policy):
    """FCFS, fixed batch size; a partial batch is dispatched once its oldest request has waited
    ``max_wait`` seconds (or at once when ``max_wait`` is 0).

    Priority: the queue is ordered by ``(priority, arrival)`` and a batch takes the best
    ``batch_size`` requests. The wait that releases a partial batch is the oldest request's, of
    any priority (a partial batch takes everyone waiting anyway). OOM halves and a dead worker's
    batch go before everything, whatever their priority: they were dispatched already.
    """

    name = "vs"

    def __init__(self, batch_size: int = 8, max_wait: float = 0.05) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.batch_size = batch_size
        self.max_wait = max_wait
        self._queue = PriorityQueue()
        self._requeued: deque[Batch] = deque()  # OOM halves go first, as they are the oldest

    def on_arrival(self, req: Request, now: float) -> None:
        self._queue.append(req)

    def requeue(self, batch: Batch, now: float) -> None:
        self._requeued.append(batch)

    def next_batch(self, worker: int, now: float) -> Batch | None:
        if self._requeued:
            return self._requeued.popleft()
        if not self._queue:
            return None
        full = len(self._queue) >= self.batch_size
        if not full and now < self._queue.oldest_arrival() + self.max_wait:
            return None
        reqs = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
        return Batch(requests=reqs, created=now)

    def next_wakeup(self, now: float) -> float | None:
        if self._requeued:
            return now
        if not self._queue:
            return None
        if len(self._queue) >= self.batch_size:
            return now
        return self._queue.oldest_arrival() + self.max_wait

    def cancel(self, request_id: str, now: float) -> bool:
        if self._queue.remove(request_id) is not None:
            return True
        for b in self._requeued:
            for i, r in enumerate(b.requests):
                if r.id == request_id:
                    del b.requests[i]
                    if not b.requests:
                        self._requeued.remove(b)
                    return True
        return False

    def waiting(self) -> int:
        return len(self._queue) + sum(b.size for b in self._requeued)

    def waiting_tokens(self) -> int:
        reqs = list(self._queue) + [r for b in self._requeued for r in b.requests]
        return sum(r.prompt_tokens + r.max_tokens for r in reqs)


class VSQPolicy(VanillaPolicy):
    """VSQ: VS serving a 4-bit quantized model. Quantization is a worker setting
    (``quantize_bits`` tells the service which); the freed weight memory (~12.4 GB -> ~3.1 GB of
    weights for ChatGLM-6B) goes to the KV cache, hence the larger default batch size."""

    name = "vsq"
    quantize_bits = 4  # 4-bit on CUDA; the nearest stand-in on CPU is int8 (the service picks)

    def __init__(self, batch_size: int = 16, max_wait: float = 0.05) -> None:
        super().__init__(batch_size=batch_size, max_wait=max_wait)
