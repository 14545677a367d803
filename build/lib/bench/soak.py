"""Soak test: steady load for N minutes, reporting RSS growth of the server and its workers.

    .venv/bin/python -m bench.soak                      # starts its own server (default model), 10 min
    .venv/bin/python -m bench.soak --minutes 2 --model /path/to/model --policy magnus
    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --pid 1234   # a running server

Memory is sampled every ``--sample-s`` seconds for the server process and all its children (the
worker processes, including restarted ones). Growth is measured from the first sample after the
warm-up (``--warmup-s``: caches and allocator pools fill up, and the first length-predictor
retraining, after 180 s by default, builds its forest: a one-time step of about 100 MiB) to the
last (medians of three samples at each end), with a least-squares slope in MiB per minute.
Loopback only; it stops by itself at the deadline. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import httpx
import openai
import psutil

from service.launcher import start_server

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired engineers watch a slow batch "
         "finish on one small machine in the early morning").split()


@dataclass
class Sample:
    t: float  # seconds since the load started
    server_mib: float
    workers_mib: float
    workers: int
    done: int  # requests finished so far

    @property
    def total_mib(self) -> float:
        return self.server_mib + self.workers_mib


@dataclass
class SoakResult:
    minutes: float
    requests: int
    outcomes: dict[str, int]
    baseline_mib: float
    final_mib: float
    growth_mib: float
    slope_mib_per_min: float
    server_growth_mib: float
    workers_growth_mib: float
    samples: list[dict] = field(default_factory=list)


def rss(pid: int) -> tuple[float, float, int]:
    """(server MiB, children MiB, number of children) for ``pid`` and its descendants."""
    proc = psutil.Process(pid)
    server = proc.memory_info().rss
    kids = 0
    n = 0
    for child in proc.children(recursive=True):
        try:
            kids += child.memory_info().rss
            n += 1
        except psutil.NoSuchProcess:
            pass
    return server / 2**20, kids / 2**20, n


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


async def client_loop(c: openai.AsyncOpenAI, model: str, deadline: float, max_tokens: int, rng: random.Random,
                      outcomes: Counter) -> None:
    """One client: requests back to back (mixed chat/completion, streaming or not) until ``deadline``."""
    while time.monotonic() < deadline:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
        stream = rng.random() < 0.5
        try:
            if rng.random() < 0.5:
                r = await c.chat.completions.create(
                    model=model, messages=[{"role": "system", "content": "Summarize."},
                                           {"role": "user", "content": text}],
                    max_tokens=rng.randint(1, max_tokens), temperature=rng.choice([0.0, 0.8]), stream=stream)
            else:
                r = await c.completions.create(model=model, prompt=text, max_tokens=rng.randint(1, max_tokens),
                                               temperature=rng.choice([0.0, 0.8]), stream=stream)
            if stream:
                async for _ in r:
                    pass
            outcomes["ok"] += 1
        except openai.APIStatusError as exc:
            outcomes[str(exc.status_code)] += 1
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            outcomes[type(exc).__name__] += 1


async def soak(url: str, pid: int, minutes: float, concurrency: int, max_tokens: int, sample_s: float,
               warmup_s: float, seed: int) -> SoakResult:
    c = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="soak", max_retries=0, timeout=300)
    model = (await c.models.list()).data[0].id
    outcomes: Counter = Counter()
    rng = random.Random(seed)
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    clients = [asyncio.create_task(client_loop(c, model, deadline, max_tokens, random.Random(rng.random()), outcomes))
               for _ in range(concurrency)]
    samples: list[Sample] = []
    while time.monotonic() < deadline:
        s, w, n = rss(pid)
        samples.append(Sample(time.monotonic() - t0, s, w, n, sum(outcomes.values())))
        print(f"[{samples[-1].t:6.0f} s] server {s:7.1f} MiB  workers({n}) {w:7.1f} MiB  "
              f"requests {samples[-1].done}  {dict(outcomes)}", flush=True)
        await asyncio.sleep(min(sample_s, max(0.0, deadline - time.monotonic())))
    await asyncio.gather(*clients)
    s, w, n = rss(pid)
    samples.append(Sample(time.monotonic() - t0, s, w, n, sum(outcomes.values())))
    await c.close()
    steady = [x for x in samples if x.t >= warmup_s] or samples[-1:]
    first, last = steady[:3], steady[-3:]  # medians of three: one batch's transient peak is no trend

    def growth(key: str) -> float:
        return round(median(getattr(x, key) for x in last) - median(getattr(x, key) for x in first), 1)

    return SoakResult(
        minutes=minutes, requests=sum(outcomes.values()), outcomes=dict(outcomes),
        baseline_mib=round(median(x.total_mib for x in first), 1), final_mib=round(median(x.total_mib for x in last), 1),
        growth_mib=growth("total_mib"),
        slope_mib_per_min=round(slope([(x.t / 60, x.total_mib) for x in steady]), 2),
        server_growth_mib=growth("server_mib"), workers_growth_mib=growth("workers_mib"),
        samples=[asdict(x) for x in samples],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--pid", type=int, help="the running server's pid (with --url)")
    p.add_argument("--model", default="default", help="model for the server this starts")
    p.add_argument("--policy", default="magnus", help="policy for the server this starts")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=15.0)
    p.add_argument("--warmup-s", type=float, default=240.0,
                   help="not counted: covers the first predictor retraining (180 s), a one-time step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the result (with every sample) as JSON")
    args = p.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("--url must be a loopback address")
    srv = None
    if args.url:
        url, pid = args.url, args.pid
        if pid is None:
            p.error("--url needs --pid (the server process to measure)")
    else:
        work = Path(tempfile.mkdtemp(prefix="magnus-soak-"))
        print(f"starting a server ({args.model}, {args.policy}) in {work}", flush=True)
        srv = start_server(work, args.model, policy=args.policy)
        url, pid = srv.base_url, srv.proc.pid
    try:
        httpx.get(url + "/health", timeout=10).raise_for_status()
        res = asyncio.run(soak(url, pid, args.minutes, args.concurrency, args.max_tokens, args.sample_s,
                               min(args.warmup_s, args.minutes * 30), args.seed))
    finally:
        if srv is not None:
            srv.stop()
    print(f"\nsoak {res.minutes:g} min: {res.requests} requests {res.outcomes}")
    print(f"RSS server+workers: {res.baseline_mib} MiB after warm-up -> {res.final_mib} MiB "
          f"(growth {res.growth_mib:+} MiB: server {res.server_growth_mib:+}, workers {res.workers_growth_mib:+}; "
          f"slope {res.slope_mib_per_min:+} MiB/min)")
    if args.out:
        args.out.write_text(json.dumps(asdict(res), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
