"""``magnus bench compare``: the policies on identical open-loop traffic, each on a real server.

For each policy: start one ``magnus serve`` (its own work directory, so its SQLite log and learner
state are its own), warm it up, then for each rate send the same requests at the same arrival
times (same workload, ``--n``, ``--seed``); stop the server. A run stops sending after
``--duration`` seconds and waits at most ``--grace`` seconds more for the requests in flight;
those still unanswered are cancelled and counted as ``timeout`` errors, so a run always ends.

Predictive policies (GLP, ABP, Magnus) need a trained length predictor: ``--predictor-model FILE``,
or ``--warmup-train TRUTH.jsonl`` to train one first (``magnus predictor train --from-jsonl``).
Each predictive server gets its own copy, since continual learning rewrites the file.

Writes ``<out-dir>/<name>.md`` (command, machine, table), ``<name>.json`` (every summary) and
``<name>_<metric>.png`` (``bench.plots``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import openai
from tqdm import tqdm

from bench.loadgen import load
from bench.loadgen.client import make_client, resolve_model
from bench.loadgen.load import RequestRecord, Summary
from bench.workload.records import Request, read_requests
from scheduler.factory import POLICIES
from service.launcher import ROOT, Server, start_server

POLICY_ORDER = ("vs", "vsq", "ccb", "pcb", "glp", "abp", "magnus")
#: Policies whose server predicts generation lengths (GLP, ABP, Magnus).
PREDICTIVE = frozenset(name for name, cls in POLICIES.items() if cls.needs_prediction)
#: Settings the command sets itself, per policy.
OWN_SETTINGS = ("policy", "predictor_model", "model", "port", "db_path", "state_dir")


@dataclass
class Run:
    """One policy at one request rate."""

    policy: str
    rate: float
    summary: Summary
    wall_s: float  # seconds the run took, warm-up and drain excluded
    error_examples: dict[str, str] = field(default_factory=dict)  # status -> first message
    server: dict[str, float] = field(default_factory=dict)  # ``SERVER_COUNTERS`` over the run (from /metrics)

    def row(self) -> dict:
        """Flat metrics, as ``bench.plots.plot_metrics`` takes them."""
        s, rt, ttft = self.summary, self.summary.response_time, self.summary.ttft
        return {
            "policy": self.policy, "rate": self.rate, "sent": s.sent, "completed": s.completed,
            "errors": sum(s.errors.values()), "request_throughput": s.request_throughput,
            "mean_response_time": rt["mean"], "p50_response_time": rt["p50"],
            "p95_response_time": rt["p95"], "p99_response_time": rt["p99"],
            "p90_response_time": rt.get("p90"), "mean_short_half_response_time": s.short_half_response_time.get("mean"),
            "mean_response_time_with_unanswered": s.response_time_with_unanswered.get("mean"),
            "mean_ttft": ttft["mean"], "p95_ttft": ttft["p95"], "mean_tpot": s.tpot.get("mean"),
            "mean_itl": s.itl.get("mean"), "goodput": s.goodput,
            "valid_token_throughput": s.valid_token_throughput,
            "total_token_throughput": s.total_token_throughput,
        }


# -- one run ---------------------------------------------------------------------------------------
async def warm_up(client: openai.AsyncOpenAI, model: str, requests: Sequence[Request], k: int) -> list[str]:
    """Send the first ``k`` requests one by one (at most 16 tokens each); their error statuses."""
    errors = []
    for req in requests[:k]:
        rec = await load.send_request(client, model, replace(req, max_tokens=min(req.max_tokens, 16)))
        if not rec.ok:
            errors.append(f"{rec.status}: {rec.error}")
    return errors


async def health(server: Server) -> dict:
    """The server's ``/health`` document (``{"status": "unreachable"}`` when it does not answer)."""
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            return dict((await http.get(server.base_url + "/health")).json())
        except (httpx.HTTPError, ValueError) as exc:
            return {"status": "unreachable", "detail": str(exc)}


async def drain(server: Server, timeout: float) -> int:
    """Wait until the server has no pending request or ``timeout`` passes; the pending count
    (-1: unknown), so a run does not start while the previous one's leftovers still run."""
    deadline = time.time() + timeout
    while True:
        pending = int((await health(server)).get("pending", -1))
        if pending == 0 or time.time() >= deadline:
            return pending
        await asyncio.sleep(0.2)


#: What the server's ``/metrics`` says about a run (each: the change from before its first request
#: to after its drain): the front end's CPU time (the process that predicts lengths and schedules,
#: sharing the machine with the workers), preemptions, re-predictions (and those with a worker head
#: state) and predictor retrains.
SERVER_COUNTERS = {"front_end_cpu_s": "process_cpu_seconds_total", "preemptions": "magnus_preemptions_total",
                   "repredictions": "magnus_predictor_repredictions",
                   "repredictions_with_state": "magnus_predictor_repredictions_with_state",
                   "predictor_retrains": "magnus_predictor_retrains"}


async def scrape(server: Server) -> dict[str, float]:
    """The server's ``/metrics`` samples, summed over labels by sample name ({} when unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=5) as http:
        try:
            text = (await http.get(server.base_url + "/metrics")).text
        except httpx.HTTPError:
            return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def counters_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``SERVER_COUNTERS`` that the server exposes, as their change between two scrapes."""
    return {key: after[name] - before.get(name, 0.0) for key, name in SERVER_COUNTERS.items() if name in after}


def _error_examples(records: Sequence[RequestRecord]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records:
        if not r.ok and r.status not in out:
            out[r.status] = (r.error or "")[:300]
    return out


# -- one policy ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What every policy is run on."""

    model: str
    requests: list[Request]
    rates: list[float]
    arrivals: dict[float, list[float]]  # rate -> send times (s), identical for every policy
    duration: float | None
    grace: float
    timeout: float
    warmup: int
    settings: dict[str, str]  # shared server settings
    startup_timeout: float
    progress: bool
    slo: load.SLO = load.DEFAULT_SLO  # goodput's objectives


#: What ``bench compare`` plots against the rate, one figure each.
COMPARE_METRICS = ("request_throughput", "goodput", "mean_response_time", "p90_response_time", "p99_response_time",
                   "mean_short_half_response_time", "mean_ttft", "mean_tpot", "mean_itl", "valid_token_throughput",
                   "total_token_throughput")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:KEY=VALUE]...`` (e.g. ``vs:batch_size=64``, ``magnus:batch_exit=literal``): a policy
    with server settings of its own on top of the shared ones; the whole spec labels its runs."""
    name, *items = spec.split(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} in {spec!r}; known: {', '.join(POLICY_ORDER)}")
    return name, parse_settings(items)


def predictor_form(policy: str, settings: dict[str, object]) -> str:
    """The length-predictor form a variant's server learns (its own ``predictor_form``, else the
    shared settings', else the server's default)."""
    _, own = parse_variant(policy)
    return str(own.get("predictor_form", settings.get("predictor_form", "mixture")))


def run_policy(policy: str, plan: Plan, workdir: Path, predictors: dict[str, Path]) -> tuple[list[Run], dict]:
    """Run every rate of ``plan`` against ``policy`` (a name or a ``parse_variant`` spec), each rate
    on a fresh server started from the same state: the trained predictor file copied anew, no
    learned state. A server that kept running would have learned the workload's requests (and
    their lengths) at one rate before serving them again at the next. ``predictors``: a trained
    model file per predictor form (a predictive variant gets its form's). Every rate's requests go
    to one request log (``workdir/log.db``). Returns the runs and the server facts."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    name, own = parse_variant(policy)
    settings: dict[str, object] = {**plan.settings, **own, "policy": name}
    predictor = predictors.get(predictor_form(policy, plan.settings))
    records: dict[float, tuple[list[RequestRecord], float]] = {}
    facts: dict = {"workdir": str(workdir), "log": []}
    for rate in plan.rates:
        shutil.rmtree(workdir / "state", ignore_errors=True)
        if predictor is not None and name in PREDICTIVE:
            shutil.copyfile(predictor, workdir / "predictor.joblib")  # retraining writes over it
            settings["predictor_model"] = workdir / "predictor.joblib"
        server = start_server(workdir, plan.model, timeout=plan.startup_timeout, **settings)
        facts["log"].append(str(server.log_path))
        try:
            async def go(rate: float = rate, server: Server = server) -> None:
                client = make_client(server.base_url, timeout=plan.timeout)
                async with client:
                    served = await resolve_model(client, None)
                    facts["served_model"] = served
                    facts["warmup_errors"] = await warm_up(client, served, plan.requests, plan.warmup)
                    facts["health"] = await health(server)
                    await drain(server, plan.grace)
                    before = await scrape(server)
                    started = time.perf_counter()
                    recs = await load.run_load(client, served, plan.requests, plan.arrivals[rate], plan.duration,
                                               plan.progress, plan.grace, f"{policy} @ {rate:g} req/s")
                    wall = time.perf_counter() - started
                    print(f"{policy} @ {rate:g} req/s: {sum(r.ok for r in recs)}/{len(recs)} answered",
                          file=sys.stderr)
                    facts["left_pending"] = await drain(server, plan.grace)
                    records[rate] = (recs, wall, counters_between(before, await scrape(server)))

            asyncio.run(go())
        finally:
            server.stop()  # graceful: the request log is flushed and closed
    runs = []
    facts["records"] = {}
    for rate, (recs, wall, counters) in records.items():
        total = _batch_tokens(workdir / "log.db", recs)
        summary = load.summarize(recs, total, plan.slo)
        runs.append(Run(policy, rate, summary, wall, _error_examples(recs), counters))
        # the per-request records: what ``magnus simulate --replay`` re-runs in simulation
        path = workdir / f"records_{rate:g}.json"
        doc = load.result_json({"policy": policy, "rate": rate, "log": str(workdir / "log.db")}, summary, recs)
        path.write_text(json.dumps(doc) + "\n")
        facts["records"][f"{rate:g}"] = str(path)
    return runs, facts


def _batch_tokens(db: Path, records: Sequence[RequestRecord]) -> int | None:
    if not db.exists() or not records:
        return None
    try:
        return load.batch_tokens(str(db), *load.run_window(records))
    except Exception as exc:  # noqa: BLE001 - a broken log loses one metric, not the run
        print(f"total tokens unavailable from {db}: {exc}", file=sys.stderr)
        return None


def train_predictor(truth: Path, out: Path, heads: Path | None = None, form: str = "mixture",
                    model: str = "default") -> Path:
    """Train a length predictor of ``form`` with ``magnus predictor train --from-jsonl`` (a
    subprocess); with ``heads``, its re-predictor too (``--heads``). The probe form probes the
    served ``model``; the mixture with ``heads`` reads its head states (as a server's worker reports them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "magnus", "predictor", "train", "--from-jsonl", str(truth), "--out", str(out),
           "--form", form]
    if form == "probe" or (form == "mixture" and heads is not None):
        from worker.loader import resolve

        cmd += ["--probe-model", model, "--served-model", resolve(model).name]
    if heads is not None:
        cmd += ["--heads", str(heads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


# -- report ----------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def in_table_order(runs: Sequence[Run]) -> list[Run]:
    """Rates ascending, policies in run order: the row order of every table here."""
    order = {p: i for i, p in enumerate(dict.fromkeys(r.policy for r in runs))}
    return sorted(runs, key=lambda r: (r.rate, order[r.policy]))


def comparison_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per (rate, policy), rates ascending, policies in run order. "mean E2E" is
    over the answered requests (as ``vllm bench serve``); "with unanswered" also counts each
    timed-out request at the time it waited, a lower bound that does not flatter a policy that
    leaves requests unanswered."""
    head = ("| rate (req/s) | policy | answered / sent | errors | throughput (req/s) | goodput (req/s) "
            "| mean E2E (s) | p50 E2E | p90 E2E | p99 E2E | mean E2E with unanswered (>=) | shorter half mean E2E "
            "| mean TTFT (s) | p90 TTFT | mean TPOT (s) | mean ITL (s) | output tok/s | total tok/s |")
    lines = [head, "| ---: | --- |" + " ---: |" * 16]
    for r in in_table_order(runs):
        s, rt, ttft = r.summary, r.summary.response_time, r.summary.ttft
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "0"
        lines.append(
            f"| {r.rate:g} | {r.policy} | {s.completed} / {s.sent} | {errors} | {_f(s.request_throughput, 3)} "
            f"| {_f(s.goodput, 3)} | {_f(rt['mean'])} | {_f(rt['p50'])} | {_f(rt.get('p90'))} | {_f(rt['p99'])} "
            f"| {_f(s.response_time_with_unanswered.get('mean'))} "
            f"| {_f(s.short_half_response_time.get('mean'))} | {_f(ttft['mean'])} | {_f(ttft.get('p90'))} "
            f"| {_f(s.tpot.get('mean'), 3)} | {_f(s.itl.get('mean'), 3)} | {_f(s.valid_token_throughput, 1)} "
            f"| {_f(s.total_token_throughput, 1)} |"
        )
    return "\n".join(lines)


def server_table(runs: Sequence[Run]) -> str:
    """Markdown: ``SERVER_COUNTERS`` per run ("-": the server does not expose it, e.g. no predictor)."""
    lines = ["| rate (req/s) | policy | front-end CPU (s) | preemptions | re-predictions | with a head state "
             "| predictor retrains |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in in_table_order(runs):
        cells = [("-" if key not in r.server else f"{r.server[key]:.{1 if key == 'front_end_cpu_s' else 0}f}")
                 for key in SERVER_COUNTERS]
        lines.append(f"| {r.rate:g} | {r.policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict:
    """CPU count, torch threads and device, load average: what the numbers were measured on."""
    import torch

    return {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def command_line(args: argparse.Namespace) -> str:
    """The effective command: every option with its value (defaults included)."""
    parts = ["magnus", "bench", "compare"]
    for key, value in vars(args).items():
        if key in ("func", "command", "bench_command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            if key == "rates":
                parts += [flag, ",".join(f"{v:g}" for v in value)]
            else:
                for v in value:
                    parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def write_report(out_dir: Path, name: str, doc: dict, runs: Sequence[Run]) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (with links to the plots in ``doc``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    c, m = doc["config"], doc["machine"]
    served = sorted({f.get("served_model", "?") for f in doc["servers"].values()})
    stop = "all requests" if c["duration"] is None else f"{c['duration']:g} s"
    lines = [
        f"# Policy comparison: {name}", "", "```", c["command"], "```", "",
        f"- machine: {m['cpu_count']} CPUs, torch threads {m['torch_threads']} (torch default; servers' "
        f"worker_threads={c['settings'].get('worker_threads', '0 = default')}), "
        f"CUDA: {m['cuda'] or 'none'}, 1-min load average at start {m['load_avg_1m_at_start']}",
        f"- model: `{c['model']}` (served as {', '.join(served)}); server settings: "
        + (", ".join(f"{k}={v}" for k, v in c["settings"].items()) or "defaults"),
        f"- workload: `{c['workload']}`, {c['n']} requests per run (file order, cycled), seed {c['seed']}, "
        f"Poisson arrivals (burstiness {c['burstiness']:g}), identical for every policy",
        f"- bounds: sending stops after {stop}, "
        f"then at most {c['grace']:g} s grace; unanswered requests count as timeout errors",
        f"- length predictor for {', '.join(sorted(PREDICTIVE))}: {c['predictor']}",
        "- every (policy, rate) on a fresh server started from the same state: the trained predictor "
        "file, no learned state from another rate",
        f"- started {doc['started']}, took {doc['wall_s']:.0f} s",
    ]
    lines += [f"- policy {p} failed: {e}" for p, e in doc["failed"].items()]
    lines += ["", comparison_table(runs), ""]
    if any(r.server for r in runs):
        lines += ["Server side, over each run (from its `/metrics`, before the first request to after the drain):",
                  "", server_table(runs), ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in doc["plots"]]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


# -- CLI -------------------------------------------------------------------------------------------
def report_records(paths: Sequence[Path], slo: load.SLO = load.DEFAULT_SLO) -> str:
    """The comparison table of kept per-request records (``records_<rate>.json`` of ``compare``
    runs, or ``bench load --out`` files), summarized again by this code: a result's metrics
    recomputed, or a metric added since, from the committed records."""
    runs = []
    for path in paths:
        doc = load.read_result_doc(path)
        config, total = doc.get("config") or {}, (doc.get("summary") or {}).get("total_tokens")
        runs.append(Run(str(config.get("policy", Path(path).stem)), float(config.get("rate") or 0.0),
                        load.summarize(doc["records"], total, slo), 0.0))
    return comparison_table(runs)


def parse_settings(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings to a dict; keys the command sets itself are refused."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--server-setting wants KEY=VALUE, got {item!r}")
        if key in OWN_SETTINGS:
            raise ValueError(f"--server-setting {key} is set by compare itself")
        out[key] = value
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    """Run every policy at every rate; print and write the table, JSON and plots."""
    from bench.plots import plot_metrics

    policies = [x.strip().lower() for x in args.policies.split(",") if x.strip()]
    unknown = []
    for spec in policies:
        try:
            parse_variant(spec)
        except ValueError:
            unknown.append(spec)
    if unknown or not policies or not args.rates or any(r <= 0 for r in args.rates):
        print(f"compare: bad --policies {unknown or policies} or --rates {args.rates}; "
              f"known policies: {', '.join(POLICY_ORDER)}", file=sys.stderr)
        return 2
    try:
        settings = parse_settings(args.server_setting)
        workload = read_requests(args.workload)
    except (ValueError, OSError, TypeError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if not workload:
        print(f"compare: no requests in {args.workload}", file=sys.stderr)
        return 2
    started_at, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="magnus-compare-"))
    print(f"compare: server directories under {work}", file=sys.stderr)
    n = args.n or len(workload)
    rates = sorted(dict.fromkeys(args.rates))
    plan = Plan(
        model=args.model, requests=[workload[i % len(workload)] for i in range(n)], rates=rates,
        arrivals={r: load.arrival_times(n, r, args.burstiness, np.random.default_rng(args.seed)).tolist()
                  for r in rates},
        duration=args.duration, grace=args.grace, timeout=args.timeout, warmup=args.warmup, settings=settings,
        startup_timeout=args.startup_timeout, progress=not args.no_progress, slo=load.SLO.parse(args.slo),
    )
    predictor, predictor_note = args.predictor_model, "none (cold-start fallback)"
    forms = sorted({predictor_form(p, settings) for p in policies if parse_variant(p)[0] in PREDICTIVE})
    predictors: dict[str, Path] = {}
    if predictor is not None:
        if not predictor.is_file():
            print(f"compare: no predictor model file {predictor}", file=sys.stderr)
            return 2
        predictors = dict.fromkeys(forms, predictor)
        predictor_note = f"`{predictor}`"
    if args.warmup_train is not None and predictor is None and forms:
        try:
            predictors = {form: train_predictor(args.warmup_train, work / f"predictor_{form}.joblib",
                                                args.warmup_heads, form, args.model) for form in forms}
        except subprocess.CalledProcessError as exc:
            print(f"compare: training the predictor failed ({exc})", file=sys.stderr)
            return 1
        predictor_note = (f"trained on `{args.warmup_train}` (magnus predictor train --from-jsonl --form "
                          f"{'/'.join(forms)}, one file per form)")
        if args.warmup_heads is not None:
            predictor_note += f", re-predictor on `{args.warmup_heads}` (--heads)"
    elif predictor is None and forms:
        print("compare: no --predictor-model or --warmup-train: predictive policies start untrained",
              file=sys.stderr)

    runs: list[Run] = []
    servers: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for policy in tqdm(policies, desc="policies", unit="policy", disable=args.no_progress):
        try:
            policy_runs, servers[policy] = run_policy(policy, plan, work / policy, predictors)
            runs += policy_runs
        except Exception as exc:  # noqa: BLE001 - one policy failing must not lose the others
            failed[policy] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            print(f"compare: policy {policy} failed: {failed[policy]}", file=sys.stderr)

    table = comparison_table(runs)
    print(table)
    title = f"{Path(args.model).name}, {n} requests/run, {os.cpu_count()} CPUs"
    plots = plot_metrics([r.row() for r in runs], args.out_dir, args.name, metrics=COMPARE_METRICS,
                         title=title) if runs else []
    config = {
        "command": command_line(args), "policies": policies, "rates": rates, "workload": str(args.workload),
        "n": n, "duration": args.duration, "grace": args.grace, "timeout": args.timeout, "model": args.model,
        "seed": args.seed, "burstiness": args.burstiness, "settings": settings, "predictor": predictor_note,
        "slo": args.slo,
        "work_dir": str(work),
    }
    doc = {
        "config": config, "machine": machine_info(), "started": started_at,
        "wall_s": time.perf_counter() - t0, "servers": servers, "failed": failed,
        "runs": [{**r.row(), "wall_s": r.wall_s, "summary": asdict(r.summary), "error_examples": r.error_examples,
                  "server": r.server} for r in runs],
        "plots": [str(p) for p in plots],
    }
    json_path, md_path = write_report(args.out_dir, args.name, doc, runs)
    print(f"wrote {md_path}, {json_path} and {len(plots)} plots", file=sys.stderr)
    return 0 if runs and not failed and all(r.summary.completed for r in runs) else 1

