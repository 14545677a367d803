"""The runaway mixture: a runaway classifier plus a length regressor fitted on the lengths that ended.

A request either runs away (repeats itself until ``max_tokens``) or ends at a length ``L``. A
length that reached ``max_tokens`` is censored (a lower bound, not the truth), so it is not a
regression target: it is a label for the classifier. The predicted length distribution is the
mixture ``P(L <= x) = (1 - p) G(x)`` for ``x < max_tokens`` and 1 at ``max_tokens``, with ``p``
the runaway probability and ``G`` the regressor's log-normal-like distribution of ended lengths
(its centre from a forest on log length, its spread the out-of-bag residuals). The point estimate
is the mixture's median (the MAE-optimal guess), the high estimate its ``q`` quantile with ``q``
calibrated on the training rows' out-of-bag predictions so that the share covered is the nominal
quantile (split-conformal style). Features: the paper's 21 plus ``max_tokens`` and log input; the
user text's 16 embedding values only with ``MixtureParams.user_embedding`` (off by default: on the
document split they made the MAE worse, 121 against 111 tokens, and embedding each arriving user
text is the predictor's main cost; ``bench/results/predictor_eval_default.md``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

from predictor.features import D_USER, INPUT_TOKENS_COL
from predictor.trainset import TrainingSet, check_compatible

_FORMAT = "magnus-length-mixture"


@dataclass
class MixtureParams:
    """Hyperparameters of the runaway mixture."""

    n_estimators: int = 200
    min_samples_leaf: int = 3  # of the length regressor
    classifier_leaf: int = 10  # of the runaway classifier (a noisier label: larger leaves)
    quantile: float = 0.9  # nominal level of the high estimate (calibrated on the training rows)
    seed: int = 0
    n_jobs: int = 1
    user_embedding: bool = False  # read the user text's embedding (form mixture; the application's always)

    def __post_init__(self) -> None:
        if self.n_estimators < 2 or self.min_samples_leaf < 1:
            raise ValueError("n_estimators must be >= 2 and min_samples_leaf >= 1")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")


@dataclass
class MixtureMeta:
    """What a mixture file records about how it was built."""

    embedder: str
    dim: int
    feature_version: int
    train_size: int
    params: dict[str, Any]
    calibrated_q: float  # the level whose mixture quantile covers ``params["quantile"]`` of the training rows
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    sklearn_version: str = sklearn.__version__
    served_model: str | None = None
    probe: str | None = None  # the probe whose features the model reads (form "probe"; None: none)


def ended_rows(run: np.ndarray) -> np.ndarray:
    """The rows the length regressor learns from: those that ended (not runaways). When (nearly)
    every length is censored, all rows: the runaway share (~1) decides, the regressor on the
    lower bounds is only a stand-in."""
    ended = ~run
    return ended if ended.sum() >= 2 else np.ones(len(run), dtype=bool)


def design(X: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """The mixture's feature rows: the paper's features, ``max_tokens`` and log input length."""
    X = np.asarray(X, dtype=np.float64)
    caps = np.asarray(max_tokens, dtype=np.float64).reshape(-1, 1)
    return np.hstack([X, caps, np.log1p(np.maximum(X[:, [INPUT_TOKENS_COL]], 0.0))]).astype(np.float32)


def without_user(F: np.ndarray) -> np.ndarray:
    """Design rows with the user-embedding values zeroed (a forest never splits on a constant)."""
    F = np.array(F, dtype=np.float32)
    F[:, :D_USER] = 0.0
    return F


def mixture_quantile(q: float, p: np.ndarray, mu: np.ndarray, resid: np.ndarray,
                     max_tokens: np.ndarray) -> np.ndarray:
    """The ``q`` quantile of the mixture per row: ``max_tokens`` where ``q >= 1 - p``, else the ended
    lengths' ``q / (1 - p)`` quantile ``exp(mu + quantile(resid))``, capped by ``max_tokens``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    caps = np.asarray(max_tokens, dtype=np.float64)
    level = np.clip(q / np.maximum(1.0 - p, 1e-9), 0.0, 1.0)
    ended = np.exp(np.asarray(mu, dtype=np.float64) + np.quantile(resid, level)) if len(resid) else np.exp(mu)
    out = np.where(q >= 1.0 - p, caps, ended)
    return np.where(caps > 0, np.minimum(out, caps), out)


def calibrate(target: float, p: np.ndarray, mu: np.ndarray, resid: np.ndarray, y: np.ndarray,
               caps: np.ndarray) -> float:
    """The smallest level whose mixture quantile covers at least ``target`` of the rows ``y``."""
    for q in np.arange(0.50, 0.995, 0.005):
        if (y <= mixture_quantile(float(q), p, mu, resid, caps) + 1e-6).mean() >= target:
            return float(q)
    return 0.995


class RunawayMixture:
    """A fitted runaway classifier and ended-length regressor (see the module docstring)."""

    form = "mixture"
    FORMAT = _FORMAT

    def __init__(self, classifier: Any, regressor: Any,
                 resid: np.ndarray, meta: MixtureMeta, train: TrainingSet | None = None) -> None:
        self.classifier = classifier  # a float: every training row had the same label (that share)
        self.regressor = regressor
        self.resid = np.sort(np.asarray(resid, dtype=np.float64))
        self.meta = meta
        self.train = train
        self.repredictor: Any = None  # predictor.repredict.Repredictor, when trained with head tokens
        self.oob: tuple[np.ndarray, np.ndarray] | None = None  # set by fit, not saved

    @property
    def quantile(self) -> float:
        return float(self.meta.params["quantile"])

    @property
    def reads_user_embedding(self) -> bool:
        """Whether the user text's embedding is among its features (files from before the
        setting existed: yes). Without it, a prediction embeds no user text."""
        return bool(self.meta.params.get("user_embedding", True))

    def _masked(self, F: np.ndarray) -> np.ndarray:
        return F if self.reads_user_embedding else without_user(F)

    @classmethod
    def fit(cls, train: TrainingSet, params: MixtureParams) -> RunawayMixture:
        """Fit on ``train`` (blocking); censored rows (length at max_tokens) only teach the classifier."""
        if len(train) < 2:
            raise ValueError("need at least 2 rows to fit")
        assert train.max_tokens is not None
        run = train.censored
        F = cls.design_of(train)
        if not params.user_embedding:
            F = without_user(F)
        y = train.y.astype(np.float64)
        if 0 < run.sum() < len(run):
            clf: Any = RandomForestClassifier(
                n_estimators=params.n_estimators, min_samples_leaf=params.classifier_leaf, oob_score=True,
                random_state=params.seed, n_jobs=params.n_jobs).fit(F, run)
            p_oob = np.nan_to_num(clf.oob_decision_function_[:, 1], nan=float(run.mean()))
        else:
            clf = float(run.mean())
            p_oob = np.full(len(run), clf)
        ended = ended_rows(run)
        reg = RandomForestRegressor(n_estimators=params.n_estimators, min_samples_leaf=params.min_samples_leaf,
                                    oob_score=True, random_state=params.seed, n_jobs=params.n_jobs)
        reg.fit(F[ended], np.log(np.maximum(y[ended], 1.0)))
        mu = reg.predict(F)  # runaway rows were not fitted on: out of sample already
        oob = reg.oob_prediction_
        mu[ended] = np.where(np.isnan(oob), mu[ended], oob)
        return cls.assemble(train, params, clf, reg, p_oob, mu, ended)

    @classmethod
    def assemble(cls, train: TrainingSet, params: MixtureParams, clf: Any, reg: Any, p_oob: np.ndarray,
                 mu: np.ndarray, ended: np.ndarray, probe: str | None = None) -> RunawayMixture:
        """The fitted mixture from its two models and their out-of-sample predictions on the
        training rows (``p_oob``, ``mu``): residual spread, calibrated high level, metrics."""
        assert train.max_tokens is not None
        y = train.y.astype(np.float64)
        resid = np.log(np.maximum(y[ended], 1.0)) - mu[ended]
        caps = np.where(train.max_tokens > 0, train.max_tokens, np.inf)
        q = calibrate(params.quantile, p_oob, mu, resid, y, caps)
        point = mixture_quantile(0.5, p_oob, mu, resid, caps)
        high = mixture_quantile(q, p_oob, mu, resid, caps)
        metrics = {"oob_n": float(len(y)), "oob_mae": float(np.abs(point - y).mean()),
                   "oob_high_coverage": float((y <= high + 1e-6).mean()),
                   "runaway_share": float(train.censored.mean())}
        meta = MixtureMeta(embedder=train.embedder, dim=train.dim, feature_version=train.feature_version,
                           train_size=len(train), params=asdict(params), calibrated_q=q, metrics=metrics,
                           served_model=train.served_model, probe=probe)
        out = cls(clf, reg, resid, meta, train)
        out.oob = (p_oob, point)  # out-of-sample runaway probability and point of the training rows
        return out

    @staticmethod
    def design_of(train: TrainingSet) -> np.ndarray:
        """The design rows of a training set (what ``predict_lengths`` gets as ``X``, designed)."""
        assert train.max_tokens is not None
        return design(train.X, train.max_tokens)

    @staticmethod
    def design(X: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        return design(X, max_tokens)

    def runaway_probability(self, F: np.ndarray) -> np.ndarray:
        if isinstance(self.classifier, float):
            return np.full(len(F), self.classifier)
        return self.classifier.predict_proba(F)[:, 1]

    def predict_lengths(self, X: np.ndarray, max_tokens: np.ndarray,
                        quantile: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(point, high, p_runaway)`` for feature rows ``X`` with their ``max_tokens``."""
        if len(X) == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        caps = np.asarray(max_tokens, dtype=np.float64)
        F = self._masked(self.design(X, caps))
        p = self.runaway_probability(F)
        mu = self.regressor.predict(F)
        caps = np.where(caps > 0, caps, np.inf)
        q = self.meta.calibrated_q if quantile is None else quantile
        return (mixture_quantile(0.5, p, mu, self.resid, caps), mixture_quantile(q, p, mu, self.resid, caps), p)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a joblib file atomically (the models, metadata, training rows and the repredictor)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": self.FORMAT, "meta": asdict(self.meta), "classifier": self.classifier,
                   "regressor": self.regressor, "resid": self.resid, "repredictor": self.repredictor,
                   "train": None if self.train is None else self.train.to_arrays()}
        tmp = path.with_name(path.name + ".tmp")
        joblib.dump(payload, tmp, compress=3)
        os.replace(tmp, path)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | os.PathLike[str], want_embedder: str | None,
                     want_dim: int | None) -> RunawayMixture:
        meta = MixtureMeta(**payload["meta"])
        check_compatible("model file", path, meta.embedder, meta.dim, meta.feature_version, want_embedder, want_dim)
        train = None if payload.get("train") is None else TrainingSet.from_arrays(payload["train"])
        out = cls(payload["classifier"], payload["regressor"], payload["resid"], meta, train)
        out.repredictor = payload.get("repredictor")
        return out


def load_length_model(path: str | os.PathLike[str], want_embedder: str | None = None,
                      want_dim: int | None = None) -> Any:
    """A model file of either form: ``RunawayMixture`` or the paper's ``LengthForest`` (trusted input:
    joblib unpickles). Raises ``ModelMismatchError`` for another embedder or feature version."""
    from predictor.forest import LengthForest
    from predictor.probe_mixture import ProbeMixture

    payload = joblib.load(path)
    for form in (RunawayMixture, ProbeMixture):
        if isinstance(payload, dict) and payload.get("format") == form.FORMAT:
            return form.from_payload(payload, path, want_embedder, want_dim)
    return LengthForest.load(path, want_embedder, want_dim)
