"""Tables, JSON and plots of simulator runs (metrics are ``bench.loadgen.load.Summary``, as measured runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadgen.load import Summary
from bench.plots import plot_metrics
from bench.sim.engine import SimStats


@dataclass
class PolicyRun:
    """One policy on one trace."""

    policy: str
    rate: float | None  # requests per second (None: the file's arrival times)
    summary: Summary
    sim: SimStats
    wall_s: float  # seconds the simulation took on this machine

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "rate": self.rate,
            "summary": asdict(self.summary),
            "sim": {**asdict(self.sim), "mean_batch": self.sim.mean_batch},
            "wall_s": self.wall_s,
        }


def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def comparison_table(runs: Sequence[PolicyRun]) -> str:
    """One row per run: the load generator's metrics plus batch statistics."""
    head = (
        "| policy | rate (req/s) | completed / sent | errors | throughput (req/s) | mean RT (s) | p50 RT | "
        "p95 RT | p99 RT | mean TTFT (s) | valid tok/s | total tok/s | batches | mean batch | OOM batches | "
        "preemptions |"
    )
    lines = [head, "| --- |" + " ---: |" * 15]
    for r in runs:
        s, rt = r.summary, r.summary.response_time
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "0"
        lines.append(
            f"| {r.policy} | {'file' if r.rate is None else f'{r.rate:g}'} | {s.completed} / {s.sent} | {errors} "
            f"| {_f(s.request_throughput, 3)} | {_f(rt['mean'])} | {_f(rt['p50'])} | {_f(rt['p95'])} "
            f"| {_f(rt['p99'])} | {_f(s.ttft['mean'])} | {_f(s.valid_token_throughput, 1)} "
            f"| {_f(s.total_token_throughput, 1)} | {r.sim.batches} | {r.sim.mean_batch:.1f} | {r.sim.oom_batches} "
            f"| {r.sim.preemptions} |"
        )
    return "\n".join(lines)


#: Plotted metrics: file suffix -> (label, getter). The paper's Figures 8-11 plot request
#: throughput, response time (mean and tail) and token throughputs against the request rate.
METRICS = {
    "request_throughput": ("request throughput (req/s)", lambda s: s.request_throughput),
    "mean_response_time": ("mean response time (s)", lambda s: s.response_time["mean"]),
    "p99_response_time": ("p99 response time (s)", lambda s: s.response_time["p99"]),
    "valid_token_throughput": ("valid-token throughput (tok/s)", lambda s: s.valid_token_throughput),
    "total_token_throughput": ("total-token throughput (tok/s)", lambda s: s.total_token_throughput),
}


def plot_sweep(runs: Sequence[PolicyRun], plot_dir: Path, prefix: str = "sim_", title: str = "") -> list[Path]:
    """One PNG per metric: the metric against the request rate, a line per policy (bench.plots)."""
    rows = [{"policy": r.policy, "rate": r.rate, **{k: get(r.summary) for k, (_, get) in METRICS.items()}}
            for r in runs]
    return plot_metrics(rows, plot_dir, prefix.rstrip("_"), metrics=tuple(METRICS), title=title)
