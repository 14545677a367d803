"""Throughput with one vs two Ray CPU workers (and the local backend as the control), one run, back to back.

    python -m bench.ray_scaling [--model default] [--workload bench/workloads/test.jsonl] [--n 24]
                                [--policy vs] [--batch-size 8] [--out bench/results/ray_scaling_cpu]

Each configuration serves the same burst of ``--n`` workload requests (all sent at once, their
own per-application max_tokens, greedy) on a fresh server:

* ``local``: the default backend, one worker process with torch's default threads (the control);
* ``ray x1``: a loopback Ray cluster of one node with one CPU, one worker of one thread;
* ``ray x2``: the same plus a ``ray start --address`` node with one CPU: two workers of one thread.

Reported: requests/s, output tokens/s, mean end-to-end latency, and which worker served how many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.loadgen.client import make_client, resolve_model
from bench.loadgen.load import run_load, summarize
from bench.ray_local import LocalRayCluster
from bench.workload.records import read_requests
from service.launcher import free_port, start_server


def serve_burst(name: str, workdir: Path, args: argparse.Namespace, **settings: object) -> dict:
    srv = start_server(workdir / name, args.model, policy=args.policy, batch_size=args.batch_size,
                       max_wait=0.05, **settings)
    try:
        reqs = read_requests(args.workload)[: args.n]

        async def go():
            client = make_client(srv.base_url)
            model = await resolve_model(client, None)
            return await run_load(client, model, reqs, [0.0] * len(reqs), progress=False)

        records = asyncio.run(go())
        s = summarize(records)
        with sqlite3.connect(srv.db_path) as db:
            served = Counter(w for (w,) in db.execute("select worker from requests where status = 'ok'"))
        workers = httpx.get(srv.base_url + "/health", timeout=10).json()["workers"]
    finally:
        srv.stop()
    return {"config": name, "answered": s.completed, "sent": s.sent, "req_s": s.request_throughput,
            "output_tok_s": s.output_token_throughput, "mean_e2e_s": s.response_time["mean"],
            "duration_s": s.duration, "served_by_worker": dict(sorted(served.items())), "workers": len(workers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--workload", default="bench/workloads/test.jsonl")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--policy", default="vs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench/results/ray_scaling_cpu"))
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = []
    with tempfile.TemporaryDirectory(prefix="magnus-ray-") as tmp:
        work = Path(tmp)
        rows.append(serve_burst("local", work, args))
        print(json.dumps(rows[-1]), flush=True)
        ray = LocalRayCluster(work, free_port())
        try:
            ray_settings = dict(workers="ray", ray_address=ray.address, worker_threads=1, ray_scale_interval_s=2)
            rows.append(serve_burst("ray x1", work, args, **ray_settings))
            print(json.dumps(rows[-1]), flush=True)
            ray.add_node()
            time.sleep(5)
            rows.append(serve_burst("ray x2", work, args, **ray_settings))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.stop()
    cmd = "python -m bench.ray_scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Ray workers: one vs two CPU workers ({args.model}, {args.n} requests in one burst)", "",
             f"```\n{cmd}\n```", "", f"started {started}; policy {args.policy}, batch size {args.batch_size}; "
             f"workload `{args.workload}` (first {args.n} rows, their own max_tokens, greedy)", "",
             "| config | workers | answered | req/s | output tok/s | mean E2E (s) | requests per worker |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['workers']} | {r['answered']}/{r['sent']} | {r['req_s']:.3f} | "
                     f"{r['output_tok_s']:.1f} | {r['mean_e2e_s']:.1f} | {r['served_by_worker']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
