"""Open-loop load generator: requests of a workload at Poisson (or burstier) arrival times.

Each request streams through the official ``openai.AsyncOpenAI`` client; the generator records
when it was sent, its first token, its end, its completion tokens and its status. Sending stops
after ``n`` requests or ``duration`` seconds, whichever comes first; every request has its own
timeout, so a run always ends.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import openai
from tqdm import tqdm

from bench.workload.records import Request, chat_messages


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s) of ``n`` requests at mean ``rate`` per second.

    Inter-arrival times are gamma distributed with shape ``1 / burstiness`` and mean ``1 / rate``:
    burstiness 1 is a Poisson process, larger values are burstier, smaller ones more regular.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    shape = 1.0 / burstiness
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))


@dataclass
class RequestRecord:
    """What happened to one request; times are wall-clock seconds (``time.time()``)."""

    id: str
    app: str
    max_tokens: int
    send: float
    first_token: float | None = None
    end: float | None = None
    completion_tokens: int | None = None  # usage.completion_tokens of the final chunk
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    status: str = "ok"  # "ok", "http_<code>", "timeout", "connection" or an exception name
    error: str | None = None
    response_id: str | None = None  # the completion's id (the server's request-log id)
    chunk_times: list[float] | None = None  # arrival of every chunk with text (for the inter-token latency)
    gave_up: float | None = None  # when the client stopped waiting for an unanswered request (timeout)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as ``vllm bench serve``: (end - first) / (n - 1)."""
        n = self.completion_tokens or 0
        if not self.ok or self.first_token is None or self.end is None or n < 2:
            return None
        return (self.end - self.first_token) / (n - 1)


async def send_request(client: openai.AsyncOpenAI, model: str, req: Request) -> RequestRecord:
    """Send one streaming chat completion and record its timings; never raises for API errors."""
    rec = RequestRecord(req.id, req.app, req.max_tokens, send=time.time())
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=chat_messages(req.instruction, req.input),
            max_tokens=req.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        rec.chunk_times = []
        async for chunk in stream:
            rec.response_id = rec.response_id or chunk.id
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta.content:
                    now = time.time()
                    rec.first_token = rec.first_token or now
                    rec.chunk_times.append(now)
                rec.finish_reason = choice.finish_reason or rec.finish_reason
            if chunk.usage is not None:
                rec.completion_tokens = chunk.usage.completion_tokens
                rec.prompt_tokens = chunk.usage.prompt_tokens
        rec.end = time.time()
    except openai.APIStatusError as exc:
        rec.status, rec.error = f"http_{exc.status_code}", str(exc)[:500]
    except openai.APITimeoutError as exc:
        rec.status, rec.error, rec.gave_up = "timeout", str(exc)[:500], time.time()
    except openai.APIConnectionError as exc:
        rec.status, rec.error = "connection", str(exc)[:500]
    except (openai.OpenAIError, ValueError) as exc:
        rec.status, rec.error = type(exc).__name__, str(exc)[:500]
    return rec


async def run_load(
    client: openai.AsyncOpenAI,
    model: str,
    requests: Sequence[Request],
    arrivals: Sequence[float],
    duration: float | None = None,
    progress: bool = True,
    grace: float | None = None,
    desc: str = "",
) -> list[RequestRecord]:
    """Send ``requests[i]`` at ``arrivals[i]`` seconds from now (open loop) until ``duration``.

    Returns the records of the requests sent, in sending order, once all of them have ended.
    With ``grace``, waits at most that many seconds after sending stops; requests still unanswered
    then are cancelled and recorded as ``timeout``, so the run is bounded in time.
    """
    start = time.time()
    bar = tqdm(total=len(requests), unit="req", desc=desc, disable=not progress, leave=grace is None)
    sent: list[tuple[Request, float, asyncio.Task[RequestRecord]]] = []
    for req, at in zip(requests, arrivals, strict=True):
        if duration is not None and at > duration:
            break
        await asyncio.sleep(max(0.0, start + at - time.time()))
        task = asyncio.create_task(send_request(client, model, req))
        task.add_done_callback(lambda _: bar.update())
        sent.append((req, time.time(), task))
    bar.total = len(sent)
    bar.refresh()
    pending: set[asyncio.Task[RequestRecord]] = set()
    if sent:
        _, pending = await asyncio.wait([t for _, _, t in sent], timeout=grace)
    for task in pending:
        task.cancel()
    gave_up = time.time()
    await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    records = []
    for req, at, task in sent:
        if task in pending:
            records.append(RequestRecord(req.id, req.app, req.max_tokens, send=at, status="timeout",
                                         error=GRACE_ERROR.format(grace=grace), gave_up=gave_up))
        else:
            records.append(task.result())
    return records


def summary_stats(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median, 90th, 95th and 99th percentiles (None for an empty list)."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}
    a = np.asarray(values, dtype=float)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p95": float(p95), "p99": float(p99)}


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput (seconds; None: not required), as ``vllm bench serve --goodput``."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """``"ttft:2 tpot:0.1 e2e:30"`` (seconds; any subset)."""
        values: dict[str, float] = {}
        for part in text.replace(",", " ").split():
            key, _, value = part.partition(":")
            if key not in ("ttft", "tpot", "e2e") or not value:
                raise ValueError(f"bad SLO {part!r}: use ttft:SECONDS, tpot:SECONDS, e2e:SECONDS")
            values[key] = float(value)
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        checks = ((self.ttft, None if r.first_token is None else r.first_token - r.send), (self.tpot, r.tpot),
                  (self.e2e, None if r.end is None else r.end - r.send))
        return r.ok and all(limit is None or (v is not None and v <= limit) for limit, v in checks)


DEFAULT_SLO = SLO(ttft=5.0, tpot=0.5, e2e=60.0)  # an interactive CPU deployment of a small model


def batch_tokens(db: str, start: float, end: float) -> int:
    """Total tokens of the batches in the server's SQLite log that started within [start, end]."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(total_tokens), 0) FROM batches WHERE start >= ? AND start <= ?", (start, end)
        ).fetchone()
    return int(row[0])


@dataclass
class Summary:
    """Metrics of one run (seconds, requests per second, tokens per second)."""

    sent: int
    completed: int
    errors: dict[str, int]
    duration: float  # first send to last end
    request_throughput: float
    response_time: dict[str, float | None]
    ttft: dict[str, float | None]
    valid_tokens: int
    valid_token_throughput: float
    output_token_throughput: float = 0.0  # = valid_token_throughput, under vLLM's name
    tpot: dict[str, float | None] = field(default_factory=dict)  # time per output token after the first
    itl: dict[str, float | None] = field(default_factory=dict)  # inter-token (chunk) latency
    short_half_response_time: dict[str, float | None] = field(default_factory=dict)  # the shorter half by output
    # answered AND timed-out requests, a timed-out one counted at the time it waited (``waited``):
    # a lower bound of the latency a policy gave, that does not flatter a policy which leaves requests unanswered
    response_time_with_unanswered: dict[str, float | None] = field(default_factory=dict)
    goodput: float = 0.0  # requests per second that met ``slo``
    slo: dict[str, float | None] = field(default_factory=dict)
    total_tokens: int | None = None  # from the server's batch log, when given
    total_token_throughput: float | None = None
    window: tuple[float, float] = field(default=(0.0, 0.0))  # wall-clock start and end


def run_window(records: Sequence[RequestRecord]) -> tuple[float, float]:
    """Wall-clock time of the first send and of the last end (the run's measurement window)."""
    start = min((r.send for r in records), default=0.0)
    return start, max([r.end for r in records if r.end is not None] + [start])


GRACE_ERROR = "no answer {grace:g} s after sending stopped"  # a request cancelled at the end of the grace


def waited(r: RequestRecord, last_send: float, run_end: float) -> float | None:
    """How long a request waited: to its end when answered; a timed-out one until the client gave
    up; None for any other error. Records from before ``gave_up`` was kept: a request cancelled at
    the end of the grace waited until the last send plus the grace its error names, a client
    timeout until ``run_end`` (the run's last answer, earlier: still a lower bound)."""
    if r.ok and r.end is not None:
        return r.end - r.send
    if r.status != "timeout":
        return None
    gave_up = r.gave_up
    if gave_up is None:
        gave_up = run_end
        head, _, tail = GRACE_ERROR.partition("{grace:g}")
        if r.error and r.error.startswith(head) and r.error.endswith(tail):
            try:
                gave_up = max(run_end, last_send + float(r.error[len(head):len(r.error) - len(tail)]))
            except ValueError:
                pass
    return max(gave_up - r.send, 0.0)


def summarize(records: Sequence[RequestRecord], total_tokens: int | None = None, slo: SLO = DEFAULT_SLO) -> Summary:
    """Throughputs and latency statistics of a run, in ``vllm bench serve``'s terms (TTFT, TPOT,
    ITL, end-to-end latency, goodput under ``slo``), plus the shorter half's response time.

    ``total_tokens``: tokens the server computed in the run window (see ``batch_tokens``).
    """
    done = [r for r in records if r.ok and r.end is not None]
    start, end = run_window(records)
    last_send = max((r.send for r in records), default=start)
    duration = end - start

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    valid = sum(r.completion_tokens or 0 for r in done)
    by_length = sorted(done, key=lambda r: r.completion_tokens or 0)
    short = by_length[: len(by_length) // 2]
    itl = [b - a for r in done if r.chunk_times for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return Summary(
        sent=len(records),
        completed=len(done),
        errors=dict(Counter(r.status for r in records if not r.ok)),
        duration=duration,
        request_throughput=rate(len(done)),
        response_time=summary_stats([r.end - r.send for r in done if r.end is not None]),
        ttft=summary_stats([r.first_token - r.send for r in done if r.first_token is not None]),
        valid_tokens=valid,
        valid_token_throughput=rate(valid),
        output_token_throughput=rate(valid),
        tpot=summary_stats([t for r in done if (t := r.tpot) is not None]),
        itl=summary_stats(itl),
        short_half_response_time=summary_stats([r.end - r.send for r in short if r.end is not None]),
        response_time_with_unanswered=summary_stats(
            [w for w in (waited(r, last_send, end) for r in records) if w is not None]),
        goodput=rate(sum(slo.met(r) for r in done)),
        slo=asdict(slo),
        total_tokens=total_tokens,
        total_token_throughput=None if total_tokens is None else rate(total_tokens),
        window=(start, end),
    )


def summary_table(s: Summary) -> str:
    """The summary as a markdown table."""

    def f(x: float | None, unit: str = " s") -> str:
        return "n/a" if x is None else f"{x:.3f}{unit}"

    rt, ttft = s.response_time, s.ttft
    rows = [
        ("requests sent / completed", f"{s.sent} / {s.completed}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "none"),
        ("duration", f(s.duration)),
        ("request throughput", f(s.request_throughput, " req/s")),
        ("response time mean / p50", f"{f(rt['mean'])} / {f(rt['p50'])}"),
        ("response time p90 / p95 / p99", f"{f(rt.get('p90'))} / {f(rt['p95'])} / {f(rt['p99'])}"),
        ("shorter half's response time mean", f(s.short_half_response_time.get("mean"))),
        ("TTFT mean / p95", f"{f(ttft['mean'])} / {f(ttft['p95'])}"),
        ("TPOT mean / p95", f"{f(s.tpot.get('mean'))} / {f(s.tpot.get('p95'))}"),
        ("ITL mean / p95", f"{f(s.itl.get('mean'))} / {f(s.itl.get('p95'))}"),
        ("goodput " + " ".join(f"{k}<={v:g}s" for k, v in s.slo.items() if v is not None),
         f(s.goodput, " req/s")),
        ("valid-token throughput", f(s.valid_token_throughput, " tok/s")),
        ("total-token throughput", f(s.total_token_throughput, " tok/s")),
    ]
    return "\n".join(["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def read_text(path: str | Path) -> str:
    """A text file's contents, gunzipped when its name ends in ``.gz``."""
    if str(path).endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(path).read_text()


def read_result(path: str | Path) -> tuple[dict, list[RequestRecord]]:
    """The config and per-request records of a result JSON (``result_json``: ``bench load --out``,
    or the ``records_<rate>.json`` that ``bench compare`` keeps for every run); ``.gz``: gzipped."""
    doc = read_result_doc(path)
    return dict(doc.get("config") or {}), doc["records"]


def read_result_doc(path: str | Path) -> dict:
    """A result JSON as written (config, summary), its ``requests`` parsed into ``records``."""
    doc = json.loads(read_text(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise ValueError(f"{path}: not a load result (no 'requests' list); write one with magnus bench load --out")
    names = {f.name for f in fields(RequestRecord)}
    records = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in doc["requests"]]
    if not records:
        raise ValueError(f"{path}: no requests")
    return {**doc, "records": records}


def result_json(config: dict, summary: Summary, records: Sequence[RequestRecord]) -> dict:
    """The JSON document of a run: its configuration, summary and per-request records."""
    return {"config": config, "summary": asdict(summary), "requests": [asdict(r) for r in records]}
