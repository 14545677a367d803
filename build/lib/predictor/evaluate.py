"""The predictor's yardstick: accuracy against every cheap baseline, runaways, coverage.

``yardstick`` scores, on test rows, the model and every cheap baseline fitted on training rows
(``BASELINES``; "app" means the application-level text, the instruction, as the server sees it),
names the best baseline and the model's MAE ratio to it, reports how many requests ran away
(``output_tokens >= max_tokens``) and how well a runaway score ranks them, and how often the
model's high estimate covers the true length.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from predictor.data import Row

if TYPE_CHECKING:
    from predictor.forest import LengthForest

#: The forest's name in reports.
FOREST = "predictor"
#: The cheap baselines, each fitted on the training rows only (``max_tokens`` needs no fit).
BASELINES = ("max_tokens", "global median", "app mean", "app median", "linear(input)", "app linear(input)")


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


class AppStatBaseline:
    """A statistic (mean, median) of the true length per application text; the statistic over all
    rows for an unseen application."""

    def __init__(self, apps: Sequence[str], y: np.ndarray,
                 stat: Callable[[np.ndarray], Any] = np.mean) -> None:
        y = np.asarray(y, dtype=np.float64)
        labels = np.asarray(apps, dtype=object)
        self.values = {a: float(stat(y[labels == a])) for a in dict.fromkeys(apps)}
        self.overall = float(stat(y)) if len(y) else 0.0

    def predict(self, apps: Sequence[str]) -> np.ndarray:
        return np.array([self.values.get(a, self.overall) for a in apps], dtype=np.float64)


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


def baseline_predictions(train_apps: Sequence[str], train_x: np.ndarray, train_y: np.ndarray,
                         apps: Sequence[str], x: np.ndarray,
                         max_tokens: Sequence[int | None]) -> dict[str, np.ndarray]:
    """Raw predictions of every baseline in ``BASELINES`` for rows ``(apps, x)``, fitted on the
    training rows; ``max_tokens`` (predict the request's limit) only when every row has one."""
    y = np.asarray(train_y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    if all(m is not None for m in max_tokens):
        out["max_tokens"] = np.asarray(max_tokens, dtype=np.float64)
    out["global median"] = np.full(len(x), float(np.median(y)) if len(y) else 0.0)
    out["app mean"] = AppStatBaseline(train_apps, y, np.mean).predict(apps)
    out["app median"] = AppStatBaseline(train_apps, y, np.median).predict(apps)
    out["linear(input)"] = LinearBaseline(train_x, y).predict(x)
    out["app linear(input)"] = AppLinearBaseline(train_apps, train_x, y).predict(apps, x)
    return out


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


# --- runaways --------------------------------------------------------------------------------


def tree_lengths(forest: LengthForest, X: np.ndarray) -> np.ndarray:
    """Every tree's predicted length in tokens, shape ``(n_trees, n)``."""
    from predictor.forest import _per_tree, _scale

    return _per_tree(forest.model, X) * _scale(forest.target, X)


def runaway_probability(trees: np.ndarray, max_tokens: Sequence[int | None]) -> np.ndarray:
    """P(length >= max_tokens) per row: the share of trees (columns of ``trees``) predicting at least
    the row's ``max_tokens``; NaN where it is unknown."""
    caps = np.array([np.nan if m is None else float(m) for m in max_tokens])
    with np.errstate(invalid="ignore"):
        share = (np.asarray(trees, dtype=np.float64) >= caps).mean(axis=0)
    return np.where(np.isnan(caps), np.nan, share)


@dataclass
class Runaways:
    """Requests whose true length reached their ``max_tokens``, and how a score detects them."""

    counts: dict[str, tuple[int, int]]  # group (and "overall") -> (runaways, rows with a max_tokens)
    threshold: float  # a row is flagged when its score >= threshold
    score: str | None = None  # what the score is, None when there is none
    auc: float | None = None  # ROC AUC of the score (None without a score or with one class only)
    precision: float | None = None  # of the flagged rows, the share that ran away
    recall: float | None = None  # of the runaways, the share flagged
    flagged: int | None = None

    def share(self, group: str = "overall") -> float:
        hits, n = self.counts[group]
        return hits / n if n else math.nan


def runaway_report(groups: Sequence[str], true: np.ndarray, max_tokens: Sequence[int | None],
                   score: np.ndarray | None = None, threshold: float = 0.5,
                   score_name: str | None = None) -> Runaways | None:
    """Runaway share per group and, with a ``score``, its ROC AUC and precision/recall at
    ``threshold``; over the rows with a known ``max_tokens`` (None when no row has one)."""
    known = np.array([m is not None for m in max_tokens])
    if not known.any():
        return None
    caps = np.array([m for m in max_tokens if m is not None], dtype=np.float64)
    ran = np.asarray(true, dtype=np.float64)[known] >= caps
    labels = np.asarray(groups, dtype=object)[known]
    counts = {g: (int(ran[labels == g].sum()), int((labels == g).sum())) for g in sorted(set(labels))}
    counts["overall"] = (int(ran.sum()), len(ran))
    out = Runaways(counts, threshold)
    if score is None:
        return out
    s = np.asarray(score, dtype=np.float64)[known]
    flagged = s >= threshold
    out.score, out.flagged = score_name, int(flagged.sum())
    if 0 < ran.sum() < len(ran):
        out.auc = float(roc_auc_score(ran, s))
    out.precision = float(precision_score(ran, flagged, zero_division=np.nan))
    out.recall = float(recall_score(ran, flagged, zero_division=np.nan))
    out.precision, out.recall = (None if math.isnan(v) else v for v in (out.precision, out.recall))
    return out


# --- the yardstick -------------------------------------------------------------------------------


@dataclass
class Yardstick:
    """The model against every cheap baseline on test rows, with runaways and coverage."""

    results: dict[str, dict[str, Metrics]]  # group (and "overall") -> method -> metrics
    quantile: float  # of the model's high estimate
    runaways: Runaways | None = None
    baselines: list[str] = field(default_factory=list)

    def best_baseline(self, group: str = "overall") -> str:
        """The baseline with the lowest MAE on ``group``."""
        return min(self.baselines, key=lambda name: self.results[group][name].mae)

    def ratio(self, group: str = "overall") -> float | None:
        """Model MAE / best baseline MAE on ``group`` (below 1: the model is better); None if that MAE is 0."""
        best = self.results[group][self.best_baseline(group)].mae
        return self.results[group][FOREST].mae / best if best > 0 else None

    @property
    def coverage(self) -> float | None:
        """Share of test rows whose true length is at most the model's high estimate."""
        return self.results["overall"][FOREST].high_coverage

    def as_dict(self) -> dict[str, Any]:
        """``best_baseline`` per group, ``coverage`` and ``runaways``, for the JSON report."""
        best = {g: {"name": self.best_baseline(g), "mae": self.results[g][self.best_baseline(g)].mae,
                    "predictor_mae": self.results[g][FOREST].mae, "ratio": self.ratio(g)}
                for g in self.results}
        runaways = None
        if self.runaways is not None:
            runaways = asdict(self.runaways)
            runaways["counts"] = {g: {"runaways": k, "n": n, "share": self.runaways.share(g)}
                                  for g, (k, n) in self.runaways.counts.items()}
        return {"best_baseline": best, "coverage": self.coverage, "runaways": runaways}

    def markdown(self) -> str:
        """The report: best baseline and the model's ratio to it first, then coverage, runaways and
        the per-application tables."""
        best, ratio = self.best_baseline(), self.ratio()
        lines = [f"**Best cheap baseline: {best}**, MAE {_fmt(self.results['overall'][best].mae)} tokens; "
                 f"the model ({FOREST}) {_fmt(self.results['overall'][FOREST].mae)}: "
                 f"model / best = {_fmt(ratio)} (below 1: the model is better).", "",
                 "| application | best baseline | its MAE | model MAE | model / best |",
                 "| --- | --- | ---: | ---: | ---: |"]
        for g in self.results:
            b = self.best_baseline(g)
            lines.append(f"| {g} | {b} | {_fmt(self.results[g][b].mae)} | "
                         f"{_fmt(self.results[g][FOREST].mae)} | {_fmt(self.ratio(g))} |")
        lines += ["", f"**Coverage of the high estimate** (q = {self.quantile:g}): "
                      f"{_fmt(self.coverage, True)} of the test rows have a true length <= it."]
        if self.runaways is not None:
            r = self.runaways
            hits, n = r.counts["overall"]
            text = f"**Runaways** (`output_tokens >= max_tokens`): {hits} of {n} ({_fmt(r.share(), True)})."
            if r.score is not None:
                text += (f" Score: {r.score}. ROC AUC {_fmt(r.auc)}; flagged at score >= {r.threshold:g}: "
                         f"{r.flagged}, precision {_fmt(r.precision)}, recall {_fmt(r.recall)}.")
            lines += ["", text, "", "| application | n | runaways | share |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| {g} | {n} | {k} | {_fmt(r.share(g), True)} |" for g, (k, n) in r.counts.items()]
        return "\n".join([*lines, "", markdown_tables(self.results, self.quantile)])


def yardstick(train_apps: Sequence[str], train_x: np.ndarray, train_y: np.ndarray, rows: Sequence[Row],
              point: np.ndarray, high: np.ndarray, quantile: float, runaway_score: np.ndarray | None = None,
              threshold: float = 0.5, score_name: str | None = None,
              extra: dict[str, np.ndarray] | None = None) -> Yardstick:
    """Score the model's ``point``/``high`` predictions for ``rows`` and every baseline fitted on the
    training rows ``(train_apps, train_x, train_y)``; baselines are finalized like the model.
    ``extra``: other methods' (finalized) predictions to list beside them (e.g. the paper form)."""
    caps = [r.max_tokens for r in rows]
    true = np.array([r.output_tokens for r in rows], dtype=np.float64)
    groups = [r.group for r in rows]
    raw = baseline_predictions(train_apps, train_x, train_y, [r.app_text for r in rows],
                               np.array([r.input_tokens for r in rows], dtype=np.float64), caps)
    methods = ({FOREST: np.asarray(point, dtype=np.float64)} | {k: np.asarray(v, dtype=np.float64)
                                                                for k, v in (extra or {}).items()}
               | {k: finalize(v, caps) for k, v in raw.items()})
    results = evaluate_groups(groups, true, methods, {FOREST: np.asarray(high, dtype=np.float64)})
    runaways = runaway_report(groups, true, caps, runaway_score, threshold, score_name)
    return Yardstick(results, quantile, runaways, list(raw))


# --- re-prediction while decoding ----------------------------------------------------------------
@dataclass
class RepredictionAt:
    """The re-predictor after ``k`` generated tokens."""

    k: int
    running: int  # rows still running after k tokens (the others ended: their length is known)
    auc_running: float | None  # runaway ROC AUC over the running rows
    auc_all: float | None  # over all rows, an ended row scored 0 (it is known not to run away)
    precision: float | None  # at the threshold, over the running rows
    recall: float | None
    mae: float  # of the total length over all rows, an ended row's length known
    mae_running: float  # over the running rows only
    coverage: float | None  # of the high estimate, over the running rows


@dataclass
class Reprediction:
    """Runaway detection and length error from the first generated tokens, per checkpoint."""

    arrival_auc: float | None
    arrival_mae: float
    at: list[RepredictionAt]
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"**Re-prediction while decoding** (the model's re-predictor, from the first generated tokens; "
                 f"at arrival: runaway AUC {_fmt(self.arrival_auc)}, MAE {_fmt(self.arrival_mae)}). A row that "
                 "ended before k tokens has a known length (error 0, runaway score 0).", "",
                 "| after k tokens | rows still running | runaway AUC (running rows) | runaway AUC (all rows) | "
                 f"precision / recall at {self.threshold:g} | MAE (all rows) | MAE (running rows) | "
                 "coverage of high (running) |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for a in self.at:
            lines.append(f"| {a.k} | {a.running} | {_fmt(a.auc_running)} | {_fmt(a.auc_all)} | "
                         f"{_fmt(a.precision)} / {_fmt(a.recall)} | {_fmt(a.mae)} | {_fmt(a.mae_running)} | "
                         f"{_fmt(a.coverage, True)} |")
        return "\n".join(lines)


def _auc(labels: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, score)) if 0 < labels.sum() < len(labels) else None


def repredict_report(repredictor: Any, rows: Sequence[Row], heads: dict[str, list[int]], arrival_p: np.ndarray,
                     arrival_point: np.ndarray, to_head_rows: Callable[..., list[Any]], threshold: float = 0.5,
                     checkpoints: Sequence[int] = (16, 32)) -> Reprediction:
    """Score ``repredictor`` on ``rows`` whose first generated tokens are ``heads``, at each checkpoint."""
    true = np.array([r.output_tokens for r in rows], dtype=np.float64)
    caps = np.array([r.max_tokens or 0 for r in rows], dtype=np.float64)
    ran = (caps > 0) & (true >= caps)
    out = []
    for k in checkpoints:
        live = true > k
        cut = {r.id: heads[r.id][:k] for r in rows if r.id in heads}
        idx = np.flatnonzero(live)
        hrows = to_head_rows([rows[i] for i in idx], cut, arrival_p[idx], arrival_point[idx])
        point, high, p = repredictor.predict(hrows)
        point = np.minimum(np.maximum(point, k + 1), caps[idx])
        est = true.copy()
        est[idx] = np.floor(point + 0.5)
        score = np.zeros(len(rows))
        score[idx] = p
        flagged = p >= threshold
        out.append(RepredictionAt(
            k=k, running=len(idx), auc_running=_auc(ran[idx], p), auc_all=_auc(ran, score),
            precision=float(ran[idx][flagged].mean()) if flagged.any() else None,
            recall=float(flagged[ran[idx]].mean()) if ran[idx].any() else None,
            mae=float(np.abs(est - true).mean()), mae_running=float(np.abs(est[idx] - true[idx]).mean()),
            coverage=float((true[idx] <= high + 1e-6).mean()) if len(idx) else None))
    return Reprediction(_auc(ran, np.asarray(arrival_p, dtype=np.float64)),
                        float(np.abs(np.asarray(arrival_point) - true).mean()), out, threshold)
