"""Discrete-event simulator of ``magnus simulate``: the scheduling core (``scheduler.core``, the
same code the server runs) driven on a virtual clock; only the workers are simulated, by a cost model.

* Static workers (VS, VSQ, GLP, ABP, Magnus): a batch of ``b`` requests runs
  ``cost.batch_time(b, L(B), G_true(B))`` with ``G_true(B)`` the longest TRUE generation; every
  request ends at the batch end. If the true peak ``b (L + G_true) Delta + weights`` exceeds the
  device memory, the batch runs out of memory while producing token ``g0``, the first whose
  cache crosses the limit: ``batch_time(b, L, g0)`` is charged, then an OOM output goes to the core.
  The worker takes its next batch ``turnaround_s`` after a batch ends (the engine's round trip).
* Continuous workers (CCB, pcb): iteration-level. Requests the policy admits join at the worker's
  next iteration boundary; that iteration costs ``prefill_time`` of the joiners plus
  ``step_time(running, mean KV tokens)`` of the others; with ``padded`` (the server's iteration
  runner: one left-padded cache, trimmed only where every row is padding) each row reads the
  longest live row's length instead, ``step_time(running, width)``. A request leaves after its TRUE length
  and is reported as a batch of one. Iterations in which nothing joins or leaves are summed in
  one event (a "segment"); an admission mid-segment cuts it at the next boundary.
* Progress and preemption (policies that act on progress, pcb): every ``progress_every``
  iterations, as the iteration-level worker, the core gets each running row's length
  (``update_progress``); the rows the policy names leave at once, their cache freed, and wait
  again (``update_preempted``); readmitted, a row prefills its prompt plus the tokens it had and
  generates the rest of its TRUE length. Not simulated: the repetition-loop flag and re-prediction
  from the first generated tokens (the simulator has no tokens), so pcb orders by its arrival
  predictions only.

Events at the same time are all handled before the core is asked for work, as in the engine.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from tqdm import tqdm

from scheduler.batch import Batch
from scheduler.contract import BatchOutput, BatchStats, Outcome, Preempted, RowOutput, RowProgress
from scheduler.core import Dispatch, SchedulerCore, Update
from scheduler.costmodel import CostModel
from scheduler.policy import Policy
from scheduler.request import Request, RequestStatus

_WAKE_GUARD_S = 1e-3  # as the engine: re-ask 1 ms later when the policy says "now" but gives nothing


@dataclass
class SimStats:
    """Simulator-side counters of one run."""

    batches: int = 0  # dispatched static batches (CCB: admitted requests)
    batch_requests: int = 0  # sum of their sizes
    oom_batches: int = 0
    total_tokens: int = 0  # every generated token: padding, post-end and OOM-lost ones included
    busy_s: float = 0.0  # summed worker busy time
    peak_kv_frac: float = 0.0  # largest true KV cache of a batch / KV capacity of the device
    peak_reserved_frac: float = 0.0  # CCB: largest admission reservation / Theta (forced lone runs excluded)
    events: int = 0
    makespan: float = 0.0
    preemptions: int = 0  # continuous rows the policy had the worker drop (they resumed later)

    @property
    def mean_batch(self) -> float:
        return self.batch_requests / self.batches if self.batches else 0.0


@dataclass
class _Running:
    """A request on a continuous worker."""

    req: Request
    batch_id: int  # the core's batch (of one) it was dispatched in
    start_it: int  # iteration whose end gives its first token (of this residency)
    end_it: int  # iteration whose end gives its last token (or where it runs out of memory)
    oom: bool = False
    base: int = 0  # cached tokens at the join: its prompt plus the tokens it resumed with

    def generated(self, it: int) -> int:
        """Tokens it has at the end of iteration ``it`` (resumed ones included)."""
        return len(self.req.resume_ids) + max(0, it - self.start_it + 1)


@dataclass
class _Continuous:
    """State of a continuous (CCB) worker. ``it``/``kv``/``t`` are at the scheduled boundary."""

    heap: list[tuple[int, int, _Running]] = field(default_factory=list)  # by end_it
    pending: list[Dispatch] = field(default_factory=list)  # admitted, join at the next boundary
    n: int = 0  # running requests
    kv: float = 0.0  # KV tokens cached over the running requests (prompt + generated)
    it: int = 0  # iterations done (at the scheduled boundary)
    scheduled: bool = False
    version: int = 0  # bumps when a scheduled event is replaced
    seg: tuple[float, int, float] | None = None  # decode segment start (t, it, kv), None for a prefill step
    t: float = 0.0  # time of the scheduled boundary


def _row(req: Request, tokens: int) -> RowOutput:
    return RowOutput(req.id, "", tokens, "length" if tokens >= req.max_tokens else "stop", None)


class Simulation:
    """One run of ``policy`` on ``n_workers`` workers whose batches cost what ``cost`` says on a
    device of ``device_bytes``. ``ttft``: ``batch-end`` (a static batch's requests get their
    first token at its end) or ``first-token`` (after its prefill, as the streaming server).
    ``turnaround_s``: a static worker's delay between a batch's end and taking the next one.
    ``early_exit``: static batches let go (as the server's default runner): a row returns the step
    it ends and leaves the batch, so later steps run only the live rows (``row_end_times``).
    ``padded``: a continuous worker's step reads every row at the longest live row's length."""

    def __init__(
        self,
        policy: Policy,
        cost: CostModel,
        n_workers: int,
        device_bytes: float | None = None,
        ttft: str = "batch-end",
        progress: bool = False,
        turnaround_s: float = 0.0,
        early_exit: bool = False,
        progress_every: int = 8,
        padded: bool = False,
    ) -> None:
        if n_workers < 1:
            raise ValueError("need at least one worker")
        if ttft not in ("batch-end", "first-token"):
            raise ValueError("ttft must be batch-end or first-token")
        self.policy = policy
        self.cost = cost
        self.n_workers = n_workers
        device = cost.hw.mem_bytes if device_bytes is None else device_bytes
        self.kv_cap = (device - cost.model.weight_bytes) / cost.model.delta  # KV tokens the device holds
        if self.kv_cap <= 0:
            raise ValueError("the weights do not fit on the device")
        self.ttft = ttft
        self.progress = progress
        self.turnaround_s = turnaround_s
        self.early_exit = early_exit
        self.padded = padded
        self.continuous = policy.continuous
        if progress_every < 1:
            raise ValueError("progress_every must be >= 1")
        # progress reports only where the policy acts on them (its on_progress is its own)
        acts = type(policy).on_progress is not Policy.on_progress
        self.progress_every = progress_every if self.continuous and acts else 0
        self.core = SchedulerCore(policy, [self.continuous] * n_workers)
        self.stats = SimStats()
        self.batches: list[Batch] = []  # every dispatched batch, in dispatch order
        self._heap: list[tuple[float, int, int, str, object]] = []
        self._seq = 0
        self._ccb = [_Continuous() for _ in range(n_workers)] if self.continuous else []
        self._done = 0
        self._wake_at = -math.inf
        self._bar: tqdm | None = None

    # -- the loop ------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> SimStats:
        """Simulate until every request has finished or failed; each does so exactly once. Each
        request needs its ``true_tokens``; its outcome is left on it (status, times, failure)."""
        reqs = sorted(requests, key=lambda r: r.arrival)
        if len({r.id for r in reqs}) != len(reqs):
            raise ValueError("request ids must be unique")
        if any(r.true_tokens is None for r in reqs):
            raise ValueError("every simulated request needs its true_tokens")
        n, i, heap, now = len(reqs), 0, self._heap, 0.0
        idle_wakes = 0
        self._bar = tqdm(total=n, unit="req", disable=not self.progress, mininterval=0.5, leave=False)
        try:
            while self._done < n:
                t_arr = reqs[i].arrival if i < n else math.inf
                if heap and heap[0][0] <= t_arr:
                    now, _, _, kind, payload = heapq.heappop(heap)
                    before = self._done
                    self._handle(kind, payload, now)
                    idle_wakes = idle_wakes + 1 if kind == "wake" and self._done == before else 0
                    if idle_wakes > 1_000_000:
                        raise RuntimeError(f"policy {self.policy.name} keeps asking for wake-ups without progress")
                elif i < n:
                    now = t_arr
                    self.core.add(reqs[i], now)
                    i += 1
                else:
                    raise RuntimeError(
                        f"simulation stalled at t={now:.3f}: {n - self._done} requests unfinished, "
                        f"{self.policy.waiting()} waiting in policy {self.policy.name}"
                    )
                self.stats.events += 1
                t_next = min(heap[0][0] if heap else math.inf, reqs[i].arrival if i < n else math.inf)
                if t_next > now:
                    self._dispatch(now)
        finally:
            self._bar.close()
        self.stats.makespan = now
        return self.stats

    def _push(self, t: float, kind: str, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, 0 if kind != "wake" else 1, self._seq, kind, payload))

    def _handle(self, kind: str, payload: object, now: float) -> None:
        if kind == "batch":
            self._batch_end(payload, now)  # type: ignore[arg-type]
        elif kind == "rows":
            d, rows = payload  # type: ignore[misc]
            up = self.core.update_from_rows(d.worker, d.batch.id, rows, now)
            self._first_token_at_end(up, now)
            self._count(up)
        elif kind == "free":
            self.core.set_ready(payload, True)  # type: ignore[arg-type]
        elif kind == "iter":
            w, version = payload  # type: ignore[misc]
            if self._ccb[w].version == version:
                self._iteration_end(w, now)
        # "wake": nothing to do; the dispatch that follows asks the core again

    def _dispatch(self, now: float) -> None:
        """Hand the core's dispatches to the simulated workers, then arm the core's wake-up."""
        dispatches = self.core.schedule(now)
        self.batches.extend(d.batch for d in dispatches)
        if self.continuous:
            for d in dispatches:
                self._ccb[d.worker].pending.append(d)
                self.stats.batches += 1
                self.stats.batch_requests += d.batch.size
            for w in sorted({d.worker for d in dispatches}):
                self._track_reservation(w)
            for w, wk in enumerate(self._ccb):
                if not wk.scheduled:
                    self._plan(w, now)
                elif wk.pending and wk.seg is not None:
                    self._cut_segment(w, now)
        else:
            for d in dispatches:
                self._start_batch(d, now)
        wake = self.core.next_wakeup(now)
        if wake is not None:
            at = wake if wake > now else now + _WAKE_GUARD_S
            if not (now < self._wake_at <= at):  # no earlier wake-up already armed
                self._wake_at = at
                self._push(at, "wake", None)

    # -- outcomes -------------------------------------------------------------------------------
    def _count(self, up: Update) -> None:
        self._done += len(up.finished)
        self._bar.update(len(up.finished))  # type: ignore[union-attr]

    def _first_token_at_end(self, up: Update, now: float) -> None:
        for r in up.finished:
            if r.status != RequestStatus.FINISHED_ERROR and (self.ttft == "batch-end" or r.first_token_at is None):
                r.first_token_at = now

    # -- static workers -------------------------------------------------------------------------
    def _oom_token(self, L: int, gens: list[int]) -> int | None:
        """Early exit: the token whose cache first crosses the KV capacity as the batch shrinks
        (rows with ``G`` tokens hold ``L + g`` tokens while ``g <= G``), None when it fits."""
        prev, live = 0, len(gens)
        for g in sorted(set(gens)):
            if live * (L + g) > self.kv_cap:
                return max(math.floor(self.kv_cap / live - L) + 1, prev + 1)
            self.stats.peak_kv_frac = max(self.stats.peak_kv_frac, live * (L + g) / self.kv_cap)
            prev, live = g, live - gens.count(g)
        return None

    def _start_shrinking(self, d: Dispatch, now: float) -> None:
        """Early exit: rows end (and leave) at their own lengths; an OOM hits the rows still live."""
        cost, st, batch = self.cost, self.stats, d.batch
        L, reqs = batch.max_prompt, batch.requests
        gens = [r.true_tokens for r in reqs]
        g0 = self._oom_token(L, gens)  # type: ignore[arg-type]
        ran = gens if g0 is None else [min(g, g0) for g in gens]  # type: ignore[type-var]
        ends = cost.row_end_times(L, ran)  # type: ignore[arg-type]
        duration = max(ends)
        prefill = cost.prefill_time(batch.size, L)
        if self.ttft == "first-token" and batch.size * L <= self.kv_cap:
            for r in reqs:
                if r.first_token_at is None:
                    r.first_token_at = now + cost.hw.batch_overhead_s + prefill
        by_end: dict[float, list[RowOutput]] = {}
        for r, g, end in zip(reqs, gens, ends, strict=True):
            if (g0 is None and end < duration) or (g0 is not None and g < g0):
                by_end.setdefault(end, []).append(_row(r, g))  # type: ignore[arg-type]
        for end, rows in sorted(by_end.items()):
            self._push(now + end, "rows", (d, rows))
        oom = g0 is not None
        stats = BatchStats(batch.id, batch.size, L, max(ran), prefill, duration - prefill - cost.hw.batch_overhead_s,
                           valid_tokens=0 if oom else sum(gens), total_tokens=sum(ran), oom=oom,  # type: ignore[arg-type]
                           start_time=now, end_time=now + duration)
        st.total_tokens += sum(ran)  # type: ignore[arg-type]
        st.batches += 1
        st.batch_requests += batch.size
        st.busy_s += duration + self.turnaround_s
        self._push(now + duration, "batch", (d, stats))

    def _start_batch(self, d: Dispatch, now: float) -> None:
        if self.early_exit:
            self._start_shrinking(d, now)
            return
        cost, st, batch = self.cost, self.stats, d.batch
        size = batch.size
        L = batch.max_prompt
        G = max(r.true_tokens for r in batch.requests)  # type: ignore[type-var]
        prefill = cost.prefill_time(size, L)
        overhead = cost.hw.batch_overhead_s
        if size * (L + G) > self.kv_cap:
            g0 = math.floor(self.kv_cap / size - L) + 1  # the token whose cache crosses the limit
            duration = cost.batch_time(size, L, max(g0, 1)) if g0 >= 1 else prefill + overhead
            st.total_tokens += size * max(g0 - 1, 0)
            oom, gen = True, max(g0 - 1, 0)
        else:
            duration = cost.batch_time(size, L, G)
            st.total_tokens += size * G
            st.peak_kv_frac = max(st.peak_kv_frac, size * (L + G) / self.kv_cap)
            oom, gen = False, G
        if self.ttft == "first-token" and size * L <= self.kv_cap:  # the prefill completed
            for r in batch.requests:
                if r.first_token_at is None:
                    r.first_token_at = now + overhead + prefill
        stats = BatchStats(batch.id, size, L, gen, prefill, duration - prefill - overhead,
                           valid_tokens=0 if oom else sum(r.true_tokens for r in batch.requests),  # type: ignore[misc]
                           total_tokens=size * gen, oom=oom, start_time=now, end_time=now + duration)
        st.batches += 1
        st.batch_requests += size
        st.busy_s += duration + self.turnaround_s
        self._push(now + duration, "batch", (d, stats))

    def _batch_end(self, payload: tuple[Dispatch, BatchStats], now: float) -> None:
        d, stats = payload
        if stats.oom:
            self.stats.oom_batches += 1
            out = BatchOutput(d.batch.id, Outcome.OOM, [], stats, "oom: simulated")
        else:
            out = BatchOutput(d.batch.id, Outcome.OK, [_row(r, r.true_tokens) for r in d.batch.requests], stats)
        up = self.core.update_from_output(d.worker, out, now)
        if self.turnaround_s > 0:
            self.core.set_ready(d.worker, False)
            self._push(now + self.turnaround_s, "free", d.worker)
        self._first_token_at_end(up, now)
        self._count(up)

    # -- continuous workers ---------------------------------------------------------------------
    def _track_reservation(self, w: int) -> None:
        admission = getattr(self.policy, "admission", None)  # CCB's reservations (pcb reserves its own way)
        if admission is None:
            return
        adm = admission(w)
        if adm.running > 1 or adm.used <= adm.theta:
            self.stats.peak_reserved_frac = max(self.stats.peak_reserved_frac, adm.used / adm.theta)

    def _step(self, n: int, kv: float, width: float) -> float:
        return self.cost.step_time(n, width if self.padded else kv / n)

    @staticmethod
    def _width(wk: _Continuous, it: int) -> float:
        """The longest running row's cached tokens at the end of iteration ``it``."""
        return max((run.base + it - run.start_it + 1 for _, _, run in wk.heap), default=0)

    def _plan(self, w: int, now: float) -> None:
        """At a boundary with nothing scheduled: a prefill step for joiners, else a decode segment
        up to the next departure."""
        wk = self._ccb[w]
        wk.version += 1
        if wk.pending:
            new, wk.pending = wk.pending, []
            dt = self.cost.prefill_time(len(new), max(r.prompt_tokens + len(r.resume_ids)
                                                      for d in new for r in d.batch.requests))
            if wk.n:
                dt += self._step(wk.n, wk.kv, self._width(wk, wk.it))
                wk.kv += wk.n
            self.stats.total_tokens += wk.n + len(new)
            wk.it += 1
            t = now + dt
            for d in new:
                self._join(wk, d, t)
            wk.seg = None
        elif wk.n:
            wk.seg = (now, wk.it, wk.kv)
            t, target = now, wk.heap[0][0]
            if self.progress_every:  # stop at the next progress report
                target = min(target, (wk.it // self.progress_every + 1) * self.progress_every)
            n, kv, it = wk.n, wk.kv, wk.it
            width = self._width(wk, it)
            while it < target:
                t += self._step(n, kv, width)
                kv += n
                width += 1
                it += 1
            self.stats.total_tokens += n * (it - wk.it)
            wk.kv, wk.it = kv, it
        else:
            wk.scheduled = False
            return
        wk.t = t
        wk.scheduled = True
        self.stats.busy_s += t - now
        self.stats.peak_kv_frac = max(self.stats.peak_kv_frac, wk.kv / self.kv_cap)
        self._push(t, "iter", (w, wk.version))

    def _join(self, wk: _Continuous, d: Dispatch, first_token: float) -> None:
        (r,) = d.batch.requests
        prompt = r.prompt_tokens + len(r.resume_ids)  # a resumed row prefills the tokens it had too
        g = r.true_tokens - len(r.resume_ids)  # type: ignore[operator]
        run = _Running(r, d.batch.id, wk.it, wk.it + g - 1, base=prompt)
        if wk.kv + prompt + g > self.kv_cap:  # only a force-admitted request can be this large
            g0 = max(math.floor(self.kv_cap - wk.kv - prompt) + 1, 1)
            run.end_it, run.oom = wk.it + g0 - 1, True
        elif r.first_token_at is None:
            r.first_token_at = first_token
        wk.kv += prompt + 1
        wk.n += 1
        self._seq += 1
        heapq.heappush(wk.heap, (run.end_it, self._seq, run))

    def _cut_segment(self, w: int, now: float) -> None:
        """Joiners arrived mid-segment: end the segment at the first boundary at or after ``now``."""
        wk = self._ccb[w]
        t, it, kv = wk.seg  # type: ignore[misc]
        n = wk.n
        width = self._width(wk, it)  # no row joined or left during the segment
        while t < now and it < wk.it:
            t += self._step(n, kv, width)
            kv += n
            width += 1
            it += 1
        if it == wk.it:
            return  # the scheduled end is that boundary anyway
        self.stats.total_tokens -= n * (wk.it - it)
        self.stats.busy_s -= wk.t - t
        wk.kv, wk.it, wk.t, wk.seg = kv, it, t, None
        wk.version += 1
        self._push(t, "iter", (w, wk.version))

    def _iteration_end(self, w: int, now: float) -> None:
        wk = self._ccb[w]
        wk.scheduled = False
        while wk.heap and wk.heap[0][0] <= wk.it:
            _, _, run = heapq.heappop(wk.heap)
            r = run.req
            gen = run.end_it - run.start_it + 1
            wk.n -= 1
            wk.kv -= run.base + gen
            stats = BatchStats(run.batch_id, 1, r.prompt_tokens, gen, 0.0, 0.0, gen, gen, oom=run.oom)
            if run.oom:
                self.stats.oom_batches += 1
                out = BatchOutput(run.batch_id, Outcome.OOM, [], stats, "oom: simulated")
            else:
                out = BatchOutput(run.batch_id, Outcome.OK, [_row(r, r.true_tokens)], stats)  # type: ignore[arg-type]
            self._count(self.core.update_from_output(w, out, now))
        if wk.n and self.progress_every and wk.it % self.progress_every == 0:
            self._report_progress(w, now)
        if not wk.n:
            wk.kv = 0.0  # no float drift when empty
        # the dispatch that follows admits joiners and plans the next step

    def _report_progress(self, w: int, now: float) -> None:
        """The worker's progress report; the rows the policy names leave (their cache freed) and
        wait again with the tokens they had."""
        wk = self._ccb[w]
        runs = {run.req.id: run for _, _, run in wk.heap}
        progress = [RowProgress(rid, run.generated(wk.it), False) for rid, run in runs.items()]
        victims = [r for r in self.core.update_progress(w, progress, now) if r.id in runs]
        if not victims:
            return
        dropped = []
        for r in victims:
            run = runs.pop(r.id)
            wk.n -= 1
            wk.kv -= run.base + (wk.it - run.start_it + 1)
            dropped.append(Preempted(r.id, [0] * run.generated(wk.it)))
        wk.heap = [e for e in wk.heap if e[2].req.id in runs]
        heapq.heapify(wk.heap)
        self.stats.preemptions += len(dropped)
        self._count(self.core.update_preempted(w, dropped, now))
