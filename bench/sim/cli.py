"""``magnus simulate``: a discrete-event simulator of the service at scale.

The SAME scheduling code as the server (every policy via ``make_policy``, the WMA assembler, the
KNN batch-time estimator with its continual learning, HRRN, OOM splitting) runs on a virtual
clock against N simulated workers (``bench.sim.engine``) whose batch times come from a cost
model: the analytical one (``--hardware`` x ``--model-profile``, a name or a HF config.json) or
one fitted to a server's batch log (``--fit-log DB``). VSQ runs the model quantized to 4 bits.
Theta for the policies is ``CostModel.memory_model()``; Magnus's estimator starts from the
analytical model as its prior, as in the server.

Metrics are the load generator's (``bench.loadgen.load.summarize``), so simulated and measured runs
compare one to one::

    magnus simulate bench/workloads/all.jsonl --n 20000 --rates 10,20,40 --plot-dir bench/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

from bench.loadgen.load import read_result, summarize, summary_table
from bench.sim.replay import NO_OVERHEADS, compare_table, fit_overheads, replay_workload
from bench.sim.report import PolicyRun, comparison_table, plot_sweep
from bench.sim.setup import DTYPES, PolicyParams, cost_setup, load_model_profile
from bench.sim.trace import make_trace, simulate_policy
from bench.sim.workload import DEFAULT_NOISE_SIGMA, load_workload, pearson_by_app
from scheduler.costmodel import HARDWARE, MODELS
from scheduler.factory import POLICIES

POLICY_ORDER = ("vs", "vsq", "ccb", "pcb", "glp", "abp", "magnus")
_KNOBS = {f.name: f.type for f in fields(PolicyParams)}


def parse_policy(spec: str, base: PolicyParams, batch_exit: str) -> tuple[str, PolicyParams, str]:
    """``NAME[:KEY=VALUE]...`` as ``magnus bench compare`` takes it (``vs:batch_size=64``,
    ``magnus:batch_exit=literal``, ``pcb:max_batch_size=256``): the policy, its knobs on top of the
    shared ones, and its static-batch exit. Keys: the ``PolicyParams`` fields and ``batch_exit``."""
    name, *items = spec.split(":")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} in {spec!r}; known: {sorted(POLICIES)}")
    own: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or (key not in _KNOBS and key != "batch_exit"):
            raise ValueError(f"{spec!r}: {item!r} is not KEY=VALUE with KEY one of {sorted(_KNOBS) + ['batch_exit']}")
        if key == "batch_exit":
            if value not in ("early", "literal"):
                raise ValueError(f"{spec!r}: batch_exit is early or literal")
            batch_exit = value
        else:
            own[key] = float(value) if "float" in str(_KNOBS[key]) else int(value)
    return name, replace(base, **own), batch_exit  # type: ignore[arg-type]


# -- CLI -------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``simulate`` options."""
    p.add_argument("workload", type=Path, nargs="?",
                   help="workload or truth JSONL (output_tokens etc. when known); not with --replay")
    p.add_argument("--replay", type=Path, metavar="RECORDS.json",
                   help="re-run a measured run (magnus bench load --out, or compare's records_<rate>.json): its "
                        "requests at their send times, and a measured-vs-simulated table")
    p.add_argument("--overheads", default="auto", choices=("auto", "none"),
                   help="auto: with --replay and a log, add the ingress/egress/turnaround fitted from them")
    p.add_argument("--policies", default=",".join(POLICY_ORDER),
                   help="comma-separated (default: all of them); a policy may carry its own knobs, as "
                        "compare's variants: vs:batch_size=64, magnus:batch_exit=literal, pcb:max_batch_size=256")
    p.add_argument("--rate", type=float, help="mean requests per second (omit: the file's 'arrival')")
    p.add_argument("--rates", type=_floats, help="comma-separated rates to sweep (overrides --rate)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape 1/B; 1 = Poisson")
    p.add_argument("--n", type=int, help="requests (default: every row once; else sampled with replacement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--hardware", default="V100-32GB", choices=sorted(HARDWARE))
    p.add_argument("--model-profile", default="ChatGLM-6B", help=f"{sorted(MODELS)} or a HF config.json path")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--fit-log", type=Path, help="server SQLite log: fit the hardware figures to its batches")
    p.add_argument("--fit-window", default="all", choices=("all", "run"),
                   help="with --replay: fit to the whole log (all), or to the batches of the replayed run only")
    p.add_argument("--prediction", default="noisy", choices=("oracle", "noisy", "file"))
    p.add_argument("--noise-sigma", type=float, default=DEFAULT_NOISE_SIGMA,
                   help="log-normal sigma of --prediction noisy (default %(default)s)")
    p.add_argument("--lengths", default="auto", choices=("auto", "truth", "synthetic"),
                   help="true output lengths: the file's output_tokens, or the synthetic model")
    p.add_argument("--batch-exit", default="early", choices=("early", "literal"),
                   help="static batches: early = a row returns and leaves the batch the step it ends (the "
                        "server's default); literal = the paper's static batch (every row runs to the longest)")
    p.add_argument("--continuous-cache", default="packed", choices=("packed", "padded"),
                   help="continuous workers: packed = a step reads each row's own cache (a paged cache, as "
                        "transformers' manager); padded = one left-padded cache, each row read at the longest "
                        "row's length (the server's iteration runner, ccb:continuous_runner=iteration and pcb)")
    p.add_argument("--ttft", default="batch-end", choices=("batch-end", "first-token"),
                   help="static batches: first token at the batch end, or after the prefill (streaming)")
    p.add_argument("--batch-size", type=int, help="VS/VSQ/GLP fixed batch size (default: the policy's)")
    p.add_argument("--max-wait", type=float, help="VS/VSQ partial-batch wait (= --min-wait for GLP/ABP/Magnus)")
    p.add_argument("--min-wait", type=float)
    p.add_argument("--phi", type=float, help="WMA threshold (default: the assembler's)")
    p.add_argument("--max-batch-size", type=int, help="ABP/Magnus cap, CCB max running")
    p.add_argument("--reserve-frac", type=float, default=0.1, help="memory reserve for Theta")
    p.add_argument("--estimator-interval", type=float, default=120.0, help="estimator update period (s)")
    p.add_argument("--out", type=Path, help="result JSON")
    p.add_argument("--md", type=Path, help="markdown report (command, notes, table)")
    p.add_argument("--plot-dir", type=Path, help="with --rates: PNG plots of each metric against the rate")
    p.add_argument("--plot-prefix", default="sim_", help="plot file name prefix (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")


def _command_line() -> str:
    prog = Path(sys.argv[0]).name
    head = ["magnus"] if prog == "magnus" else [".venv/bin/python", "-m", "bench.sim.cli"]
    return shlex.join(head + sys.argv[1:])


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the simulation(s) the arguments describe; print and write the results."""
    names = [x.strip().lower() for x in args.policies.split(",") if x.strip()]
    params = PolicyParams(args.batch_size, args.max_wait, args.min_wait, args.phi, args.max_batch_size,
                          args.reserve_frac, args.estimator_interval)
    try:
        specs = [parse_policy(x, params, args.batch_exit) for x in names]
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    if (args.workload is None) == (args.replay is None):
        print("simulate: give a workload file or --replay RECORDS.json (one of them)", file=sys.stderr)
        return 2
    measured, overheads = None, NO_OVERHEADS
    try:
        if args.replay is not None:
            if args.rate is not None or args.rates or args.n is not None:
                raise ValueError("--replay takes the run's own requests and send times: no --rate/--rates/--n")
            replay_config, records = read_result(args.replay)
            measured = summarize(records)
            logged = replay_config.get("log") or replay_config.get("db")  # compare / bench load
            if args.fit_log is None and logged and Path(logged).exists():
                args.fit_log = Path(logged)
            workload = replay_workload(records, args.fit_log)
            if args.fit_log is not None and args.overheads == "auto":
                overheads = fit_overheads(records, args.fit_log)
        else:
            workload = load_workload(args.workload, args.lengths, args.seed)
        model = load_model_profile(args.model_profile, args.dtype)
        window = measured.window if measured is not None and args.fit_window == "run" else None
        setup = cost_setup(args.hardware, model, args.fit_log, window, args.continuous_cache == "padded")
    except (ValueError, OSError, sqlite3.Error, TypeError, KeyError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    rates: Sequence[float | None] = args.rates or [args.rate]
    notes = list(workload.notes)
    notes.append(f"cost model: {setup.source}")
    if overheads.samples:
        notes.append(f"overheads outside the batch, fitted to the replayed records and the log: {overheads.describe()}")
    elif measured is not None:
        notes.append("no overheads outside the batch simulated (--overheads none, no log, or records without "
                     "completion ids)")
    notes.append("static batches: " + ("early exit (a row returns and leaves the batch the step it ends)"
                                       if args.batch_exit == "early" else "literal (every row runs to the longest)"))
    notes.append(f"continuous workers: {args.continuous_cache} cache")
    notes.append(f"predictions: {args.prediction}" + (f" (sigma {args.noise_sigma})" if args.prediction == "noisy" else ""))
    mem = setup.cost("vs").memory_model(reserve_frac=params.reserve_frac)
    notes.append(f"{args.workers} workers; Theta {mem.theta / 2**30:.1f} GiB = {mem.theta / mem.delta:,.0f} KV tokens "
                 f"(Delta {mem.delta / 1024:.0f} KiB/token, reserve {params.reserve_frac:g}); "
                 f"policy defaults unless given: {asdict(params)}")
    if any(name == "vsq" for name, _, _ in specs):
        q = setup.cost("vsq").model
        notes.append(f"VSQ runs {q.name}: weights {q.weight_bytes / 2**30:.1f} GiB instead of "
                     f"{model.weight_bytes / 2**30:.1f} GiB in memory; each forward pass reads the packed weights plus one "
                     "dequantized copy (ModelProfile.weight_traffic_bytes), so decode is not faster")
    if workload.lengths == "synthetic":
        pear = pearson_by_app(workload.rows)
        notes.append("synthetic lengths, Pearson r(input, output) per app: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in pear.items()))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    runs: list[PolicyRun] = []
    for rate in rates:
        try:
            trace = make_trace(workload, args.n, rate, args.burstiness, args.seed, args.prediction, args.noise_sigma)
        except ValueError as exc:
            print(f"simulate: {exc}", file=sys.stderr)
            return 2
        for label, (name, own, exit_mode) in zip(names, specs, strict=True):
            run, _ = simulate_policy(name, trace, setup, own, args.workers, args.ttft,
                                     not args.no_progress, rate, overheads, exit_mode == "early",
                                     args.continuous_cache == "padded")
            run.policy = label
            runs.append(run)
            print(f"{label} rate={rate}: {run.summary.completed}/{run.summary.sent} done, "
                  f"{run.sim.preemptions} preemptions, {run.wall_s:.1f} s wall", file=sys.stderr)
    table = comparison_table(runs)
    if len(runs) == 1:
        print(summary_table(runs[0].summary))
    print(table)
    versus = ""
    if measured is not None:
        versus = "\n\n".join(f"{r.policy} replayed vs measured:\n\n{compare_table(measured, r.summary)}" for r in runs)
        print(versus)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config.update(command=_command_line(), lengths=workload.lengths, tokens=workload.tokens,
                  cost_hw=asdict(setup.hw), model=asdict(setup.model))
    plots: list[Path] = []
    if args.plot_dir and len(rates) > 1:
        title = f"{setup.model.name}, {args.workers} x {setup.hw.name}, {len(trace.index)} requests"
        plots = plot_sweep(runs, args.plot_dir, args.plot_prefix, title)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"config": config, "notes": notes, "runs": [r.to_dict() for r in runs], "plots": [str(p) for p in plots]}
        if measured is not None:
            doc["measured"] = asdict(measured)
            doc["overheads"] = asdict(overheads)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        body = ["```", config["command"], "```", "", *[f"- {n}" for n in notes], "", table, ""]
        if versus:
            body += [versus, ""]
        body += [f"![{p.stem}]({p.name})" for p in plots]
        args.md.write_text("\n".join(body) + "\n")
    return 0 if all(r.summary.completed for r in runs) else 1


def register_simulate(sub: argparse._SubParsersAction) -> None:
    """Add the top-level ``simulate`` command to the ``magnus`` subparsers ``sub``."""
    p = sub.add_parser("simulate", help="discrete-event simulation of the policies at scale",
                       description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=cmd_simulate)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sim.cli ...``: the command without the ``magnus`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.sim.cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return int(cmd_simulate(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
