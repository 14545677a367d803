"""Plots of policy sweeps in the style of the paper's Figures 8-11: a metric against the request
rate, one line per policy, one PNG per metric (matplotlib, Agg backend).

Input rows are plain dicts ``{"policy": "vs", "rate": 1.0, "<metric>": value, ...}``, so measured
runs (``bench.loadgen.compare``) and simulated ones can share the helper.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

#: Plotted metrics: row key -> axis label.
METRICS: dict[str, str] = {
    "request_throughput": "request throughput (req/s)",
    "mean_response_time": "mean response time (s)",
    "p95_response_time": "p95 response time (s)",
    "p90_response_time": "p90 response time (s)",
    "p99_response_time": "p99 response time (s)",
    "mean_short_half_response_time": "shorter half's mean response time (s)",
    "mean_ttft": "mean time to first token (s)",
    "mean_tpot": "mean time per output token (s)",
    "mean_itl": "mean inter-token latency (s)",
    "goodput": "goodput (req/s within the SLOs)",
    "valid_token_throughput": "valid-token throughput (tok/s)",
    "total_token_throughput": "total-token throughput (tok/s)",
}
#: Plotted by default (the brief's five; p99 on request).
DEFAULT_METRICS = (
    "request_throughput", "mean_response_time", "p95_response_time", "valid_token_throughput", "total_token_throughput",
)
#: Legend names and fixed styles, so a policy looks the same in every figure.
POLICY_LABELS = {"vs": "VS", "vsq": "VSQ", "ccb": "CCB", "glp": "GLP", "abp": "ABP", "magnus": "Magnus"}
_STYLE = {
    "vs": ("tab:blue", "o"), "vsq": ("tab:orange", "s"), "ccb": ("tab:green", "D"),
    "glp": ("tab:purple", "^"), "abp": ("tab:brown", "v"), "magnus": ("tab:red", "*"),
}
_EXTRA = [("tab:gray", "x"), ("tab:olive", "P"), ("tab:cyan", "h"), ("tab:pink", "+")]


def _points(rows: Iterable[dict], policy: str, metric: str) -> list[tuple[float, float]]:
    pts = [(float(r["rate"]), float(r[metric])) for r in rows
           if r.get("policy") == policy and r.get("rate") is not None and r.get(metric) is not None]
    return sorted(pts)


def plot_metrics(
    results: Sequence[dict],
    out_dir: str | Path,
    prefix: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    title: str = "",
) -> list[Path]:
    """Write ``<out_dir>/<prefix>_<metric>.png`` for each metric some row has; return the paths.

    ``results``: rows with ``policy``, ``rate`` (req/s) and metric values (None: not measured).
    Policies keep their first-seen order in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policies = list(dict.fromkeys(str(r["policy"]) for r in results))
    paths: list[Path] = []
    for metric in metrics:
        series = {p: _points(results, p, metric) for p in policies}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
        for i, p in enumerate(policies):
            if not series[p]:
                continue
            color, marker = _STYLE.get(p, _EXTRA[i % len(_EXTRA)])
            xs, ys = zip(*series[p], strict=True)
            ax.plot(xs, ys, color=color, marker=marker, label=POLICY_LABELS.get(p, p))
        rates = sorted({x for pts in series.values() for x, _ in pts})
        if len(rates) <= 12:
            ax.set_xticks(rates, [f"{x:g}" for x in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(METRICS.get(metric, metric.replace("_", " ")))
        name = METRICS.get(metric, metric.replace("_", " ")).split(" (")[0]
        ax.set_title(name[0].upper() + name[1:] + (f"\n{title}" if title else ""), fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}_{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
