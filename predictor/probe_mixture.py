"""The runaway mixture on the served model's own view of the prompt (form ``probe``).

The same mixture as ``predictor.mixture`` (runaway probability ``p``, a log-normal-like
distribution of the lengths that ended, point = its median, high = its calibrated quantile), with
other features and models: the probe's hidden state of the prompt (``predictor.probe``), the log of
the input length and ``max_tokens``, standardised; an L2 logistic regression for the runaway
probability and a ridge regression on the log length of the answers that ended, each
regularisation strength chosen by cross-validation on the training rows. Hundreds of dimensions
on hundreds of rows: linear models with a tuned penalty, not trees. The out-of-sample predictions
that calibrate the high level (and train the re-predictor) are 5-fold cross-validated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from predictor.mixture import MixtureParams, RunawayMixture, ended_rows
from predictor.probe import PromptProbe
from predictor.trainset import TrainingSet

_CS = np.logspace(-4, 0, 9)  # inverse penalties tried for the runaway classifier
_ALPHAS = np.logspace(0, 5, 11)  # penalties tried for the length regressor


def probe_rows(Z: np.ndarray, input_tokens: np.ndarray) -> np.ndarray:
    """What a probe model's ``predict_lengths`` takes as ``X``: probe features and input length."""
    return np.hstack([np.asarray(Z, dtype=np.float32),
                      np.asarray(input_tokens, dtype=np.float32).reshape(-1, 1)])


def probe_inputs(probe: PromptProbe, app_texts: Sequence[str], user_texts: Sequence[str],
                 input_tokens: Sequence[int]) -> np.ndarray:
    """Probe the requests' prompts: the rows a probe model's ``predict_lengths`` reads."""
    return probe_rows(probe.encode(app_texts, user_texts), np.asarray(input_tokens))


class ProbeMixture(RunawayMixture):
    """A fitted probe mixture (see the module docstring); ``meta.probe`` names its probe."""

    form = "probe"
    FORMAT = "magnus-length-probe"

    def _masked(self, F: np.ndarray) -> np.ndarray:
        return F  # its features are the probe's, no sentence embedding

    @staticmethod
    def design(X: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        caps = np.asarray(max_tokens, dtype=np.float64).reshape(-1, 1)
        return np.hstack([X[:, :-1], np.log1p(np.maximum(X[:, -1:], 0.0)), caps])

    @staticmethod
    def design_of(train: TrainingSet) -> np.ndarray:
        if train.Z is None:
            raise ValueError("the training set has no probe features (build it with a probe)")
        assert train.max_tokens is not None
        return ProbeMixture.design(probe_rows(train.Z, train.input_tokens), train.max_tokens)

    @classmethod
    def fit(cls, train: TrainingSet, params: MixtureParams) -> ProbeMixture:
        """Fit on ``train`` (blocking; needs ``train.Z``); censored rows only teach the classifier."""
        if len(train) < 2:
            raise ValueError("need at least 2 rows to fit")
        F = cls.design_of(train)
        run = train.censored
        y = train.y.astype(np.float64)
        minority = int(min(run.sum(), (~run).sum()))
        clf: Pipeline | float
        if minority >= 2:
            folds = StratifiedKFold(min(5, minority), shuffle=True, random_state=params.seed)
            inner = min(5, minority) if minority >= 10 else 2
            search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                                  {"logisticregression__C": _CS}, scoring="neg_log_loss", cv=inner).fit(F, run)
            clf = search.best_estimator_
            p_oob = cross_val_predict(clone(clf), F, run, cv=folds, method="predict_proba")[:, 1]
        else:
            clf = float(run.mean())
            p_oob = np.full(len(run), clf)
        ended = ended_rows(run)
        target = np.log(np.maximum(y[ended], 1.0))
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=_ALPHAS)).fit(F[ended], target)
        mu = reg.predict(F)  # runaway rows were not fitted on: out of sample already
        n_folds = min(5, int(ended.sum()))
        if n_folds >= 2:
            mu[ended] = cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(alphas=[reg[-1].alpha_])),
                                          F[ended], target, cv=n_folds)
        return cls.assemble(train, params, clf, reg, p_oob, mu, ended, probe=train.probe)
