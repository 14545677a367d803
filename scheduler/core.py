"""The scheduling core: one loop for the server, the simulator and the tests.

Pure: no threads, no asyncio, no clock of its own; every call takes ``now`` on the caller's clock.
A driver (the server's engine, the simulator) owns the workers and calls, in any order:

* ``add(request, now)`` for each arrival and ``abort(request_id, now)`` when a client goes away;
* ``schedule(now)``: the idle workers get work; returns the ``Dispatch`` records to send;
* ``update_from_rows(worker, batch_id, rows, now)`` for rows that ended while their batch runs
  (early exit), ``update_from_output(worker, output, now)`` for each ``BatchOutput`` a worker
  sends back, and ``worker_died(worker, now)`` when a worker is lost; each returns an ``Update``
  naming the requests that finished (completed or failed) and the ones put back to wait;
* ``next_wakeup(now)``: when to call ``schedule`` again if nothing else happens;
* continuous workers only: ``update_progress(worker, progress, now)`` with a worker's periodic
  report on its rows (returns the requests the policy wants preempted: the driver tells the worker)
  and ``update_preempted(worker, rows, now)`` when the worker dropped them (they wait again and
  later continue from the tokens they had).

A static worker runs one batch at a time; a continuous worker is offered work whenever the policy
has some (it admits requests between decode steps, and reports each as a batch of one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from predictor.types import last_checkpoint
from scheduler.batch import Batch, BatchOutcome
from scheduler.contract import BatchOutput, Outcome, Preempted, RowOutput, RowProgress, WorkBatch, WorkItem
from scheduler.policy import Policy
from scheduler.request import Failure, FailureCode, Request, RequestStatus


@dataclass
class Dispatch:
    """A batch the core handed to a worker."""

    worker: int  # the worker that runs it
    batch: Batch  # the scheduler's batch (its requests are the core's records)
    at: float  # dispatch time on the core's clock

    def work(self) -> WorkBatch:
        """What goes to the worker: ids, prompts, limits and sampling, nothing else."""
        return WorkBatch(self.batch.id, [WorkItem.of(r) for r in self.batch.requests])


@dataclass
class Update:
    """What an output (or a worker's death) changed."""

    finished: list[Request] = field(default_factory=list)  # reached a finished status, in batch order
    requeued: list[Request] = field(default_factory=list)  # back to WAITING (OOM halves, a dead worker's batch)
    dispatch: Dispatch | None = None  # the batch the output belongs to; None if the core did not know it


@dataclass
class _Worker:
    continuous: bool  # iteration-level: takes requests while running others
    ready: bool = True  # loaded and reachable
    running: dict[int, Dispatch] = field(default_factory=dict)  # batch id -> dispatch

    @property
    def idle(self) -> bool:
        return self.ready and (self.continuous or not self.running)


class SchedulerCore:
    """A policy, its requests and the workers' batches.

    ``workers``: one flag per worker, True for a continuous (iteration-level) worker.
    ``max_deaths``: how many times a batch is put back after its worker died; one more death
    fails its requests.
    """

    def __init__(self, policy: Policy, continuous: Sequence[bool], max_deaths: int = 1) -> None:
        if not continuous:
            raise ValueError("need at least one worker")
        self.policy = policy
        self.max_deaths = max_deaths
        # re-prediction hook (the length predictor's, in the server): sets ``reprediction`` of the
        # requests given, whose reported first tokens reached a new checkpoint
        self.repredict: Callable[[list[Request]], None] | None = None
        self._workers = [_Worker(c) for c in continuous]
        self._requests: dict[str, Request] = {}  # unfinished ones
        self._deaths: dict[int, int] = {}  # batch id -> times a worker died running it

    # -- requests --------------------------------------------------------------------------------
    def add(self, req: Request, now: float) -> None:
        """A request arrived; it waits in the policy's queue."""
        if req.id in self._requests:
            raise ValueError(f"request {req.id} is already in the core")
        req.status = RequestStatus.WAITING
        self._requests[req.id] = req
        self.policy.on_arrival(req, now)

    def get(self, request_id: str) -> Request | None:
        """An unfinished request by id."""
        return self._requests.get(request_id)

    def abort(self, request_id: str, now: float, failure: Failure | None = None) -> RequestStatus | None:
        """Finish a request before its end: aborted (client gone) or, with ``failure``, failed.

        A waiting request leaves the queue; a running one stays in its batch on the worker, whose
        output for it is then ignored. Returns the status it had (WAITING or RUNNING), or None when
        it is unknown or already finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        before = req.status
        if before == RequestStatus.WAITING:
            self.policy.cancel(request_id, now)
        self._finish(req, now, failure=failure, aborted=failure is None)
        return before

    def abort_waiting(self, now: float, failure: Failure) -> list[Request]:
        """Fail every waiting request with ``failure`` (shutdown); returns them."""
        out = []
        for req in [r for r in self._requests.values() if r.status == RequestStatus.WAITING]:
            self.abort(req.id, now, failure)
            out.append(req)
        return out

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    @property
    def num_waiting(self) -> int:
        return self.policy.waiting()

    @property
    def num_running(self) -> int:
        return sum(1 for r in self._requests.values() if r.status == RequestStatus.RUNNING)

    # -- workers ---------------------------------------------------------------------------------
    def add_worker(self, continuous: bool) -> int:
        """A worker joined (e.g. a new node of a cluster): its index; it is not ready until loaded."""
        self._workers.append(_Worker(continuous))
        self._workers[-1].ready = False
        return len(self._workers) - 1

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def set_ready(self, worker: int, ready: bool) -> None:
        """A worker finished loading (True), or is unavailable for now (False)."""
        self._workers[worker].ready = ready

    def running(self, worker: int) -> list[Dispatch]:
        """The batches on ``worker``."""
        return list(self._workers[worker].running.values())

    def schedule(self, now: float) -> list[Dispatch]:
        """Give every idle worker what the policy says runs now."""
        out: list[Dispatch] = []
        for index, w in enumerate(self._workers):
            while w.idle:
                batch = self.policy.next_batch(index, now)
                if batch is None:
                    break
                batch.requests = [r for r in batch.requests if r.status == RequestStatus.WAITING]
                if not batch.requests:
                    continue
                for r in batch.requests:
                    r.status = RequestStatus.RUNNING
                    if r.dispatched_at is None:
                        r.dispatched_at = now
                    r.batch_id, r.worker = batch.id, index
                d = Dispatch(index, batch, now)
                w.running[batch.id] = d
                out.append(d)
        return out

    def next_wakeup(self, now: float) -> float | None:
        """When the policy may have work with no new event (None: only an event brings work)."""
        if not any(w.idle for w in self._workers):
            return None
        return self.policy.next_wakeup(now)

    def update_from_rows(self, worker: int, batch_id: int, rows: Sequence[RowOutput], now: float) -> Update:
        """Rows that ended while their batch still runs (early exit): their requests complete now.
        The batch's own output follows when its last row ends; the learners see it then."""
        d = self._workers[worker].running.get(batch_id)
        up = Update(dispatch=d)
        if d is not None:
            for row in rows:
                self._complete(row, now, up)
        return up

    def update_from_output(self, worker: int, output: BatchOutput, now: float) -> Update:
        """A worker's answer for a batch: finish its requests, or split it (OOM), or fail it."""
        d = self._workers[worker].running.pop(output.batch_id, None)
        if d is None:
            return Update()
        self._deaths.pop(d.batch.id, None)
        batch = d.batch
        up = Update(dispatch=d)
        if output.outcome is Outcome.OOM:
            batch.requests = [r for r in batch.requests if r.status == RequestStatus.RUNNING]
            failing = {r.id for r in self.policy.on_batch_oom(batch, now)} if batch.requests else set()
            for r in batch.requests:
                if r.id in failing:
                    self._fail(r, now, FailureCode.INSUFFICIENT_MEMORY, (
                        f"request does not fit in worker memory even alone: prompt {r.prompt_tokens} tokens + "
                        f"max_tokens {r.max_tokens}; lower max_tokens or shorten the prompt"), up)
                else:
                    r.status = RequestStatus.WAITING
                    up.requeued.append(r)
            return up
        if output.outcome is Outcome.ERROR:
            self.policy.on_batch_failed(batch, now)
            for r in batch.requests:
                if r.status == RequestStatus.RUNNING:
                    self._fail(r, now, FailureCode.GENERATION_FAILED, "generation failed", up)
            return up
        stats = output.stats
        self.policy.on_batch_done(BatchOutcome(
            batch=batch, true_gen={row.request_id: row.output_tokens for row in output.rows},
            duration=now - d.at, prefill_s=stats.prefill_s if stats else 0.0, decode_s=stats.decode_s if stats else 0.0,
            worker=worker,
        ), now)
        for row in output.rows:
            self._complete(row, now, up)
        return up

    def update_progress(self, worker: int, progress: Sequence[RowProgress], now: float) -> list[Request]:
        """A continuous worker's report on its running rows: the policy re-estimates them and may
        name requests to preempt (returned; the driver asks the worker to drop them)."""
        reqs, fresh = [], []
        for p in progress:
            r = self._requests.get(p.request_id)
            if r is not None and r.status == RequestStatus.RUNNING and r.worker == worker:
                r.generated, r.looping = p.generated, r.looping or p.looping
                if p.state is not None:  # the state of the last checkpoint its tokens passed
                    r.head_states[last_checkpoint(p.generated)] = p.state
                if last_checkpoint(len(p.head_ids)) > last_checkpoint(len(r.head_ids)):
                    r.head_ids = list(p.head_ids)
                    fresh.append(r)
                reqs.append(r)
        if not reqs:
            return []
        if fresh and self.repredict is not None:
            self.repredict(fresh)
        return [r for r in self.policy.on_progress(worker, reqs, now) if r.status == RequestStatus.RUNNING]

    def update_preempted(self, worker: int, rows: Sequence[Preempted], now: float) -> Update:
        """Rows a continuous worker dropped: their requests wait again (arrival kept) and resume
        from the tokens they had generated."""
        up = Update()
        running = self._workers[worker].running
        oom = any(p.oom for p in rows)
        for p in rows:
            r = self._requests.get(p.request_id)
            d = None
            for bid, disp in list(running.items()):
                if any(x.id == p.request_id for x in disp.batch.requests):
                    d = running.pop(bid)
                    break
            if d is None or r is None or r.status != RequestStatus.RUNNING:
                if d is not None:
                    self.policy.on_batch_failed(d.batch, now)  # frees what it held; the request is gone
                continue
            r.status = RequestStatus.WAITING
            r.resume_ids = list(p.generated_ids)
            r.generated = len(p.generated_ids)
            r.preemptions += 1
            up.requeued.append(r)
        if up.requeued:
            self.policy.on_preempted(up.requeued, worker, oom, now)
        return up

    def worker_died(self, worker: int, now: float) -> Update:
        """A worker is gone: each of its batches goes back to the queue once (waiting time kept);
        a batch whose worker dies again fails. The worker is not ready until ``set_ready``."""
        w = self._workers[worker]
        w.ready = False
        up = Update()
        for d in list(w.running.values()):
            batch = d.batch
            self._deaths[batch.id] = deaths = self._deaths.get(batch.id, 0) + 1
            live = [r for r in batch.requests if r.status == RequestStatus.RUNNING]
            if deaths <= self.max_deaths and live:
                batch.requests = live
                for r in live:
                    r.status = RequestStatus.WAITING
                    r.generated = len(r.resume_ids)  # what it made since its last resume went with the worker
                up.requeued.extend(live)
                self.policy.requeue(batch, now)
            else:
                for r in live:
                    self._fail(r, now, FailureCode.WORKER_FAILED, "worker died twice running this request", up)
        w.running.clear()
        return up

    # -- internals -------------------------------------------------------------------------------
    def _complete(self, row: RowOutput, now: float, up: Update) -> None:
        r = self._requests.get(row.request_id)
        if r is None or r.status != RequestStatus.RUNNING:
            return  # aborted, or already completed by an early row
        r.output_tokens, r.finish_reason = row.output_tokens, row.finish_reason
        if len(row.head_ids) > len(r.head_ids):
            r.head_ids = list(row.head_ids)
        del self._requests[r.id]
        self._finish(r, now)
        up.finished.append(r)

    def _fail(self, r: Request, now: float, code: FailureCode, message: str, up: Update) -> None:
        self._requests.pop(r.id, None)
        self._finish(r, now, failure=Failure(code, message))
        up.finished.append(r)

    @staticmethod
    def _finish(r: Request, now: float, failure: Failure | None = None, aborted: bool = False) -> None:
        r.finished_at = now
        if failure is not None:
            r.status, r.failure = RequestStatus.FINISHED_ERROR, failure
        elif aborted:
            r.status = RequestStatus.FINISHED_ABORTED
        else:
            r.status = RequestStatus.FINISHED_LENGTH if r.finish_reason == "length" else RequestStatus.FINISHED_STOPPED


