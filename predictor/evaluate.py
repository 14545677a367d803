"""Accuracy metrics of length predictions and the baselines the predictor is compared with."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Metrics:
    """Accuracy of one method on one group of requests."""

    n: int
    mae: float
    rmse: float
    pearson: float | None  # None when either side is constant
    within10: float  # share of predictions within 10% of the true length
    within25: float  # share within 25%
    high_width: float | None = None  # mean (high - point), for methods with a high quantile
    high_coverage: float | None = None  # share of true lengths <= high

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def compute_metrics(pred: np.ndarray, true: np.ndarray, high: np.ndarray | None = None) -> Metrics:
    """Metrics of predictions ``pred`` (and optionally ``high``) against true lengths."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    err = np.abs(pred - true)
    pearson = None
    if len(pred) > 1 and pred.std() > 0 and true.std() > 0:
        pearson = float(np.corrcoef(pred, true)[0, 1])
    out = Metrics(n=len(pred), mae=float(err.mean()), rmse=float(np.sqrt((err ** 2).mean())), pearson=pearson,
                  within10=float((err <= 0.10 * true).mean()), within25=float((err <= 0.25 * true).mean()))
    if high is not None:
        high = np.asarray(high, dtype=np.float64)
        out.high_width = float((high - pred).mean())
        out.high_coverage = float((true <= high).mean())
    return out


class LinearBaseline:
    """Least-squares line ``a + b * input_tokens`` over all applications."""

    def __init__(self, input_tokens: np.ndarray, y: np.ndarray) -> None:
        self.a, self.b = _line(np.asarray(input_tokens, dtype=np.float64), np.asarray(y, dtype=np.float64))

    def predict(self, input_tokens: np.ndarray) -> np.ndarray:
        return self.a + self.b * np.asarray(input_tokens, dtype=np.float64)


class AppMeanBaseline:
    """Mean true length per application text; the overall mean for an unseen application."""

    def __init__(self, apps: Sequence[str], y: np.ndarray) -> None:
        groups: dict[str, list[float]] = defaultdict(list)
        for a, v in zip(apps, np.asarray(y, dtype=np.float64), strict=True):
            groups[a].append(float(v))
        self.means = {a: float(np.mean(v)) for a, v in groups.items()}
        self.overall = float(np.mean(y)) if len(y) else 0.0

    def predict(self, apps: Sequence[str]) -> np.ndarray:
        return np.array([self.means.get(a, self.overall) for a in apps], dtype=np.float64)


class AppLinearBaseline:
    """A line on input length per application text; the global line for an unseen application."""

    def __init__(self, apps: Sequence[str], input_tokens: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(input_tokens, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.fallback = LinearBaseline(x, y)
        idx: dict[str, list[int]] = defaultdict(list)
        for i, a in enumerate(apps):
            idx[a].append(i)
        self.lines = {a: _line(x[i], y[i]) for a, i in idx.items()}

    def predict(self, apps: Sequence[str], input_tokens: np.ndarray) -> np.ndarray:
        x = np.asarray(input_tokens, dtype=np.float64)
        out = self.fallback.predict(x)
        for i, a in enumerate(apps):
            if a in self.lines:
                ca, cb = self.lines[a]
                out[i] = ca + cb * x[i]
        return out


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(y) == 0:
        return 0.0, 0.0
    if len(np.unique(x)) < 2:
        return float(y.mean()), 0.0
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def finalize(pred: np.ndarray, max_tokens: Sequence[int | None]) -> np.ndarray:
    """Round to whole tokens, at least 1, capped by each request's ``max_tokens`` where known
    (the scheduler caps the same way, and a logged true length never exceeds it)."""
    out = np.maximum(1.0, np.floor(np.asarray(pred, dtype=np.float64) + 0.5))
    caps = np.array([math.inf if m is None else float(m) for m in max_tokens])
    return np.minimum(out, caps)


def evaluate_groups(groups: Sequence[str], true: np.ndarray, methods: dict[str, np.ndarray],
                    highs: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Metrics]]:
    """``{group: {method: Metrics}}`` for every group plus ``"overall"``."""
    highs = highs or {}
    true = np.asarray(true, dtype=np.float64)
    labels = np.array(groups, dtype=object)
    out: dict[str, dict[str, Metrics]] = {}
    for g in [*sorted(set(groups)), "overall"]:
        mask = np.ones(len(true), bool) if g == "overall" else labels == g
        out[g] = {name: compute_metrics(p[mask], true[mask], None if name not in highs else highs[name][mask])
                  for name, p in methods.items()}
    return out


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def markdown_tables(results: dict[str, dict[str, Metrics]], quantile: float) -> str:
    """Two markdown tables: accuracy per group and method, and the high quantile per group."""
    lines = ["| application | method | n | MAE | RMSE | Pearson r | within 10% | within 25% |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g, by_method in results.items():
        for name, m in by_method.items():
            lines.append(f"| {g} | {name} | {m.n} | {_fmt(m.mae)} | {_fmt(m.rmse)} | {_fmt(m.pearson)} | "
                         f"{_fmt(m.within10, True)} | {_fmt(m.within25, True)} |")
    q_rows = [(g, name, m) for g, by_method in results.items() for name, m in by_method.items()
              if m.high_coverage is not None]
    if q_rows:
        lines += ["", f"| application | method | n | mean high - point (q = {quantile:g}) | coverage |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for g, name, m in q_rows:
            lines.append(f"| {g} | {name} | {m.n} | {_fmt(m.high_width)} | {_fmt(m.high_coverage, True)} |")
    return "\n".join(lines)
