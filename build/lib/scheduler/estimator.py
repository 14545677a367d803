"""Batch-time estimator (DESIGN §2.3): k-nearest neighbours on ``(batch size, L(B), G(B))``.

Cold start: the analytical prior (a :class:`~scheduler.costmodel.CostModel` or any
``(size, L, G) -> seconds`` callable) answers until ``min_samples`` batches are in the training
set; until then every finished batch is added. After that, continual learning: finished batches
are kept pending; every ``interval_s`` (time passed in) :meth:`update` re-estimates them with
their *true* generation length and adds those whose error is more than ``err_abs_s`` seconds AND
more than ``err_rel`` of the true time.

Retraining (:meth:`retrain`) fits a new model on a snapshot of the training set and swaps it in
with one attribute assignment, so the service may run it on a background thread while
:meth:`estimate` keeps answering from the old model. With ``sync_retrain=True`` (tests, the
simulator) :meth:`update` retrains inline instead. The estimator never starts threads itself.

Persisted batches are keyed by ``source`` (served model, device, dtype...): a saved file
recording another source is not loaded at construction (see :class:`BatchTimeEstimator`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from scheduler.batch import BatchOutcome
from scheduler.costmodel import CostModel

Prior = Callable[[int, int, int], float]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch."""

    size: int
    max_prompt: int  # L(B)
    pred_gen: int  # G(B) from predictions (what the estimate used)
    true_gen: int  # G(B) actually generated
    seconds: float  # measured batch time


class BatchTimeEstimator:
    """Estimates a batch's processing time; learns from finished batches.

    ``source`` describes what the batches are measured on, e.g. ``{"model": ..., "device": ...,
    "dtype": ...}``; :meth:`save` records it. At construction an existing ``path`` is loaded
    only if it records the same source (any file when ``source`` is None); otherwise it is
    ignored with a warning, ``discarded_state`` is True, and the file stays as it is until the
    next save overwrites it.
    """

    def __init__(
        self,
        prior: Prior | None = None,
        *,
        k: int = 5,
        min_samples: int = 20,
        interval_s: float = 120.0,
        err_abs_s: float = 2.0,
        err_rel: float = 0.2,
        path: str | os.PathLike[str] | None = None,
        sync_retrain: bool = True,
        source: dict[str, str] | None = None,
    ) -> None:
        if k < 1 or min_samples < 1 or interval_s < 0 or err_abs_s < 0 or err_rel < 0:
            raise ValueError("invalid estimator parameters")
        self.prior: Prior = prior if prior is not None else CostModel.default()
        self.k = k
        self.min_samples = min_samples
        self.interval_s = interval_s
        self.err_abs_s = err_abs_s
        self.err_rel = err_rel
        self.path = Path(path) if path is not None else None
        self.sync_retrain = sync_retrain
        self.source = dict(source) if source is not None else None
        self.discarded_state = False  # the file at ``path`` was learned on another source
        self._X: list[tuple[int, int, int]] = []  # training features (size, L, G)
        self._y: list[float] = []
        self._pending: list[BatchRecord] = []  # finished since the last update
        self._model: Pipeline | None = None  # swapped atomically by retrain()
        self._last_update: float | None = None
        self.version = 0  # bumps on every swap (callers cache estimates per version)
        self.retrain_pending = False  # the training set changed since the last retrain
        self.kind: str | None = None  # the worker kind it learns on (None: the server's own device)
        self._kinds: dict[str, BatchTimeEstimator] = {}  # other worker kinds' estimators
        self._args = dict(k=k, min_samples=min_samples, interval_s=interval_s, err_abs_s=err_abs_s,
                          err_rel=err_rel, sync_retrain=sync_retrain)
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            recorded = data.get("source")
            if self.source is None or recorded == self.source:
                self._load_data(data, self.path)
            else:
                self.discarded_state = True
                log.warning("ignoring batch-time estimator state %s: it was learned for %s, but this "
                            "server runs %s; the estimator starts fresh (the file is kept until the "
                            "next save replaces it)", self.path,
                            recorded if recorded is not None else "an unrecorded source", self.source)

    # -- worker kinds --------------------------------------------------------------------------
    def for_kind(self, kind: str | None) -> BatchTimeEstimator:
        """The estimator of workers of ``kind`` (a device name): this one for its own kind (and
        None), else one learned on that kind alone, created on first use with the same settings,
        its own file next to this one's and ``kind`` in its source."""
        if kind is None or kind == self.kind:
            return self
        est = self._kinds.get(kind)
        if est is None:
            path = None
            if self.path is not None:
                safe = "".join(c if c.isalnum() else "_" for c in kind)
                path = self.path.with_name(f"{self.path.stem}.{safe}{self.path.suffix}")
            source = None if self.source is None else {**self.source, "kind": kind}
            est = BatchTimeEstimator(self.prior, path=path, source=source, **self._args)
            est.kind = kind
            self._kinds[kind] = est
        return est

    def all(self) -> list[BatchTimeEstimator]:
        """This estimator and those of the other worker kinds."""
        return [self, *self._kinds.values()]

    # -- answering ---------------------------------------------------------------------------
    @property
    def using_knn(self) -> bool:
        return self._model is not None

    @property
    def n_train(self) -> int:
        return len(self._y)

    def estimate(self, size: int, max_prompt: int, max_gen: int) -> float:
        """Seconds for a batch of this shape."""
        return self.estimate_many([(size, max_prompt, max_gen)])[0]

    def estimate_many(self, shapes: Sequence[tuple[int, int, int]]) -> list[float]:
        """Vectorised :meth:`estimate` (one KNN query for all shapes)."""
        if not shapes:
            return []
        model = self._model  # one read: a concurrent swap cannot mix two models
        if model is None:
            return [float(self.prior(s, L, G)) for s, L, G in shapes]
        pred = model.predict(np.asarray(shapes, dtype=float))
        return [max(float(t), 0.0) for t in pred]

    # -- learning ----------------------------------------------------------------------------
    def record(self, outcome: BatchOutcome, now: float) -> None:
        """Log a finished batch (true G(B) is the largest true generation length)."""
        b = outcome.batch
        true_gen = max(outcome.true_gen.values(), default=b.max_gen)
        self.log(BatchRecord(b.size, b.max_prompt, b.max_gen, true_gen, outcome.duration), now)

    def log(self, rec: BatchRecord, now: float) -> None:
        """Log a finished batch. During cold start it joins the training set directly."""
        if self._last_update is None:
            self._last_update = now
        if self._model is None:
            self._add(rec)
            if self.n_train >= self.min_samples:
                self.retrain_pending = True
                if self.sync_retrain:
                    self.retrain()
        else:
            self._pending.append(rec)

    def due(self, now: float) -> bool:
        """Whether a continual-learning update is due (``interval_s`` since the last one)."""
        return self._last_update is not None and now - self._last_update >= self.interval_s

    def selected(self, rec: BatchRecord) -> bool:
        """The selection rule: re-estimated with the true G(B), error > err_abs_s AND > err_rel."""
        err = abs(self.estimate(rec.size, rec.max_prompt, rec.true_gen) - rec.seconds)
        return err > self.err_abs_s and err > self.err_rel * rec.seconds

    def _select(self, recs: list[BatchRecord]) -> list[BatchRecord]:
        """:meth:`selected` for many records with one estimator query."""
        if not recs:
            return []
        est = self.estimate_many([(r.size, r.max_prompt, r.true_gen) for r in recs])
        return [r for r, e in zip(recs, est, strict=True)
                if abs(e - r.seconds) > self.err_abs_s and abs(e - r.seconds) > self.err_rel * r.seconds]

    def update(self, now: float) -> int:
        """Run the selection over the pending batches; returns how many joined the training set."""
        self._last_update = now
        pending, self._pending = self._pending, []
        chosen = self._select(pending)
        for r in chosen:
            self._add(r)
        if chosen:
            self.retrain_pending = True
            if self.sync_retrain:
                self.retrain()
        return len(chosen)

    def maybe_update(self, now: float) -> int:
        """:meth:`update` when due, else nothing."""
        return self.update(now) if self.due(now) else 0

    def retrain(self, save: bool = True) -> bool:
        """Fit a new KNN on the training set and swap it in; False while below ``min_samples``.
        Safe to call from a background thread. With a ``path``, the training set is then saved
        (unless ``save`` is False)."""
        X, y = list(self._X), list(self._y)  # snapshot; list() of a list is atomic under the GIL
        n = min(len(X), len(y))
        self.retrain_pending = False
        if n < self.min_samples:
            return False
        model = make_pipeline(
            StandardScaler(), KNeighborsRegressor(n_neighbors=min(self.k, n), weights="distance")
        )
        model.fit(np.asarray(X[:n], dtype=float), np.asarray(y[:n], dtype=float))
        self._model = model
        self.version += 1
        if save and self.path is not None:
            self.save()
        return True

    def _add(self, rec: BatchRecord) -> None:
        # features use the TRUE G(B): the label is the time of a batch that really generated it
        self._X.append((rec.size, rec.max_prompt, rec.true_gen))
        self._y.append(rec.seconds)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the training set as JSON (atomically: temp file then rename)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path given")
        target.parent.mkdir(parents=True, exist_ok=True)
        X, y = list(self._X), list(self._y)
        n = min(len(X), len(y))
        data = {"features": ["size", "max_prompt", "max_gen"], "X": [list(x) for x in X[:n]], "y": y[:n],
                "source": self.source}
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, target)
        return target

    def load(self, path: str | os.PathLike[str] | None = None) -> int:
        """Replace the training set with a saved one and retrain; returns its size. Loads
        whatever source the file records (the source check happens at construction)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path given")
        return self._load_data(json.loads(target.read_text()), target)

    def _load_data(self, data: dict[str, Any], origin: Path) -> int:
        """Install the training set parsed from the file ``origin`` and retrain; returns its size."""
        X = [(int(a), int(b), int(c)) for a, b, c in data["X"]]
        y = [float(v) for v in data["y"]]
        if len(X) != len(y):
            raise ValueError(f"{origin}: X and y differ in length")
        self._X, self._y = X, y
        if not self.retrain(save=False):
            self._model = None
        return len(y)
