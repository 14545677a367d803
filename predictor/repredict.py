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

**Head states** (TRAIL-style, any form, when the training rows have them): the served model's own
view of the generation so far, the mean of one layer's hidden states from the prompt's last token
through the last generated one (``predictor.probe.head_state_means``; the iteration worker reports
it at each checkpoint at no extra forward). Training rows get them from an offline forward (the
CLI's ``--probe-model``; the probe form's own probe) or, in a server, from what the workers
reported for the requests it served; ``states`` names the layer, and states of another layer are
not read. A logistic regression on it (L2, its
penalty chosen by its out-of-fold AUC, folds grouped by request) gives the runaway probability of
a row that comes with a state; a row without one is scored by the gradient-boosted classifier.
(Measured on the test split: the state model alone ranks runaways better than the boosted
classifier with the state model's probability as one more feature, which overfits: AUC 0.85
against 0.82 over the rows still running after 32 tokens.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController

from predictor.head import head_features
from predictor.mixture import calibrate, mixture_quantile
from predictor.trainset import HEAD_K, TrainingSet
from predictor.types import CHECKPOINTS

MIN_HEAD_ROWS = 40  # rows with known first tokens needed before the server (re)fits a re-predictor
MIN_STATE_SAMPLES = 30  # (row, checkpoint) samples with a head state needed to learn from states
_STATE_CS = (1e-3, 3e-3, 1e-2, 3e-2)  # inverse penalties tried for the head-state classifier
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
    state: np.ndarray | Sequence[float] | None = None  # head state at the last checkpoint reached (None: not reported)


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
        self.state_model: Pipeline | None = None  # runaway probability from a head state
        self.states: str | None = None  # the layer its head states came from (TrainingSet.states)

    def fit(self, rows: Sequence[HeadRow], lengths: Sequence[int],
            states: Sequence[np.ndarray | None] | None = None) -> Repredictor:
        """Fit on rows whose true lengths are ``lengths`` (a length at max_tokens: a runaway).
        ``states``: each row's head states at the ``CHECKPOINTS`` (``(len(CHECKPOINTS), dim)``, NaN
        where unknown) or None; with enough of them the model also learns from head states."""
        F, run, remain, caps, S, group = [], [], [], [], [], []
        for i, (r, y) in enumerate(zip(rows, lengths, strict=True)):
            for c, k in enumerate(CHECKPOINTS):
                if len(r.head_ids) < k or y <= k:
                    break  # ended by then: nothing left to predict
                F.append(_features(r, k))
                run.append(y >= r.max_tokens)
                remain.append(y - k)
                caps.append(r.max_tokens - k)
                st = None if states is None or states[i] is None else np.asarray(states[i][c], dtype=np.float32)
                S.append(st if st is not None and np.isfinite(st).all() else None)
                group.append(i)
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
        p_state_cv = self._fit_states(ran, S, np.array(group), folds)
        if p_state_cv is not None:
            p_cv = np.where(np.isnan(p_state_cv), p_cv, p_state_cv)
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

    def _fit_states(self, ran: np.ndarray, S: list[np.ndarray | None], group: np.ndarray,
                    folds: int) -> np.ndarray | None:
        """Learn from head states where the samples have them; the state model's out-of-fold
        runaway probabilities (NaN for samples without a state; None: too few states to learn from)."""
        self.state_model = None
        have = np.array([s is not None for s in S])
        n_groups = len(np.unique(group[have])) if have.any() else 0
        if folds < 2 or have.sum() < MIN_STATE_SAMPLES or len(np.unique(ran[have])) < 2 or n_groups < 3:
            return None
        Xs = np.stack([s for s in S if s is not None]).astype(np.float32)
        splits = list(GroupKFold(n_splits=min(5, n_groups)).split(Xs, ran[have], group[have]))
        if any(len(np.unique(ran[have][tr])) < 2 for tr, _ in splits):
            return None
        best = None
        for C in _STATE_CS:  # the penalty with the best out-of-fold AUC (folds grouped by request)
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            p_oof = cross_val_predict(model, Xs, ran[have], cv=splits, method="predict_proba")[:, 1]
            auc = roc_auc_score(ran[have], p_oof)
            if best is None or auc > best[0]:
                best = (auc, model, p_oof)
        assert best is not None
        p_state = np.full(len(ran), np.nan)
        p_state[have] = best[2]
        self.state_model = best[1].fit(Xs, ran[have])
        return p_state

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
            state_model = getattr(self, "state_model", None)  # None in files from before head states
            withs = [i for i, r in enumerate(rows) if r.state is not None and np.isfinite(r.state).all()]
            if state_model is not None and withs:
                Xs = np.stack([np.asarray(rows[i].state, dtype=np.float32) for i in withs])
                p[withs] = state_model.predict_proba(Xs)[:, 1]
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
    rows, lengths, states = [], [], []
    for i in range(len(train)):
        head = train.head(i)
        cap = int(train.max_tokens[i])
        if head and cap > 0:
            rows.append(HeadRow(float(p_oob[i]), float(point_oob[i]), int(train.input_tokens[i]), cap, head))
            lengths.append(int(train.y[i]))
            states.append(None if train.H is None else train.H[i])
    if len(rows) < min_rows:
        return None
    try:
        with _one_openmp_thread():
            rp = Repredictor(quantile, seed).fit(rows, lengths, states)
    except ValueError:
        return None
    rp.states = train.states if rp.state_model is not None else None
    return rp
