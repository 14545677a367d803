"""Re-prediction while decoding: a running request's length given its prompt-level prediction and its
first generated tokens.

Trained on ground-truth rows whose first tokens are known (``bench.prefix`` regenerates them),
stacked at checkpoints of 8 to 64 generated tokens, each row counted at a checkpoint only while it
is still running there. A gradient-boosted classifier gives the runaway probability; a
gradient-boosted regressor the log of the remaining length of the rows that ended; the answer is
the same mixture as at arrival (``predictor.mixture``) over the remaining tokens, its high level
calibrated on cross-validated predictions. Features: the arrival runaway probability and point
estimate (out-of-bag on training rows), input length, ``max_tokens`` and ``predictor.head``'s
repetition measures. Both models predict in about a millisecond for a few dozen rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.model_selection import cross_val_predict
from threadpoolctl import ThreadpoolController

from predictor.head import head_features
from predictor.mixture import calibrate, mixture_quantile
from predictor.trainset import HEAD_K, TrainingSet
from predictor.types import CHECKPOINTS

MIN_HEAD_ROWS = 40  # rows with known first tokens needed before the server (re)fits a re-predictor
_threads: ThreadpoolController | None = None  # made at first use (it inspects the loaded libraries)


def _one_openmp_thread():
    """A context in which OpenMP runs one thread: the gradient-boosting models run beside the
    model's workers, whose cores their idle threads would otherwise spin on."""
    global _threads
    if _threads is None:
        _threads = ThreadpoolController()
    return _threads.limit(limits=1, user_api="openmp")


@dataclass
class HeadRow:
    """One request as the re-predictor sees it."""

    arrival_p: float  # runaway probability predicted at arrival
    arrival_point: float  # point estimate at arrival
    input_tokens: int
    max_tokens: int
    head_ids: Sequence[int]  # the first generated tokens (at least one)


def _features(r: HeadRow, k: int) -> np.ndarray:
    head = list(r.head_ids)[:k]
    return np.concatenate(([r.arrival_p, np.log1p(r.arrival_point), np.log1p(r.input_tokens), r.max_tokens],
                           head_features(head)))


class Repredictor:
    """Remaining-length model from the first generated tokens."""

    def __init__(self, quantile: float = 0.9, seed: int = 0) -> None:
        self.quantile = quantile
        self.seed = seed
        self.classifier: HistGradientBoostingClassifier | float = 0.0
        self.regressor = HistGradientBoostingRegressor(max_depth=3, learning_rate=0.05, max_iter=150,
                                                       random_state=seed)
        self.resid = np.zeros(0)
        self.calibrated_q = quantile
        self.train_rows = 0

    def fit(self, rows: Sequence[HeadRow], lengths: Sequence[int]) -> Repredictor:
        """Fit on rows whose true lengths are ``lengths`` (a length at max_tokens: a runaway)."""
        F, run, remain, caps = [], [], [], []
        for r, y in zip(rows, lengths, strict=True):
            for k in CHECKPOINTS:
                if len(r.head_ids) < k or y <= k:
                    break  # ended by then: nothing left to predict
                F.append(_features(r, k))
                run.append(y >= r.max_tokens)
                remain.append(y - k)
                caps.append(r.max_tokens - k)
        if len(F) < 10:
            raise ValueError("need at least 10 (row, checkpoint) samples to fit the re-predictor")
        X, ran = np.array(F), np.array(run)
        rem, cap = np.array(remain, dtype=np.float64), np.array(caps, dtype=np.float64)
        clf = HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=150, random_state=self.seed)
        folds = min(3, int(ran.sum()), int((~ran).sum()))
        if folds >= 2:
            p_cv = cross_val_predict(clf, X, ran, cv=folds, method="predict_proba")[:, 1]
            self.classifier = clf.fit(X, ran)
        else:
            self.classifier = float(ran.mean())
            p_cv = np.full(len(ran), self.classifier)
        ended = ~ran
        target = np.log(np.maximum(rem[ended], 1.0))
        mu = np.empty(len(X))
        mu[ended] = cross_val_predict(self.regressor, X[ended], target, cv=min(3, int(ended.sum())))
        self.regressor.fit(X[ended], target)
        mu[ran] = self.regressor.predict(X[ran])
        self.resid = np.sort(target - mu[ended])
        self.calibrated_q = calibrate(self.quantile, p_cv, mu, self.resid, rem, cap)
        self.train_rows = len(rows)
        return self

    def predict(self, rows: Sequence[HeadRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(point, high, p_runaway)`` of the TOTAL length of each running row (generated included)."""
        if not rows:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        k = np.array([min(len(r.head_ids), HEAD_K) for r in rows], dtype=np.float64)
        X = np.array([_features(r, HEAD_K) for r in rows])
        # one OpenMP thread: the gradient-boosting predictors' idle threads would otherwise spin on
        # the cores the model's workers decode on (measured: ~13% slower decoding with 8 rows)
        with _one_openmp_thread():
            p = (np.full(len(rows), self.classifier) if isinstance(self.classifier, float)
                 else self.classifier.predict_proba(X)[:, 1])
            mu = self.regressor.predict(X)
        cap = np.array([r.max_tokens for r in rows], dtype=np.float64) - k
        point = k + mixture_quantile(0.5, p, mu, self.resid, cap)
        high = k + mixture_quantile(self.calibrated_q, p, mu, self.resid, cap)
        return point, high, p


def fit_from_training_set(train: TrainingSet, oob: tuple[np.ndarray, np.ndarray], quantile: float = 0.9,
                          seed: int = 0, min_rows: int = MIN_HEAD_ROWS) -> Repredictor | None:
    """A re-predictor fitted on the rows of ``train`` whose first generated tokens and ``max_tokens``
    are known, given the arrival model's out-of-bag ``(p_runaway, point)`` on every row (a
    ``RunawayMixture`` fit leaves them in ``.oob``); None with fewer than ``min_rows`` such rows or
    too few samples. One OpenMP thread, as for predictions: it runs beside the workers."""
    p_oob, point_oob = oob
    assert train.max_tokens is not None
    rows, lengths = [], []
    for i in range(len(train)):
        head = train.head(i)
        cap = int(train.max_tokens[i])
        if head and cap > 0:
            rows.append(HeadRow(float(p_oob[i]), float(point_oob[i]), int(train.input_tokens[i]), cap, head))
            lengths.append(int(train.y[i]))
    if len(rows) < min_rows:
        return None
    try:
        with _one_openmp_thread():
            return Repredictor(quantile, seed).fit(rows, lengths)
    except ValueError:
        return None
