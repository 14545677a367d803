"""PCB: predictive continuous batching (issue 13), the iteration-level policy that uses predicted lengths.

* **Admission by predicted memory.** A running request reserves ``(prompt + R) * Delta`` with
  ``R`` its reserved generation: the predictor's calibrated high estimate (``reserve="high"``,
  default), the point estimate (``"point"``) or ``max_tokens`` (``"max"``: CCB's conservative
  rule), capped by ``max_tokens``. CCB reserves ``max_tokens`` for everyone, so more requests
  run at once here.
* **Growth and preemption.** The worker reports every running row's progress every few steps
  (tokens so far, and a repetition-loop flag). A row past its reservation (or looping) grows it
  to ``max_tokens``; when the reservations of a worker then exceed Theta, the running request
  with the most predicted remaining work is preempted: it waits again with its arrival time
  kept and later continues from the tokens it had (its prompt and those tokens are prefilled
  again, "recompute"; nothing is lost and no out-of-memory error reaches the client). A real
  out-of-memory on the worker preempts its rows the same way and lowers that worker's budget.
* **Order by predicted remaining service time, with aging.** Waiting requests are admitted by
  highest response ratio ``(W + S) / S`` (HRRN), ``S`` the predicted remaining decode tokens plus
  a prefill share, ``W`` the wait converted to tokens by the measured time per output token of a
  running request; a request waiting longer than ``starvation_s`` goes first and is not
  overtaken. The running set is capped at ``max_batch_size`` (where the machine's throughput
  stops rising, a setting), so that a queue exists to order under load.
* **Re-prediction while decoding.** The latest estimate is the re-predictor's (from the first 8 to
  64 generated tokens, ``predictor.repredict``, when the model has one), else the arrival one.
  Remaining work = point - generated while below the point estimate, then high - generated, then
  ``max_tokens - generated``; a looping row counts as a runaway (``max_tokens - generated``).
  Order-swap preemption: when the running set is full and the best waiting request's predicted
  work is ``swap_factor`` times smaller than a running request's predicted remaining work, that
  running request is preempted (each at most ``max_preemptions`` times).
* **Priority** (``Request.priority``, lower first, as vLLM's): the waiting order is by priority
  first, then the order above within a priority (so the starvation bound holds within a
  priority; better-priority requests always go first, and a starving request does not block
  better-priority ones). Order-swap preemption never moves a running request for a waiting one of
  worse priority; among the running requests it may move (same or worse priority than the best
  waiting one, past the swap threshold) it picks the worst priority, then the most remaining
  work. So a better-priority request displaces a worse-priority running one only through that
  same swap rule (no preemption on priority alone). Memory preemption also picks the worst
  priority first, then the most remaining work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.batch import Batch, BatchOutcome
from scheduler.costmodel import default_memory
from scheduler.hrrn import response_ratio
from scheduler.memory import MemoryModel
from scheduler.policy import Policy
from scheduler.request import Request

RESERVE_MODES = ("high", "point", "max")


def remaining_tokens(r: Request) -> int:
    """Predicted tokens still to generate, given what the request generated so far."""
    g = r.generated
    left = r.max_tokens - g
    est = r.estimate
    if r.looping or est is None:
        return max(left, 1)
    point = min(est.tokens, r.max_tokens)
    high = min(max(est.high, point), r.max_tokens)
    if g < point:
        return point - g
    if g < high:
        return high - g
    return max(left, 1)


@dataclass
class _WorkerBudget:
    """One worker's running requests and their reserved bytes."""

    theta: float
    reserved: dict[str, float] = field(default_factory=dict)  # request id -> bytes
    running: dict[str, Request] = field(default_factory=dict)

    @property
    def used(self) -> float:
        return sum(self.reserved.values())


#: Default running cap per worker, the one every pcb measurement on the development CPU ran at.
#: Throughput still rises past it there (1.36x from 32 to 64 rows, ``bench/results/decode_cap_cpu.md``)
#: at 1.3x the step time: a latency/throughput trade-off, set with ``--max-batch-size``.
MAX_RUNNING = 32
#: On a GPU: vLLM's default ``max_num_seqs``. Not measured on a real GPU here; the simulated V100 and
#: H100 runs (``bench/results/sim_pcb_paper.md``) showed a cap of 32 leaving their throughput unused.
MAX_RUNNING_CUDA = 256


class PredictiveContinuousPolicy(Policy):
    """Length-aware admission, order and preemption for an iteration-level worker."""

    name = "pcb"
    continuous = True
    needs_prediction = True
    runner = "iteration"

    def __init__(
        self,
        memory: MemoryModel | None = None,
        max_batch_size: int = MAX_RUNNING,
        reserve: str = "high",
        starvation_s: float = 300.0,
        swap_factor: float = 8.0,
        max_preemptions: int = 1,
        prefill_weight: float = 0.05,
        tpot_s: float = 0.1,
    ) -> None:
        """``max_batch_size``: most running requests per worker; ``reserve``: high | point | max;
        ``starvation_s``: waiting bound past which a request goes first; ``swap_factor``: order-swap
        preemption threshold (0 disables it); ``prefill_weight``: a prompt token's cost in decode
        tokens for the order; ``tpot_s``: initial time per output token (then measured)."""
        if memory is None:
            memory = default_memory()
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if reserve not in RESERVE_MODES:
            raise ValueError(f"reserve must be one of {RESERVE_MODES}")
        self.memory = memory
        self.max_running = max_batch_size
        self.reserve = reserve
        self.starvation_s = starvation_s
        self.swap_factor = swap_factor
        self.max_preemptions = max_preemptions
        self.prefill_weight = prefill_weight
        self.tpot_s = tpot_s
        self.preempted = 0  # preemptions ordered or suffered, for /metrics
        self._waiting: dict[str, Request] = {}  # insertion order = arrival order of (re)queueing
        self._workers: dict[int, _WorkerBudget] = {}
        self._worker_of: dict[str, int] = {}

    # -- estimates -------------------------------------------------------------------------------
    def reserved_tokens(self, r: Request) -> int:
        """Generation tokens reserved for ``r`` now (at least what it has generated plus a margin)."""
        latest = r.estimate
        if self.reserve == "max" or latest is None or r.looping:
            total = r.max_tokens
        else:
            est = latest.high if self.reserve == "high" else latest.tokens
            total = min(max(est, 1), r.max_tokens)
            if r.generated >= total:
                total = r.max_tokens  # outgrew its estimate: likely a runaway
        return max(total, r.generated + 1)

    def need(self, r: Request) -> float:
        return (r.prompt_tokens + self.reserved_tokens(r)) * self.memory.delta

    def service_tokens(self, r: Request) -> float:
        """Predicted remaining work in decode tokens (the prompt, and tokens to redo, at a share)."""
        return remaining_tokens(r) + self.prefill_weight * (r.prompt_tokens + r.generated)

    def _ratio(self, r: Request, now: float) -> float:
        waited_tokens = (now - r.arrival) / max(self.tpot_s, 1e-6)
        return response_ratio(waited_tokens, self.service_tokens(r))

    def _order(self, now: float) -> list[Request]:
        """Waiting requests, best first: by priority, then within a priority the starving ones
        (oldest first), then by response ratio (ties: the least predicted work)."""
        starving = [r for r in self._waiting.values() if now - r.arrival >= self.starvation_s]
        starving.sort(key=lambda r: r.arrival)
        rest = [r for r in self._waiting.values() if now - r.arrival < self.starvation_s]
        rest.sort(key=lambda r: (-self._ratio(r, now), self.service_tokens(r), r.arrival))
        order = starving + rest
        order.sort(key=lambda r: r.priority)  # stable: each priority keeps the order above
        return order

    # -- policy interface ------------------------------------------------------------------------
    def set_worker(self, worker: int, kind: str | None = None, theta: float | None = None) -> None:
        """Each worker admits within its own Theta (the workers of a cluster may differ)."""
        if theta is not None:
            self.budget(worker).theta = theta

    def budget(self, worker: int) -> _WorkerBudget:
        b = self._workers.get(worker)
        if b is None:
            b = self._workers[worker] = _WorkerBudget(self.memory.theta)
        return b

    def on_arrival(self, req: Request, now: float) -> None:
        self._waiting[req.id] = req

    def _fits(self, b: _WorkerBudget, r: Request) -> bool:
        return len(b.running) < self.max_running and b.used + self.need(r) <= b.theta

    def next_batch(self, worker: int, now: float) -> Batch | None:
        if not self._waiting:
            return None
        b = self.budget(worker)
        for r in self._order(now):
            if self._fits(b, r):
                return self._admit(b, worker, r, now)
            if not b.running and len(b.running) < self.max_running:
                return self._admit(b, worker, r, now)  # too large even alone: runs alone (its OOM fails it)
            if now - r.arrival >= self.starvation_s:
                return None  # a starving request is not overtaken
        return None

    def _admit(self, b: _WorkerBudget, worker: int, r: Request, now: float) -> Batch:
        del self._waiting[r.id]
        b.reserved[r.id] = self.need(r)
        b.running[r.id] = r
        self._worker_of[r.id] = worker
        return Batch(requests=[r], created=now)

    def next_wakeup(self, now: float) -> float | None:
        if not self._waiting:
            return None
        if not self._workers:
            return now
        order = self._order(now)
        for b in self._workers.values():
            if not b.running or any(self._fits(b, r) for r in order[:64]):
                return now
        # nothing fits: a completion or a progress report frees room; a waiting request that
        # becomes starving changes the order, so look again then
        younger = [r.arrival + self.starvation_s for r in order if now - r.arrival < self.starvation_s]
        return min(younger) if younger else None

    def on_progress(self, worker: int, running: list[Request], now: float) -> list[Request]:
        b = self.budget(worker)
        for r in running:
            if r.id in b.reserved:
                b.reserved[r.id] = self.need(r)
        victims: list[Request] = []
        live = [r for r in b.running.values()]
        # memory: preempt the most remaining work until the reservations fit (never the last one)
        while b.used - sum(b.reserved.get(v.id, 0.0) for v in victims) > b.theta and len(live) > 1:
            v = max(live, key=lambda r: (r.priority, remaining_tokens(r), -r.arrival))
            live.remove(v)
            victims.append(v)
        # order: a much shorter waiting request displaces a long-running one of its priority or worse
        if not victims and self.swap_factor > 0 and self._waiting and len(b.running) >= self.max_running:
            best = self._order(now)[0]
            bound = self.swap_factor * self.service_tokens(best)
            movable = [r for r in live if r.preemptions < self.max_preemptions and r.priority >= best.priority
                       and remaining_tokens(r) > bound]
            if movable:
                victims.append(max(movable, key=lambda r: (r.priority, remaining_tokens(r))))
        self.preempted += len(victims)
        return victims

    def on_preempted(self, reqs: list[Request], worker: int, oom: bool, now: float) -> None:
        if oom:  # the worker had less room than Theta said: keep below what ran out
            b = self.budget(worker)
            b.theta = max(min(b.theta, 0.9 * b.used), self.memory.delta)
            self.preempted += len(reqs)
        for r in reqs:
            self.release(r.id)
            self._waiting[r.id] = r

    def release(self, request_id: str) -> None:
        worker = self._worker_of.pop(request_id, None)
        if worker is not None:
            b = self.budget(worker)
            b.reserved.pop(request_id, None)
            b.running.pop(request_id, None)

    def on_batch_done(self, outcome: BatchOutcome, now: float) -> None:
        for r in outcome.batch.requests:
            self.release(r.id)
            gen = outcome.true_gen.get(r.id, 0) - len(r.resume_ids)
            if gen >= 8 and outcome.duration > 0:  # time per output token as a running request sees it
                self.tpot_s = 0.9 * self.tpot_s + 0.1 * outcome.duration / gen

    def on_batch_failed(self, batch: Batch, now: float) -> None:
        for r in batch.requests:
            self.release(r.id)

    def on_batch_oom(self, batch: Batch, now: float) -> list[Request]:
        for r in batch.requests:
            self.release(r.id)
        return list(batch.requests)  # a lone request that does not fit: fails

    def requeue(self, batch: Batch, now: float) -> None:
        for r in batch.requests:
            self.release(r.id)
            self._waiting[r.id] = r

    def cancel(self, request_id: str, now: float) -> bool:
        return self._waiting.pop(request_id, None) is not None

    def waiting(self) -> int:
        return len(self._waiting)

    def waiting_tokens(self) -> int:
        return sum(r.prompt_tokens + r.max_tokens for r in self._waiting.values())

    @property
    def running(self) -> int:
        return sum(len(b.running) for b in self._workers.values())

