"""The simulated traffic: which workload rows arrive when with what prediction, the request
records of one policy run, and the load generator's records made from them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bench.loadgen.load import RequestRecord, arrival_times, summarize
from bench.sim.engine import Simulation
from bench.sim.replay import NO_OVERHEADS, Overheads
from bench.sim.report import PolicyRun
from bench.sim.setup import CostSetup, PolicyParams, build_policy
from bench.sim.workload import (
    DEFAULT_NOISE_SIGMA,
    Row,
    Workload,
    prediction_highs,
    predictions,
    sample_indices,
)
from predictor.types import Prediction
from scheduler.request import FailureCode, Request, RequestStatus


# -- traces ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """The simulated requests, shared by every policy of a run: which row, when, what prediction."""

    rows: list[Row]
    index: np.ndarray  # row of each request
    arrivals: np.ndarray  # seconds
    predicted: list[int]  # per row
    predicted_high: list[int]  # per row: the high estimate (= predicted without a calibrated one)


def make_trace(
    workload: Workload,
    n: int | None,
    rate: float | None,
    burstiness: float = 1.0,
    seed: int = 0,
    prediction: str = "noisy",
    sigma: float = DEFAULT_NOISE_SIGMA,
) -> Trace:
    """``n`` requests (every row once when None, else sampled with replacement) arriving at
    ``rate`` (gamma inter-arrivals, ``bench.loadgen.load.arrival_times``) or at the file's times."""
    rows = workload.rows
    pred = predictions(rows, prediction, sigma, seed + 1)
    if rate is None:
        if workload.arrivals is None:
            raise ValueError("give --rate (or --rates): the workload has no 'arrival' field")
        count = len(rows) if n is None else n
        if count > len(rows):
            raise ValueError("--n exceeds the file's rows; file arrival times cannot be resampled")
        index = np.arange(count)
        arrivals = np.asarray(workload.arrivals[:count], dtype=float)
        arrivals = arrivals - arrivals.min()
    else:
        index = sample_indices(len(rows), n, seed)
        arrivals = arrival_times(len(index), rate, burstiness, np.random.default_rng(seed + 2))
    return Trace(rows, index, arrivals, pred, prediction_highs(rows, prediction, pred))


@dataclass(frozen=True)
class Traced:
    """A simulated request and what only the load generator knows of it."""

    request: Request
    app: str  # the workload's application
    send: float  # when the client sent it (the scheduler sees it ``ingress_s`` later)


def trace_requests(trace: Trace, with_prediction: bool, ingress_s: float = 0.0) -> list[Traced]:
    """Fresh request objects for one policy run (predictions only for predictive policies); the
    scheduler sees each ``ingress_s`` after its client sent it."""
    out = []
    for k, (i, t) in enumerate(zip(trace.index.tolist(), trace.arrivals.tolist(), strict=True)):
        row = trace.rows[i]
        pred = Prediction(trace.predicted[i], trace.predicted_high[i], "simulated") if with_prediction else None
        req = Request(
            id=f"{row.id}#{k}", prompt_tokens=row.prompt_tokens, max_tokens=row.max_tokens, arrival=t + ingress_s,
            prediction=pred, true_tokens=row.output_tokens,
        )
        out.append(Traced(req, row.app, t))
    return out


def to_record(t: Traced, egress_s: float = 0.0) -> RequestRecord:
    """The load generator's record of a simulated request (the client gets its tokens
    ``egress_s`` after the engine)."""
    r = t.request
    ok = r.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)

    def client(x: float | None) -> float | None:
        return None if x is None else x + egress_s

    if ok:
        status = "ok"
    elif r.failure is not None and r.failure.code is FailureCode.INSUFFICIENT_MEMORY:
        status = "http_400"  # what the load generator records for the server's insufficient_memory error
    else:
        status = "unfinished"
    return RequestRecord(
        id=r.id, app=t.app, max_tokens=r.max_tokens, send=t.send,
        first_token=client(r.first_token_at) if ok else None,
        end=client(r.finished_at) if ok else None, completion_tokens=r.output_tokens if ok else None,
        prompt_tokens=r.prompt_tokens, finish_reason=r.finish_reason if ok else None,
        status=status, error=f"{r.failure.code.value}: {r.failure.message}" if r.failure else None,
    )


def simulate_policy(
    name: str,
    trace: Trace,
    setup: CostSetup,
    params: PolicyParams | None = None,
    workers: int = 8,
    ttft: str = "batch-end",
    progress: bool = False,
    rate: float | None = None,
    overheads: Overheads = NO_OVERHEADS,
    early_exit: bool = True,
    padded: bool = False,
) -> tuple[PolicyRun, list[Traced]]:
    """Run one policy on a trace; returns its metrics and the simulated requests. ``early_exit``
    as the server's ``--batch-exit early`` (default); False: the paper's literal static batches.
    ``padded``: continuous workers keep one left-padded cache (the server's iteration runner)."""
    start = time.perf_counter()
    policy = build_policy(name, setup, params or PolicyParams())
    reqs = trace_requests(trace, policy.needs_prediction, overheads.ingress_s)
    sim = Simulation(policy, setup.cost(name), workers, ttft=ttft, progress=progress,
                     turnaround_s=overheads.turnaround_s, early_exit=early_exit, padded=padded)
    stats = sim.run([t.request for t in reqs])
    summary = summarize([to_record(r, overheads.egress_s) for r in reqs], stats.total_tokens)
    return PolicyRun(name, rate, summary, stats, time.perf_counter() - start), reqs
