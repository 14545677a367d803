"""The serving engine: drives the scheduling core (``scheduler.core``) with real worker processes.

Runs on the asyncio loop. The core decides; the engine moves messages: worker outputs into the
core, the core's dispatches out to the workers, and text and outcomes to each request's stream.
Model work happens in worker processes, tokenization and prediction in threads.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from scheduler.contract import BatchOutput, Outcome, RowOutput, TokenEvent, TokenLogprob
from scheduler.core import Dispatch, SchedulerCore
from scheduler.policy import Policy
from scheduler.request import Failure, FailureCode, Request, RequestStatus
from service.errors import APIError
from service.metrics import Metrics
from service.requestlog import BatchRecord, RequestLog, RequestRecord
from worker.process import WorkerConfig, WorkerHandle

log = logging.getLogger(__name__)

@dataclass
class Delta:
    """New output of a request: its text and, when it asked, the new tokens' logprobs."""

    text: str
    logprobs: list[TokenLogprob] | None = None


#: A stream's events: new output (Delta), the request's outcome (RowOutput), or its error (APIError).
Event = Delta | RowOutput | APIError


@dataclass(eq=False)
class Stream:
    """What the HTTP side keeps of a request: its events and what was already delivered."""

    request: Request
    kind: str  # chat | completion (for the request log)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    sent: int = 0  # chars delivered to the client so far (a retried or resumed row skips them)
    sent_tokens: int = 0  # tokens whose logprobs were delivered (likewise)
    streaming: bool = False  # the client reads the text as it comes (a retry must not splice it)
    delivered: list[str] = field(default_factory=list)  # the text delivered so far, in pieces
    queue_position: int = 0  # requests waiting when it arrived
    last_token_time: float | None = None  # core clock of its latest token event (inter-token latency)
    tokens_seen: int = 0  # generated tokens covered by its events so far (a retried row's repeats skipped)
    itl_tokens: int = 0  # tokens observed as inter-token latency so far


def api_error(f: Failure) -> APIError:
    """The HTTP error of a failed request."""
    if f.code is FailureCode.INSUFFICIENT_MEMORY:
        return APIError(400, f.message, param="max_tokens", code=f.code.value)
    if f.code is FailureCode.GENERATION_FAILED:
        return APIError(500, f.message, type_="server_error")
    return APIError(500, f.message, type_="server_error", code=f.code.value)


class Engine:
    """Owns the core and the workers; HTTP handlers call ``submit`` and read the stream's events."""

    def __init__(
        self,
        policy: Policy,
        worker_configs: list[WorkerConfig],
        request_log: RequestLog,
        metrics: Metrics,
        model_name: str,
        observe: Callable[[Request], None] | None = None,
        handle_factory: Callable[[int, WorkerConfig, Callable[[int, str, Any], None]], Any] | None = None,
        worker_theta: Callable[[dict[str, Any]], float | None] | None = None,
    ) -> None:
        self.policy = policy
        self.log = request_log
        self.metrics = metrics
        self.model_name = model_name
        self.observe = observe  # learners' hook, run in a thread with each completed request
        self.core = SchedulerCore(policy, [c.mode != "static" for c in worker_configs])
        self._streams: dict[str, Stream] = {}
        self._new_handle = handle_factory or WorkerHandle
        self.worker_theta = worker_theta  # a worker's own Theta from its ``ready`` report (cluster workers)
        self._handles = [self._new_handle(i, c, self._from_thread) for i, c in enumerate(worker_configs)]
        self._info: list[dict[str, Any]] = [{} for _ in worker_configs]
        self._loaded = [False] * len(worker_configs)
        self._wall_offset = time.time() - time.monotonic()  # core clock (monotonic) -> wall clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._fatal: str | None = None
        self._closing = False

    def wall(self, t: float | None) -> float | None:
        """A core-clock time as unix seconds."""
        return None if t is None else t + self._wall_offset

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers and the dispatch loop; returns once every worker has loaded."""
        self._loop = asyncio.get_running_loop()
        for i, h in enumerate(self._handles):
            self.core.set_ready(i, False)
            h.start()
        self._task = asyncio.create_task(self._dispatch_loop())
        await self._ready.wait()
        if self._fatal:
            raise RuntimeError(f"worker failed to start:\n{self._fatal}")

    def add_worker(self, cfg: WorkerConfig) -> int:
        """Start one more worker (a node joined the cluster); it takes work once it has loaded."""
        index = self.core.add_worker(cfg.mode != "static")
        self._handles.append(self._new_handle(index, cfg, self._from_thread))
        self._info.append({})
        self._loaded.append(False)
        self._handles[index].start()
        log.info("worker %d added", index)
        return index

    @property
    def num_workers(self) -> int:
        return len(self._handles)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._fatal

    def worker_info(self) -> list[dict[str, Any]]:
        return self._info

    async def stop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task:
            self._task.cancel()
        for h in self._handles:
            await asyncio.to_thread(h.stop)
        for st in list(self._streams.values()):
            self.cancel(st.request.id, APIError(503, "server shutting down", code="shutting_down"))

    # ---- requests --------------------------------------------------------------------------
    def submit(self, req: Request, kind: str, streaming: bool = False) -> Stream:
        """Queue a request (its ``arrival`` is set now); its events arrive on the returned stream."""
        if req.sampling.temperature > 0 and req.sampling.seed is None:
            # fixed per request, so an OOM retry replays the same text
            req.sampling = replace(req.sampling, seed=random.getrandbits(63))
        req.arrival = time.monotonic()
        st = Stream(req, kind, queue_position=self.core.num_waiting, streaming=streaming)
        self._streams[req.id] = st
        self.core.add(req, req.arrival)
        self.metrics.waiting.set(self.core.num_waiting)
        self._wake.set()
        return st

    def cancel(self, request_id: str, error: APIError | None = None) -> None:
        """The client went away: drop it from the queue, or drop its result when it runs.
        With ``error`` (a timeout, shutdown) the request is aborted the same way and fails with it."""
        st = self._streams.get(request_id)
        if st is None:
            return
        failure = None if error is None else Failure(FailureCode(error.code), error.message)
        worker = st.request.worker
        before = self.core.abort(request_id, time.monotonic(), failure)
        if before is None:
            return
        stage = "waiting" if before == RequestStatus.WAITING else "running"
        if before == RequestStatus.RUNNING and worker is not None:
            try:  # its row leaves the batch (early exit) or the continuous worker stops decoding it
                self._handles[worker].cancel(request_id)
            except (OSError, BrokenPipeError):
                pass
        if error is None:
            self.metrics.cancelled.labels(stage).inc()
        else:
            if failure.code is FailureCode.TIMEOUT:
                self.metrics.timeouts.labels(stage).inc()
            st.events.put_nowait(error)
        self._close(st)
        self.metrics.waiting.set(self.core.num_waiting)

    def reject_waiting(self, error: APIError) -> int:
        """Fail every request that is still waiting (not running) with ``error``; returns how many."""
        waiting = [s.request.id for s in self._streams.values() if s.request.status == RequestStatus.WAITING]
        for rid in waiting:
            self.cancel(rid, error)
        return len(waiting)

    @property
    def pending(self) -> int:
        """Requests accepted and not yet finished (waiting or running)."""
        return self.core.num_unfinished

    # ---- dispatch --------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            now = time.monotonic()
            try:
                for d in self.core.schedule(now):
                    self._send(d)
                self.metrics.waiting.set(self.core.num_waiting)
            except Exception:  # noqa: BLE001 - the loop must survive a policy bug; it is logged
                log.exception("dispatch failed")
            timeout = None
            wake = self.core.next_wakeup(now)
            if wake is not None:
                timeout = max(0.0, wake - now) + 0.001
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _send(self, d: Dispatch) -> None:
        self.metrics.batch_size.observe(d.batch.size)
        self.metrics.running.inc(d.batch.size)
        try:
            self._handles[d.worker].submit(d.work())
        except (OSError, BrokenPipeError):
            log.warning("worker %d pipe closed on submit; waiting for its exit", d.worker)

    # ---- worker messages ---------------------------------------------------------------------
    def _from_thread(self, index: int, kind: str, payload: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_message, index, kind, payload)

    def _on_message(self, index: int, kind: str, payload: Any) -> None:
        if kind == "ready":
            self._info[index], self._loaded[index] = payload, True
            theta = self.worker_theta(payload) if self.worker_theta is not None else None
            self.policy.set_worker(index, payload.get("kind"), theta)
            self.core.set_ready(index, True)
            log.info("worker %d ready: %s", index, payload)
            if all(self._loaded):
                self._ready.set()
        elif kind == "fatal":
            self._fatal = payload
            log.error("worker %d failed to load:\n%s", index, payload)
            self._ready.set()
        elif kind == "tokens":
            self._on_tokens(payload)
        elif kind == "rows":
            batch_id, rows = payload
            up = self.core.update_from_rows(index, batch_id, rows, time.monotonic())
            by_id = {row.request_id: row for row in rows}
            for req in up.finished:
                self._finished(req, by_id.get(req.id))
        elif kind == "done":
            self._on_output(index, payload)
        elif kind == "progress":
            for req in self.core.update_progress(index, payload, time.monotonic()):
                self._handles[index].preempt(req.id)
        elif kind == "preempted":
            up = self.core.update_preempted(index, payload, time.monotonic())
            self.metrics.running.dec(len(up.requeued))
            self.metrics.preemptions.inc(len(up.requeued))
        elif kind == "exit":
            self._on_exit(index, payload)
        self._wake.set()

    def _on_tokens(self, events: list[TokenEvent]) -> None:
        for ev in events:
            st = self._streams.get(ev.request_id)
            if st is None:
                continue
            self._observe_tokens(st, ev)
            end = ev.offset + len(ev.text)
            if ev.offset < st.sent and not self._reproduces(st, ev.offset, ev.text):
                self.cancel(st.request.id, self._diverged(st))
                continue
            lps = self._new_logprobs(st, ev.logprobs, ev.token_offset)
            if end <= st.sent and not lps:
                continue  # already delivered before an OOM retry or a worker's death
            if st.request.first_token_at is None:
                st.request.first_token_at = ev.time - self._wall_offset
            self._deliver(st, ev.text[max(0, st.sent - ev.offset):], lps)

    @staticmethod
    def _deliver(st: Stream, text: str, lps: list[TokenLogprob] | None) -> None:
        st.events.put_nowait(Delta(text, lps))
        if text:
            st.delivered.append(text)
            st.sent += len(text)

    def _reproduces(self, st: Stream, offset: int, text: str) -> bool:
        """Whether a retried or resumed row's ``text`` (from ``offset``) agrees with what the
        client was already sent; a streaming request whose retry diverged fails (500) rather
        than receive spliced text. A non-streaming one is answered with the final run's text."""
        if not st.streaming:
            return True
        sent = "".join(st.delivered)
        st.delivered = [sent]
        overlap = min(len(sent) - offset, len(text))
        return sent[offset:offset + overlap] == text[:overlap]

    @staticmethod
    def _diverged(st: Stream) -> APIError:
        log.warning("request %s: its retry diverged from the %d characters already streamed", st.request.id, st.sent)
        return APIError(500, "the request's batch was retried (out of memory or a worker failure) and the retry did "
                             "not reproduce the text already streamed; retry the request", type_="server_error",
                        code=FailureCode.RETRY_DIVERGED.value)

    @staticmethod
    def _new_logprobs(st: Stream, entries: list[TokenLogprob | None] | None, first: int) -> list[TokenLogprob] | None:
        """The entries (for tokens ``first``...) not yet delivered; replayed (None) ones are skipped."""
        if entries is None:
            return None
        new = [e for e in entries[max(0, st.sent_tokens - first):] if e is not None]
        st.sent_tokens = max(st.sent_tokens, first + len(entries))
        return new

    def _on_output(self, index: int, out: BatchOutput) -> None:
        up = self.core.update_from_output(index, out, time.monotonic())
        if up.dispatch is None:
            return
        self.metrics.running.dec(up.dispatch.batch.size)
        self.metrics.batches.labels(out.outcome.value).inc()
        if out.outcome is Outcome.OOM:
            log.warning("batch %d (size %d) ran out of memory on worker %d: split and retry",
                        out.batch_id, up.dispatch.batch.size, index)
        elif out.outcome is Outcome.ERROR:
            log.error("batch %d failed on worker %d:\n%s", out.batch_id, index, out.error)
        if out.stats is not None:
            self.metrics.batch_total_tokens.inc(out.stats.total_tokens)
            self._log_batch(up.dispatch, out)
        rows = {row.request_id: row for row in out.rows}
        for req in up.finished:
            self._finished(req, rows.get(req.id))

    def _on_exit(self, index: int, exitcode: Any) -> None:
        if self._closing:
            return
        log.error("worker %d exited (code %s); restarting", index, exitcode)
        for d in self.core.running(index):
            self.metrics.running.dec(d.batch.size)
        up = self.core.worker_died(index, time.monotonic())
        for req in up.finished:
            self._finished(req, None)
        self.metrics.worker_restarts.inc()
        self._handles[index].start()

    # ---- completion ------------------------------------------------------------------------
    def _finished(self, req: Request, row: RowOutput | None) -> None:
        """A request the core finished: deliver its outcome to its stream."""
        st = self._streams.get(req.id)
        if st is None:
            return
        if req.status == RequestStatus.FINISHED_ERROR:
            st.events.put_nowait(api_error(req.failure))
        elif row is not None:
            if not self._reproduces(st, 0, row.text):
                err = self._diverged(st)
                req.status, req.failure = RequestStatus.FINISHED_ERROR, Failure(FailureCode(err.code), err.message)
                st.events.put_nowait(err)
                self._close(st)
                return
            lps = self._new_logprobs(st, row.logprobs, 0)
            if len(row.text) > st.sent or lps:  # anything the stream held back (e.g. around a stop string)
                self._deliver(st, row.text[st.sent:], lps)
            if req.first_token_at is None and row.first_token_time is not None:
                req.first_token_at = row.first_token_time - self._wall_offset
            st.events.put_nowait(row)
        self._close(st)

    def _close(self, st: Stream) -> None:
        """Account for a finished request and log it."""
        self._streams.pop(st.request.id, None)
        r = st.request
        ok = r.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        status = "ok" if ok else "cancelled" if r.status == RequestStatus.FINISHED_ABORTED else "error"
        self.metrics.requests.labels(status).inc()
        if ok:
            self._observe_finished(st)
            if self.observe is not None and self._loop is not None:
                self._loop.run_in_executor(None, self.observe, r)
        error = r.failure.message if r.failure else "client disconnected" if status == "cancelled" else None
        self.log.add(RequestRecord(
            id=r.id, model=self.model_name, kind=st.kind, app_text=r.app_text, user_text=r.user_text,
            input_tokens=r.input_tokens, prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens,
            completion_tokens=r.output_tokens if ok else 0, finish_reason=r.finish_reason if ok else None,
            status=status, error=error, predicted_tokens=r.predicted_tokens, predicted_high=r.predicted_high,
            arrival=self.wall(r.arrival), dispatch=self.wall(r.dispatched_at), first_token=self.wall(r.first_token_at),
            finish=self.wall(r.finished_at), batch_id=r.batch_id, worker=r.worker,
        ))

    def _log_batch(self, d: Dispatch, out: BatchOutput) -> None:
        s = out.stats
        batch = d.batch
        preds = [r.predicted_tokens for r in batch.requests if r.predicted_tokens is not None]
        self.log.add(BatchRecord(
            id=batch.id, policy=self.policy.name, worker=d.worker, size=s.size, max_prompt=s.max_prompt,
            max_gen=s.max_gen, predicted_max_gen=batch.max_gen if preds else None,
            predicted_lengths=preds or None, dispatch=self.wall(d.at), start=s.start_time, end=s.end_time,
            prefill_s=s.prefill_s, decode_s=s.decode_s, valid_tokens=s.valid_tokens, total_tokens=s.total_tokens,
            peak_mem_bytes=s.peak_mem_bytes, oom=s.oom,
        ))

    # ---- latency metrics (magnus_* and vllm:* through one call each) ----------------------------
    def _observe_tokens(self, st: Stream, ev: TokenEvent) -> None:
        """Inter-token latency of an event's new tokens: the gap since the stream's previous event,
        spread evenly over them. The first event is the first token (TTFT, not ITL); tokens a
        retried row repeats are skipped."""
        end = ev.token_offset + ev.tokens
        new = end - max(st.tokens_seen, ev.token_offset)
        if new <= 0:
            return
        t = ev.time - self._wall_offset
        if st.last_token_time is not None:
            self.metrics.tokens_arrived(t - st.last_token_time, new)
            st.itl_tokens += new
        st.last_token_time, st.tokens_seen = t, end

    def _observe_finished(self, st: Stream) -> None:
        """Latency, queue time, TTFT, time per output token and token counts of a request that
        finished well. Tokens no event covered (an end token has no text, a stop-string prefix is
        held back, the first event's tokens after the first) count as inter-token latency here,
        spread over the time since its last event, so every token after the first is counted once."""
        r = st.request
        first = r.first_token_at
        rest = r.output_tokens - 1 - st.itl_tokens
        last = st.last_token_time if st.last_token_time is not None else first
        if rest > 0 and last is not None:
            self.metrics.tokens_arrived(r.finished_at - last, rest)
            st.itl_tokens += rest
        self.metrics.request_finished(
            latency=r.finished_at - r.arrival,
            queue_time=None if r.dispatched_at is None else r.dispatched_at - r.arrival,
            ttft=None if first is None else first - r.arrival,
            prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens,
            finish_reason="length" if r.status == RequestStatus.FINISHED_LENGTH else "stop",
            decode_time=None if first is None else r.finished_at - first)
