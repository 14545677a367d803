"""``magnus bench ...``: workload building, ground truth and load generation.

``register(sub)`` adds the ``bench`` command to the top-level subparsers; each leaf sets
``func(args) -> int``. A new leaf (say ``compare``) is a function ``add(leaves)`` appended to
``LEAVES``; a sibling top-level command (say ``simulate``) has a ``register(sub)`` of its own.
Heavy modules are imported inside the leaves, so ``magnus --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


def add_workload(leaves: Subparsers) -> None:
    p = leaves.add_parser("workload", help="build the six-application workload from text on this machine")
    p.add_argument("--out", required=True, type=Path, help="directory for all/train/test.jsonl")
    p.add_argument("--n", type=int, default=2400, help="requests in all (default 2400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--english-man-pages", type=int, default=300, help="English man pages to read")
    p.add_argument("--stdlib-files", type=int, default=0, help="standard library files to read (0: all)")
    p.set_defaults(func=cmd_workload)


def cmd_workload(args: argparse.Namespace) -> int:
    from bench.workload.builder import BuildConfig, build_workload, workload_stats
    from bench.workload.records import APPS, write_jsonl

    config = BuildConfig(
        n=args.n, seed=args.seed, english_man_pages=args.english_man_pages, stdlib_files=args.stdlib_files
    )
    workload = build_workload(config)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("all", "train", "test"):
        write_jsonl(args.out / f"{name}.jsonl", (r.to_dict() for r in getattr(workload, name)))
    stats = workload_stats(workload.all)
    (args.out / "stats.json").write_text(json.dumps({"config": vars(config), "apps": stats, "tasks": workload.tasks}, indent=1) + "\n")
    print("| app | requests | input tokens min | median | max | max_tokens median |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for app, s in stats.items():
        print(
            f"| {APPS.get(app, app)} | {s['requests']} | {s['input_min']} | {s['input_median']:.0f} "
            f"| {s['input_max']} | {s['max_tokens_median']:.0f} |"
        )
    print(f"wrote {len(workload.all)} requests ({len(workload.train)} train) to {args.out}")
    return 0


def add_truth(leaves: Subparsers) -> None:
    p = leaves.add_parser("truth", help="record true generation lengths of a workload from a server")
    p.add_argument("workload", type=Path, help="workload JSONL")
    p.add_argument("out", type=Path, help="output JSONL (workload lines plus lengths)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000")
    src.add_argument("--from-log", type=Path, metavar="DB",
                     help="instead of sending requests, take the lengths a server already logged (SQLite "
                          "request log) for the workload's requests; rows it never served are left out")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.set_defaults(func=cmd_truth)


def cmd_truth(args: argparse.Namespace) -> int:
    from bench.loadgen.client import make_client, resolve_model
    from bench.workload.records import read_jsonl, write_jsonl
    from bench.workload.truth import collect_truth, pearson_table, truth_from_log

    rows = read_jsonl(args.workload)
    if args.from_log:
        out = truth_from_log(rows, args.from_log)
        write_jsonl(args.out, out)
        print(pearson_table(out))
        print(f"wrote {len(out)} of {len(rows)} workload lines found in {args.from_log} to {args.out}")
        return 0 if out else 1

    async def go() -> list[dict]:
        client = make_client(args.base_url, timeout=args.timeout)
        async with client:
            model = await resolve_model(client, args.model)
            return await collect_truth(client, model, rows, args.concurrency)

    out = asyncio.run(go())
    write_jsonl(args.out, out)
    print(pearson_table(out))
    failed = sum("error" in r for r in out)
    print(f"wrote {len(out)} lines to {args.out}; {failed} failed")
    return 1 if failed == len(out) else 0


def add_load(leaves: Subparsers) -> None:
    p = leaves.add_parser("load", help="open-loop load test of a running server")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", required=True, type=Path, help="workload JSONL (taken in file order)")
    p.add_argument("--rate", type=float, help="mean requests per second (omit: use the file's 'arrival')")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape 1/B; 1 = Poisson")
    p.add_argument("--n", type=int, help="requests to send (default: the whole file; cycles past its end)")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--db", help="the server's SQLite log, for total-token throughput")
    p.add_argument("--out", type=Path, help="result JSON")
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> int:
    import numpy as np

    from bench.loadgen import load
    from bench.loadgen.client import make_client, resolve_model
    from bench.workload.records import read_requests

    workload = read_requests(args.workload)
    n = args.n or len(workload)
    requests = [workload[i % len(workload)] for i in range(n)]
    if args.rate is not None:
        rng = np.random.default_rng(args.seed)
        arrivals = load.arrival_times(n, args.rate, args.burstiness, rng).tolist()
    elif all(r.arrival is not None for r in requests) and n <= len(workload):
        arrivals = [float(r.arrival) for r in requests]  # type: ignore[arg-type]
    else:
        print("--rate is required unless every request of the workload has an 'arrival'", file=sys.stderr)
        return 2

    async def go() -> list:
        client = make_client(args.base_url, timeout=args.timeout)
        async with client:
            model = await resolve_model(client, args.model)
            return await load.run_load(client, model, requests, arrivals, args.duration)

    records = asyncio.run(go())
    total = load.batch_tokens(args.db, *load.run_window(records)) if args.db else None
    summary = load.summarize(records, total)
    print(load.summary_table(summary))
    if args.out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
        args.out.write_text(json.dumps(load.result_json(config, summary, records), indent=1) + "\n")
    return 0 if summary.completed else 1


def add_compare(leaves: Subparsers) -> None:
    p = leaves.add_parser("compare", help="run the policies on identical load, each on a real server")
    p.add_argument("--policies", default="vs,vsq,ccb,pcb,glp,abp,magnus", help="comma-separated (default: all of them)")
    p.add_argument("--rates", required=True, type=lambda s: [float(x) for x in s.split(",") if x.strip()],
                   help="comma-separated request rates (req/s)")
    p.add_argument("--workload", required=True, type=Path, help="workload JSONL (file order, cycled to --n)")
    p.add_argument("--n", type=int, help="requests per run (default: the whole file)")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds per run")
    p.add_argument("--grace", type=float, default=120.0,
                   help="seconds to wait for in-flight requests once sending stops; the rest time out (default 120)")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    p.add_argument("--model", default="default", help="served model: 'default', a HF id or a local dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times (the same for every policy)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape 1/B; 1 = Poisson")
    p.add_argument("--slo", default="ttft:5 tpot:0.5 e2e:60",
                   help="goodput objectives in seconds, as vllm bench serve's --goodput (default %(default)s)")
    p.add_argument("--server-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a `magnus serve` setting for every server, e.g. batch_size=8 (repeatable)")
    p.add_argument("--predictor-model", type=Path, help="trained length-predictor file for glp/abp/magnus")
    p.add_argument("--warmup-train", type=Path, metavar="TRUTH",
                   help="without --predictor-model: first train one on this JSONL (magnus predictor train)")
    p.add_argument("--warmup-heads", type=Path, metavar="HEADS",
                   help="with --warmup-train: the rows' first generated tokens (python -m bench.prefix), to "
                        "train the re-predictor too (magnus predictor train --heads)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per server (default 2)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a server may take to start")
    p.add_argument("--work-dir", type=Path,
                   help="servers' directories: <work-dir>/<policy>, recreated (default: a new temporary one)")
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="default bench/results")
    p.add_argument("--name", default="compare_cpu", help="result file stem (default compare_cpu)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.loadgen.compare import cmd_compare as run

    return run(args)


def add_report(leaves: Subparsers) -> None:
    p = leaves.add_parser("report", help="the comparison table of kept per-request records, summarized again")
    p.add_argument("records", nargs="+", type=Path,
                   help="records_<rate>.json files of compare runs (or bench load --out files)")
    p.add_argument("--slo", default="ttft:5 tpot:0.5 e2e:60", help="goodput objectives (default %(default)s)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from bench.loadgen.compare import report_records
    from bench.loadgen.load import SLO

    try:
        print(report_records(args.records, SLO.parse(args.slo)))
    except (OSError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    return 0


LEAVES: list[Callable[[Subparsers], None]] = [add_workload, add_truth, add_load, add_compare, add_report]


def add_leaves(leaves: Subparsers) -> None:
    """Add every ``bench`` leaf to a subparsers object."""
    for add in LEAVES:
        add(leaves)


def register(sub: Subparsers) -> None:
    """Add the ``bench`` command (with its leaves) to the top-level subparsers ``sub``."""
    bench = sub.add_parser("bench", help="benchmarks: workloads, ground truth, load generation")
    add_leaves(bench.add_subparsers(dest="bench_command", required=True, metavar="LEAF"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench LEAF ...``: the leaves without the ``magnus`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_leaves(parser.add_subparsers(dest="bench_command", required=True, metavar="LEAF"))
    args = parser.parse_args(argv)
    return int(args.func(args))
