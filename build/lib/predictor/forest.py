"""Random-forest regressor of generation length, with a high quantile from the per-tree spread."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.ensemble import RandomForestRegressor
from tqdm.auto import tqdm

from predictor.features import INPUT_TOKENS_COL
from predictor.trainset import ModelMismatchError, TrainingSet, check_compatible

_FORMAT = "magnus-length-forest"
TARGETS = ("ratio", "tokens")


def _scale(target: str, X: np.ndarray) -> np.ndarray:
    """Per-row factor from what the trees predict to tokens: the input length for "ratio"."""
    if target == "ratio":
        return np.maximum(np.asarray(X, dtype=np.float64)[:, INPUT_TOKENS_COL], 1.0)
    return np.ones(len(X))
__all__ = ["ForestParams", "LengthForest", "ModelMeta", "ModelMismatchError"]


@dataclass
class ForestParams:
    """Hyperparameters of the random forest and of its quantile estimate."""

    n_estimators: int = 100
    max_depth: int | None = None
    min_samples_leaf: int = 1
    quantile: float = 0.9  # the "high" estimate: this quantile of the per-tree predictions
    seed: int = 0
    n_jobs: int = 1  # threads for fitting and predicting; 1 keeps background retraining gentle
    # What the trees learn: "ratio" = output tokens per input token (the prediction is that times
    # the input length), "tokens" = the length itself. A forest cannot extrapolate a length that
    # grows with the input, so it does better on the ratio for input-proportional tasks
    # (translation, rewriting, code); "tokens" is the paper's literal form.
    target: str = "ratio"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        if self.n_estimators < 1 or self.min_samples_leaf < 1:
            raise ValueError("n_estimators and min_samples_leaf must be >= 1")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError("max_depth must be >= 1 or None")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError("quantile must be in (0, 1)")


@dataclass
class ModelMeta:
    """What a model file records about how it was built."""

    embedder: str  # canonical embedder name (see predictor.embedder.resolve_embedder)
    dim: int  # embedding dimension of that embedder
    feature_version: int
    train_size: int
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)  # oob_* always; others from the caller
    created: float = field(default_factory=time.time)  # unix time
    sklearn_version: str = sklearn.__version__
    served_model: str | None = None  # the served LLM it learned lengths of (None: not recorded)


def _per_tree(model: RandomForestRegressor, X: np.ndarray) -> np.ndarray:
    """Predictions of every tree, shape ``(n_trees, n)``."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    return np.stack([t.predict(X, check_input=False) for t in model.estimators_])


class LengthForest:
    """A fitted forest plus its metadata and (optionally) the training set it was fitted on.

    ``predict`` returns the point estimate (mean over trees, i.e. the forest's prediction) and a
    high quantile taken across the per-tree predictions. The latter is a cheap stand-in for a
    quantile regression forest: each tree's leaf value is an estimate from a bootstrap sample, so
    their spread reflects both noise among similar requests and model uncertainty.
    """

    form = "paper"

    def __init__(self, model: RandomForestRegressor, meta: ModelMeta,
                 train: TrainingSet | None = None) -> None:
        self.model = model
        self.meta = meta
        self.train = train
        self.repredictor: Any = None  # not saved with the paper form; carried over by the service

    @property
    def quantile(self) -> float:
        return float(self.meta.params.get("quantile", 0.9))

    @property
    def target(self) -> str:
        return str(self.meta.params.get("target", "tokens"))  # files from before targets: tokens

    @classmethod
    def fit(cls, train: TrainingSet, params: ForestParams, show_progress: bool = False,
            metrics: dict[str, float] | None = None) -> LengthForest:
        """Fit on ``train`` (blocking). Records out-of-bag MAE/RMSE/high-quantile coverage and
        ``train.served_model``."""
        if len(train) == 0:
            raise ValueError("cannot fit on an empty training set")
        model = RandomForestRegressor(
            n_estimators=params.n_estimators, max_depth=params.max_depth,
            min_samples_leaf=params.min_samples_leaf, random_state=params.seed, n_jobs=params.n_jobs,
        )
        y_fit = train.y / _scale(params.target, train.X)
        if show_progress:
            # warm_start grows the same forest in steps; sklearn keeps the seeds identical to one fit
            step = max(1, params.n_estimators // 20)
            model.set_params(warm_start=True)
            with tqdm(total=params.n_estimators, unit="tree", desc="training") as bar:
                while len(getattr(model, "estimators_", [])) < params.n_estimators:
                    model.set_params(n_estimators=min(params.n_estimators, bar.n + step))
                    model.fit(train.X, y_fit)
                    bar.update(len(model.estimators_) - bar.n)
            model.set_params(warm_start=False)
        else:
            model.fit(train.X, y_fit)
        all_metrics = _oob_metrics(model, train, params.quantile, params.target)
        all_metrics.update(metrics or {})
        meta = ModelMeta(embedder=train.embedder, dim=train.dim, feature_version=train.feature_version,
                         train_size=len(train), params=asdict(params), metrics=all_metrics,
                         served_model=train.served_model)
        return cls(model, meta, train)

    def predict(self, X: np.ndarray, quantile: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(point, high)`` float arrays for feature rows ``X``."""
        point, high, _ = self.predict_lengths(X, np.zeros(len(X)), quantile)
        return point, high

    def predict_lengths(self, X: np.ndarray, max_tokens: np.ndarray,
                        quantile: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(point, high, p_runaway)``: ``p_runaway`` is the share of trees predicting at least the
        row's ``max_tokens`` (0 where it is unknown, ``max_tokens <= 0``)."""
        if len(X) == 0:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        trees = _per_tree(self.model, X) * _scale(self.target, X)
        q = self.quantile if quantile is None else quantile
        caps = np.asarray(max_tokens, dtype=np.float64)
        p = np.where(caps > 0, (trees >= np.where(caps > 0, caps, np.inf)).mean(axis=0), 0.0)
        return trees.mean(axis=0), np.quantile(trees, q, axis=0), p

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a joblib file atomically; it holds the forest, metadata and training rows."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FORMAT, "meta": asdict(self.meta), "model": self.model,
                   "train": None if self.train is None else self.train.to_arrays()}
        tmp = path.with_name(path.name + ".tmp")
        joblib.dump(payload, tmp, compress=3)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], want_embedder: str | None = None,
             want_dim: int | None = None) -> LengthForest:
        """Read a model file (trusted input: joblib unpickles). Raises ``ModelMismatchError``
        when it was built for another embedder, embedding dimension or feature version."""
        payload = joblib.load(path)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)} is not a magnus length-predictor model file")
        meta = ModelMeta(**payload["meta"])
        check_compatible("model file", path, meta.embedder, meta.dim, meta.feature_version,
                         want_embedder, want_dim)
        train = None if payload.get("train") is None else TrainingSet.from_arrays(payload["train"])
        return cls(payload["model"], meta, train)


def _oob_metrics(model: RandomForestRegressor, train: TrainingSet, quantile: float,
                 target: str) -> dict[str, float]:
    """Out-of-bag error in tokens: each row predicted only by the trees whose bootstrap sample left it out."""
    if not model.bootstrap or len(train) < 2:
        return {}
    trees = _per_tree(model, train.X) * _scale(target, train.X)
    inbag = np.zeros_like(trees, dtype=bool)
    for i, samples in enumerate(model.estimators_samples_):
        inbag[i, samples] = True
    trees[inbag] = np.nan
    has_oob = (~inbag).any(axis=0)
    if not has_oob.any():
        return {}
    point = np.nanmean(trees[:, has_oob], axis=0)
    high = np.nanquantile(trees[:, has_oob], quantile, axis=0)
    err = point - train.y[has_oob]
    return {"oob_n": float(has_oob.sum()), "oob_mae": float(np.abs(err).mean()),
            "oob_rmse": float(np.sqrt((err ** 2).mean())),
            "oob_high_coverage": float((train.y[has_oob] <= high).mean())}
