"""The serving engine: policy + workers + request states. Runs on the asyncio loop; model work
happens in worker processes, tokenization and prediction in threads."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.policy import Policy
from scheduler.types import Batch, BatchOutcome, SchedRequest
from service.errors import APIError
from service.metrics import Metrics
from service.requestlog import BatchRecord, RequestLog, RequestRecord
from worker.process import WorkerConfig, WorkerHandle
from worker.types import BatchDone, GenBatch, GenRequest, GenResult, TokenEvent

log = logging.getLogger(__name__)


@dataclass
class Submission:
    """A validated, tokenized request ready to schedule."""

    id: str
    kind: str  # chat | completion
    prompt_ids: list[int]
    app_text: str
    user_text: str
    input_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    predicted_tokens: int | None = None
    predicted_high: int | None = None
    predicted_source: str | None = None  # forest | app_median | max_tokens


@dataclass
class RequestState:
    """Per-request bookkeeping while it is waiting or running."""

    sub: Submission
    sched: SchedRequest
    arrival_wall: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) | ("done", GenResult) | ("error", APIError)
    dispatch_wall: float | None = None
    first_token_wall: float | None = None
    batch_id: int | None = None
    worker: int | None = None
    sent: int = 0  # chars delivered to the client so far (a retried batch skips them)
    attempt_chars: int = 0  # chars seen in the current attempt
    finished: bool = False


@dataclass
class _Worker:
    handle: WorkerHandle
    ready: bool = False
    continuous: bool = False  # iteration-level (CCB): takes new requests while running others
    batches: dict[int, tuple[Batch, float]] = field(default_factory=dict)  # running: id -> (batch, dispatch wall)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        """Can take a batch now (a continuous worker always can; its policy admits or not)."""
        return self.ready and (self.continuous or not self.batches)


class Engine:
    """Owns the policy and the workers; HTTP handlers call ``submit`` and read the state's queue."""

    def __init__(
        self,
        policy: Policy,
        worker_configs: list[WorkerConfig],
        request_log: RequestLog,
        metrics: Metrics,
        model_name: str,
        observe: Callable[[Submission, int], None] | None = None,
    ) -> None:
        self.policy = policy
        self.log = request_log
        self.metrics = metrics
        self.model_name = model_name
        self.observe = observe  # learners' hook: (submission, true generated tokens), run in a thread
        self._states: dict[str, RequestState] = {}
        self._workers = [
            _Worker(WorkerHandle(i, c, self._from_thread), continuous=c.mode == "continuous")
            for i, c in enumerate(worker_configs)
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._fatal: str | None = None
        self._closing = False
        self._deaths: dict[int, int] = {}  # batch id -> times a worker died running it

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers and the dispatch loop; returns once every worker has loaded."""
        self._loop = asyncio.get_running_loop()
        for w in self._workers:
            w.handle.start()
        self._task = asyncio.create_task(self._dispatch_loop())
        await self._ready.wait()
        if self._fatal:
            raise RuntimeError(f"worker failed to start:\n{self._fatal}")

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._fatal

    def worker_info(self) -> list[dict[str, Any]]:
        return [w.info for w in self._workers]

    async def stop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task:
            self._task.cancel()
        for w in self._workers:
            await asyncio.to_thread(w.handle.stop)
        for st in list(self._states.values()):
            self._fail(st, APIError(503, "server shutting down", code="shutting_down"))

    # ---- requests --------------------------------------------------------------------------
    def submit(self, sub: Submission) -> RequestState:
        """Queue a request; its events arrive on the returned state's queue."""
        if sub.temperature > 0 and sub.seed is None:
            sub.seed = random.getrandbits(63)  # fixed per request, so an OOM retry replays the same text
        now = time.monotonic()
        sched = SchedRequest(
            id=sub.id, prompt_tokens=len(sub.prompt_ids), max_tokens=sub.max_tokens, arrival=now,
            predicted_tokens=sub.predicted_tokens, predicted_high=sub.predicted_high, app=sub.app_text,
        )
        st = RequestState(sub=sub, sched=sched, arrival_wall=time.time())
        self._states[sub.id] = st
        self.policy.on_arrival(sched, now)
        self.metrics.waiting.set(self.policy.waiting())
        self._wake.set()
        return st

    def cancel(self, request_id: str, error: APIError | None = None) -> None:
        """The client went away: drop it from the queue, or drop its result when it runs.
        With ``error`` (e.g. a timeout) the request is aborted the same way and fails with it."""
        st = self._states.get(request_id)
        if st is None or st.finished:
            return
        stage = "waiting" if self.policy.cancel(request_id, time.monotonic()) else "running"
        if error is None:
            self.metrics.cancelled.labels(stage).inc()
            self._finish(st, status="cancelled", error="client disconnected")
        else:
            if error.code == "request_timeout":
                self.metrics.timeouts.labels(stage).inc()
            self._fail(st, error)
        self.metrics.waiting.set(self.policy.waiting())

    def reject_waiting(self, error: APIError) -> int:
        """Fail every request that is still waiting (not running) with ``error``; returns how many."""
        now = time.monotonic()
        n = 0
        for st in list(self._states.values()):
            if not st.finished and self.policy.cancel(st.sub.id, now):
                self._fail(st, error)
                n += 1
        self.metrics.waiting.set(self.policy.waiting())
        return n

    @property
    def pending(self) -> int:
        """Requests accepted and not yet finished (waiting or running)."""
        return len(self._states)

    # ---- dispatch --------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            now = time.monotonic()
            try:
                self._dispatch(now)
            except Exception:  # noqa: BLE001 - the loop must survive a policy bug; it is logged
                log.exception("dispatch failed")
            timeout = None
            if any(w.idle for w in self._workers):
                wake = self.policy.next_wakeup(now)
                if wake is not None:
                    timeout = max(0.0, wake - now) + 0.001
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _dispatch(self, now: float) -> None:
        for w in self._workers:
            while w.idle:
                batch = self.policy.next_batch(w.handle.index, now)
                if batch is None:
                    break
                batch.requests = [r for r in batch.requests if r.id in self._states]
                if batch.requests:
                    self._run(w, batch)
        self.metrics.waiting.set(self.policy.waiting())

    def _run(self, w: _Worker, batch: Batch) -> None:
        wall = time.time()
        reqs = []
        for r in batch.requests:
            st = self._states[r.id]
            st.dispatch_wall = st.dispatch_wall or wall
            st.batch_id, st.worker, st.attempt_chars = batch.id, w.handle.index, 0
            s = st.sub
            reqs.append(GenRequest(s.id, s.prompt_ids, s.max_tokens, s.temperature, s.top_p, s.seed, s.stop))
        w.batches[batch.id] = (batch, wall)
        self.metrics.batch_size.observe(batch.size)
        self.metrics.running.inc(batch.size)
        try:
            w.handle.submit(GenBatch(batch.id, reqs))
        except (OSError, BrokenPipeError):
            log.warning("worker %d pipe closed on submit; waiting for its exit", w.handle.index)

    # ---- worker messages ---------------------------------------------------------------------
    def _from_thread(self, index: int, kind: str, payload: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_message, index, kind, payload)

    def _on_message(self, index: int, kind: str, payload: Any) -> None:
        w = self._workers[index]
        if kind == "ready":
            w.ready, w.info = True, payload
            log.info("worker %d ready: %s", index, payload)
            if all(x.ready for x in self._workers):
                self._ready.set()
        elif kind == "fatal":
            self._fatal = payload
            log.error("worker %d failed to load:\n%s", index, payload)
            self._ready.set()
        elif kind == "tokens":
            self._on_tokens(payload)
        elif kind == "done":
            self._on_done(w, payload)
        elif kind == "exit":
            self._on_exit(w, payload)
        self._wake.set()

    def _on_tokens(self, events: list[TokenEvent]) -> None:
        for ev in events:
            st = self._states.get(ev.request_id)
            if st is None or st.finished:
                continue
            start = st.attempt_chars
            st.attempt_chars += len(ev.text)
            if st.attempt_chars <= st.sent:
                continue  # already delivered before an OOM retry
            if st.first_token_wall is None:
                st.first_token_wall = ev.time
            st.events.put_nowait(("text", ev.text[max(0, st.sent - start) :]))
            st.sent = st.attempt_chars

    def _on_done(self, w: _Worker, done: BatchDone) -> None:
        entry = w.batches.pop(done.batch_id, None)
        if entry is None:
            return
        batch, dispatch_wall = entry
        self._deaths.pop(batch.id, None)
        self.metrics.running.dec(batch.size)
        now = time.monotonic()
        if done.error and done.error.startswith("oom"):
            self._on_oom(w, batch, done, now, dispatch_wall)
            return
        if done.error:
            log.error("batch %d failed on worker %d:\n%s", batch.id, w.handle.index, done.error)
            self.metrics.batches.labels("error").inc()
            self.policy.on_batch_failed(batch, now)
            for r in batch.requests:
                if r.id in self._states:
                    self._fail(self._states[r.id], APIError(500, "generation failed", type_="server_error"))
            return
        self.metrics.batches.labels("ok").inc()
        stats = done.stats
        self.metrics.batch_total_tokens.inc(stats.total_tokens)
        self._log_batch(w, batch, done, dispatch_wall)
        true_gen = {res.id: res.completion_tokens for res in done.results}
        self.policy.on_batch_done(
            BatchOutcome(batch=batch, true_gen=true_gen, duration=stats.end_time - dispatch_wall,
                         prefill_s=stats.prefill_s, decode_s=stats.decode_s),
            now,
        )
        for res in done.results:
            st = self._states.get(res.id)
            if st is None or st.finished:
                continue
            self._complete(st, res)

    def _on_oom(self, w: _Worker, batch: Batch, done: BatchDone, now: float, dispatch_wall: float) -> None:
        self.metrics.batches.labels("oom").inc()
        self._log_batch(w, batch, done, dispatch_wall)
        log.warning("batch %d (size %d) ran out of memory on worker %d: split and retry",
                    batch.id, batch.size, w.handle.index)
        for r in self.policy.on_batch_oom(batch, now):
            st = self._states.get(r.id)
            if st is not None:
                self._fail(st, APIError(
                    400,
                    f"request does not fit in worker memory even alone: prompt {r.prompt_tokens} tokens + "
                    f"max_tokens {r.max_tokens}; lower max_tokens or shorten the prompt",
                    param="max_tokens", code="insufficient_memory",
                ))

    def _on_exit(self, w: _Worker, exitcode: Any) -> None:
        if self._closing:
            return
        log.error("worker %d exited (code %s); restarting", w.handle.index, exitcode)
        w.ready = False
        running = [b for b, _ in w.batches.values()]
        w.batches.clear()
        for batch in running:
            self.metrics.running.dec(batch.size)
            self._deaths[batch.id] = deaths = self._deaths.get(batch.id, 0) + 1
            live = [r for r in batch.requests if r.id in self._states]
            if deaths <= 1 and live:
                batch.requests = live
                self.policy.requeue(batch, time.monotonic())  # put back once, waiting time kept
            else:
                for r in live:
                    self._fail(self._states[r.id], APIError(500, "worker died twice running this request",
                                                            type_="server_error", code="worker_failed"))
        self.metrics.worker_restarts.inc()
        w.handle.start()

    # ---- completion ------------------------------------------------------------------------
    def _complete(self, st: RequestState, res: GenResult) -> None:
        if len(res.text) > st.sent:  # anything the stream held back (e.g. around a stop string)
            st.events.put_nowait(("text", res.text[st.sent:]))
            st.sent = len(res.text)
        st.first_token_wall = st.first_token_wall or res.first_token_time
        st.events.put_nowait(("done", res))
        self._finish(st, status="ok", result=res)

    def _fail(self, st: RequestState, err: APIError) -> None:
        if st.finished:
            return
        st.events.put_nowait(("error", err))
        self._finish(st, status="error", error=err.message)

    def _finish(self, st: RequestState, status: str, result: GenResult | None = None, error: str | None = None) -> None:
        st.finished = True
        self._states.pop(st.sub.id, None)
        end = time.time()
        s = st.sub
        self.metrics.requests.labels(status).inc()
        if status == "ok" and result is not None:
            self.metrics.latency.observe(end - st.arrival_wall)
            if st.dispatch_wall:
                self.metrics.queue_time.observe(st.dispatch_wall - st.arrival_wall)
            if st.first_token_wall:
                self.metrics.ttft.observe(st.first_token_wall - st.arrival_wall)
            self.metrics.prompt_tokens.inc(len(s.prompt_ids))
            self.metrics.generation_tokens.inc(result.completion_tokens)
            if self.observe is not None:
                self._loop.run_in_executor(None, self.observe, s, result.completion_tokens)
        self.log.add(RequestRecord(
            id=s.id, model=self.model_name, kind=s.kind, app_text=s.app_text, user_text=s.user_text,
            input_tokens=s.input_tokens, prompt_tokens=len(s.prompt_ids), max_tokens=s.max_tokens,
            completion_tokens=result.completion_tokens if result else 0,
            finish_reason=result.finish_reason if result else None, status=status, error=error,
            predicted_tokens=s.predicted_tokens, predicted_high=s.predicted_high,
            arrival=st.arrival_wall, dispatch=st.dispatch_wall, first_token=st.first_token_wall, finish=end,
            batch_id=st.batch_id, worker=st.worker,
        ))

    def _log_batch(self, w: _Worker, batch: Batch, done: BatchDone, dispatch_wall: float) -> None:
        s = done.stats
        preds = [r.predicted_tokens for r in batch.requests if r.predicted_tokens is not None]
        self.log.add(BatchRecord(
            id=batch.id, policy=self.policy.name, worker=w.handle.index, size=s.size, max_prompt=s.max_prompt,
            max_gen=s.max_gen, predicted_max_gen=batch.max_gen if preds else None,
            predicted_lengths=preds or None, dispatch=dispatch_wall, start=s.start_time, end=s.end_time,
            prefill_s=s.prefill_s, decode_s=s.decode_s, valid_tokens=s.valid_tokens, total_tokens=s.total_tokens,
            peak_mem_bytes=s.peak_mem_bytes, oom=s.oom,
        ))
