"""Replay a measured run in simulation: ``magnus simulate --replay RECORDS.json``.

A load-generator result (``magnus bench load --out FILE``, or the ``records_<rate>.json`` that
``magnus bench compare`` keeps for every run) holds each request's send time, prompt tokens,
completion tokens and ``max_tokens``: the trace the real server saw. Replayed, the simulator gets
the same requests at the same times, so its metrics compare one to one with the measured ones
(:func:`compare_table`).

What a real request pays outside its batch is fitted from the server's SQLite request log, joined
to the records on the completion id (:func:`fit_overheads`):

* ``ingress``: client send -> the scheduler sees the request (HTTP, chat template, tokenisation);
* ``egress``: the engine finishes the request -> the client has its last byte (SSE, HTTP);
* ``turnaround``: a worker's batch ends -> the engine dispatches the next batch to it, when
  requests were waiting (result transfer, engine wake-up, the policy's decision, batch transfer).

Batch times come from the cost model fitted to the same log (``--fit-log``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.loadgen.load import RequestRecord, Summary
from bench.sim.workload import Row, Workload


@dataclass(frozen=True)
class Overheads:
    """Per-request and per-batch latencies outside the batch's compute (seconds)."""

    ingress_s: float = 0.0
    egress_s: float = 0.0
    turnaround_s: float = 0.0
    samples: int = 0  # requests the per-request figures were fitted on
    batch_samples: int = 0  # back-to-back batch pairs the turnaround was fitted on

    def describe(self) -> str:
        return (f"ingress {self.ingress_s * 1e3:.0f} ms, egress {self.egress_s * 1e3:.0f} ms per request "
                f"({self.samples} requests); worker turnaround {self.turnaround_s * 1e3:.0f} ms per batch "
                f"({self.batch_samples} back-to-back batches)")


NO_OVERHEADS = Overheads()


def logged_predictions(db: str | Path) -> dict[str, tuple[int, int | None]]:
    """The server's length prediction (point, high) per completion id (predictive policies log one)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT id, predicted_tokens, predicted_high FROM requests WHERE predicted_tokens IS NOT NULL")
        return {rid: (int(p), None if h is None else int(h)) for rid, p, h in rows}


def replay_workload(records: Sequence[RequestRecord], db: str | Path | None = None) -> Workload:
    """The records as a simulator workload in send order, arrivals relative to the first send;
    with the server's log ``db``, each request carries the length the server predicted for it
    (``--prediction file``).

    A request the real server did not answer has no true length: it is simulated at its
    ``max_tokens`` (and its prompt length, when the records lack it, as the median one)."""
    predicted = logged_predictions(db) if db is not None else {}
    recs = sorted(records, key=lambda r: r.send)
    known = [r.prompt_tokens for r in recs if r.prompt_tokens]
    median_prompt = int(np.median(known)) if known else 1
    rows, guessed = [], 0
    for k, r in enumerate(recs):
        if r.ok and r.completion_tokens:
            out = min(r.completion_tokens, r.max_tokens)
        else:
            out, guessed = r.max_tokens, guessed + 1
        prompt = r.prompt_tokens or median_prompt
        pred, high = predicted.get(r.response_id, (None, None)) if r.response_id else (None, None)
        rows.append(Row(f"{r.id}#{k}", r.app, prompt, prompt, r.max_tokens, max(1, out), pred, high))
    t0 = recs[0].send
    notes = [f"replay of {len(recs)} measured requests: their send times, prompt and completion tokens"]
    with_pred = sum(row.predicted_tokens is not None for row in rows)
    if with_pred:
        notes.append(f"{with_pred} requests carry the server's logged length prediction (use --prediction file)")
    if guessed:
        notes.append(f"{guessed} requests were not answered in the real run: simulated at max_tokens")
    return Workload(rows, [r.send - t0 for r in recs], "truth", "file", notes)


def fit_overheads(records: Sequence[RequestRecord], db: str | Path) -> Overheads:
    """Median ingress / egress of the answered records found in the server log ``db`` (joined on
    ``response_id``), and the median worker turnaround between back-to-back batches."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        logged = {
            rid: (arrival, finish)
            for rid, arrival, finish in conn.execute(
                "SELECT id, arrival, finish FROM requests WHERE status = 'ok' AND arrival IS NOT NULL")
        }
        batches = conn.execute(
            "SELECT id, worker, dispatch, end FROM batches WHERE dispatch IS NOT NULL AND end IS NOT NULL "
            "ORDER BY worker, dispatch").fetchall()
        first_arrival = dict(conn.execute(
            "SELECT batch_id, MIN(arrival) FROM requests WHERE batch_id IS NOT NULL GROUP BY batch_id").fetchall())
    ingress, egress = [], []
    for r in records:
        hit = logged.get(r.response_id) if r.response_id else None
        if hit is None or not r.ok or r.end is None:
            continue
        arrival, finish = hit
        ingress.append(arrival - r.send)
        egress.append(r.end - finish)
    if not any(r.response_id for r in records):
        return Overheads()  # records of a load generator that did not keep completion ids
    if not ingress:
        raise ValueError(f"{db}: none of the records' completion ids is in this log (a log of another run?)")
    # back to back: the next batch on the same worker held a request that was already waiting
    # when the previous one ended, so the gap is the turnaround, not a wait for work
    turns = [
        disp1 - end0
        for (_, w0, _, end0), (bid, w1, disp1, _) in zip(batches, batches[1:], strict=False)
        if w0 == w1 and first_arrival.get(bid, end0) < end0 <= disp1
    ]
    return Overheads(
        ingress_s=max(0.0, float(np.median(ingress))), egress_s=max(0.0, float(np.median(egress))),
        turnaround_s=float(np.median(turns)) if turns else 0.0, samples=len(ingress), batch_samples=len(turns),
    )


def _diff(measured: float | None, simulated: float | None) -> str:
    if not measured or simulated is None:
        return "n/a"
    return f"{(simulated - measured) / measured * 100:+.0f}%"


def compare_table(measured: Summary, simulated: Summary) -> str:
    """Markdown: the replayed run's measured metrics next to the simulated ones."""
    def row(name: str, m: float | None, s: float | None, digits: int = 3) -> str:
        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.{digits}f}"

        return f"| {name} | {f(m)} | {f(s)} | {_diff(m, s)} |"

    mr, sr = measured.response_time, simulated.response_time
    return "\n".join([
        "| metric | measured | simulated | diff |", "| --- | ---: | ---: | ---: |",
        f"| answered / sent | {measured.completed} / {measured.sent} | {simulated.completed} / {simulated.sent} | |",
        row("throughput (req/s)", measured.request_throughput, simulated.request_throughput),
        row("mean response time (s)", mr["mean"], sr["mean"], 2),
        row("p50 response time (s)", mr["p50"], sr["p50"], 2),
        row("p95 response time (s)", mr["p95"], sr["p95"], 2),
        row("mean TTFT (s)", measured.ttft["mean"], simulated.ttft["mean"], 2),
        row("valid tokens/s", measured.valid_token_throughput, simulated.valid_token_throughput, 1),
    ])
