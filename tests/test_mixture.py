"""The runaway mixture (censoring, calibration), head features, the re-predictor and its hook in the core."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from predictor.features import D_USER, INPUT_TOKENS_COL, N_FEATURES
from predictor.head import HEAD_FEATURES, head_features
from predictor.mixture import MixtureParams, RunawayMixture, load_length_model
from predictor.repredict import HeadRow, Repredictor
from predictor.trainset import ModelMismatchError, TrainingSet
from predictor.types import CHECKPOINTS, Prediction
from scheduler.contract import RowProgress, WorkBatch
from scheduler.core import SchedulerCore
from scheduler.memory import MemoryModel
from scheduler.pcb import PredictiveContinuousPolicy, remaining_tokens
from scheduler.request import Request

APP_COL = D_USER  # the first application-embedding value (the user text's are not read by default)


def synthetic(n: int, rng: np.random.Generator, cap: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two applications (feature APP_COL = 0 or 1): app 1 runs away with probability 0.7, app 0 with 0.1;
    ended lengths log-normal around 5 x input length (sigma 0.3)."""
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    app = rng.integers(0, 2, n)
    X[:, APP_COL] = app
    X[:, INPUT_TOKENS_COL] = rng.integers(5, 40, n)
    ended = np.exp(np.log(5 * X[:, INPUT_TOKENS_COL]) + rng.normal(0, 0.3, n))
    run = rng.random(n) < np.where(app == 1, 0.7, 0.1)
    y = np.where(run, cap, np.minimum(np.floor(ended), cap - 1))
    return X, y, np.full(n, cap)


def fitted(n: int = 600, seed: int = 0) -> RunawayMixture:
    X, y, caps = synthetic(n, np.random.default_rng(seed))
    return RunawayMixture.fit(TrainingSet("e", 8, X, y, ["a"] * n, max_tokens=caps),
                              MixtureParams(n_estimators=60, quantile=0.9))


def test_censored_rows_are_lower_bounds_not_lengths() -> None:
    model = fitted()
    X, y, _ = synthetic(400, np.random.default_rng(1))
    X[:, APP_COL] = 1  # the runaway-prone application
    # asked again with a larger max_tokens: a length that hit 300 was only a lower bound, so the
    # mixture predicts the new cap, not 300 (a regressor on the censored lengths would say ~300)
    point, high, p = model.predict_lengths(X, np.full(400, 1000.0))
    assert p.mean() > 0.5
    assert np.median(point) == 1000 and (high >= point).all()
    # the ended-length regressor never saw a censored row: its centre stays near 5 x input
    mu = np.exp(model.regressor.predict(np.hstack([X, np.full((400, 1), 1000.0),
                                                   np.log1p(X[:, [INPUT_TOKENS_COL]])]).astype(np.float32)))
    assert 0.7 < np.median(mu / (5 * X[:, INPUT_TOKENS_COL])) < 1.3
    # and on app 0 (rarely runs away) the point is the ended length, far below the cap
    X[:, APP_COL] = 0
    point0, _, p0 = model.predict_lengths(X, np.full(400, 300.0))
    assert p0.mean() < 0.3 and np.median(point0) < 250


def test_high_estimate_is_calibrated_on_fresh_rows() -> None:
    model = fitted()
    X, y, caps = synthetic(3000, np.random.default_rng(7))
    point, high, _ = model.predict_lengths(X, caps)
    coverage = float((y <= high).mean())
    assert 0.86 <= coverage <= 0.95, coverage
    # the point is the mixture's median (the cap is an atom: P(y < point) <= 1/2 <= P(y <= point))
    assert float((y < point).mean()) <= 0.62 and float((y <= point).mean()) >= 0.38
    assert 0.86 <= model.meta.metrics["oob_high_coverage"] <= 0.95


def test_mismatched_mixture_file_is_refused(tmp_path) -> None:
    path = tmp_path / "m.joblib"
    fitted(200).save(path)
    assert isinstance(load_length_model(path, "e", 8), RunawayMixture)
    with pytest.raises(ModelMismatchError):
        load_length_model(path, "another-embedder", 8)
    with pytest.raises(ModelMismatchError):
        load_length_model(path, "e", 16)


def test_head_features_tell_loops_from_prose() -> None:
    loop = head_features([5, 6, 7, 8] * 16)
    rng = np.random.default_rng(0)
    prose = head_features(rng.integers(0, 5000, 64).tolist())
    f = dict(zip(HEAD_FEATURES, loop, strict=True))
    g = dict(zip(HEAD_FEATURES, prose, strict=True))
    assert f["k"] == g["k"] == 64
    assert f["periodicity"] == 1.0 and g["periodicity"] < 0.1
    assert f["longest_repeat"] == 60 and g["longest_repeat"] <= 2
    assert f["distinct_share"] < 0.1 < g["distinct_share"]
    with pytest.raises(ValueError):
        head_features([])


def _heads(n: int, rng: np.random.Generator) -> tuple[list[HeadRow], list[int]]:
    """Runaways loop over a short phrase after a few tokens; the others write varied tokens."""
    rows, lengths = [], []
    for _ in range(n):
        run = rng.random() < 0.4
        start = rng.integers(0, 5000, int(rng.integers(4, 20))).tolist()
        if run:
            phrase = rng.integers(0, 5000, int(rng.integers(2, 6))).tolist()
            head = (start + phrase * 64)[:64]
            length = 256
        else:
            length = int(rng.integers(20, 200))
            head = rng.integers(0, 5000, min(64, length)).tolist()
        rows.append(HeadRow(0.4, 150.0, 30, 256, head))
        lengths.append(length)
    return rows, lengths


def test_repredictor_detects_loops_from_the_first_tokens() -> None:
    rows, lengths = _heads(300, np.random.default_rng(0))
    rp = Repredictor().fit(rows, lengths)
    test, true = _heads(200, np.random.default_rng(1))
    k = 32
    live = [i for i, y in enumerate(true) if y > k]
    cut = [HeadRow(r.arrival_p, r.arrival_point, r.input_tokens, r.max_tokens, r.head_ids[:k]) for r in test]
    point, high, p = rp.predict([cut[i] for i in live])
    ran = np.array([true[i] >= 256 for i in live])
    assert roc_auc_score(ran, p) > 0.9
    assert (point >= k).all() and (high >= point).all() and (high <= 256).all()


def _stated(n: int, rng: np.random.Generator, dim: int = 16) -> tuple[list[HeadRow], list[int], np.ndarray]:
    """Heads of varied tokens for every row (nothing to see in them); the head states' first
    coordinate tells runaways (+3, about 0.98 AUC at best) from the rest."""
    rows, lengths = [], []
    states = rng.normal(size=(n, len(CHECKPOINTS), dim)).astype(np.float32)
    for i in range(n):
        run = rng.random() < 0.4
        length = 256 if run else int(rng.integers(20, 200))
        states[i, :, 0] += 3.0 if run else 0.0
        rows.append(HeadRow(0.4, 150.0, 30, 256, rng.integers(0, 5000, min(64, length)).tolist()))
        lengths.append(length)
    return rows, lengths, states


def test_repredictor_learns_runaways_from_head_states_and_falls_back_without_them(tmp_path) -> None:
    rows, lengths, states = _stated(300, np.random.default_rng(0))
    blind = Repredictor().fit(rows, lengths)
    assert blind.state_model is None
    rp = Repredictor().fit(rows, lengths, list(states))
    assert rp.state_model is not None
    test, true, tstates = _stated(200, np.random.default_rng(1))
    k = 32
    live = [i for i, y in enumerate(true) if y > k]
    ran = np.array([true[i] >= 256 for i in live])
    c = CHECKPOINTS.index(k)
    with_state = [HeadRow(test[i].arrival_p, test[i].arrival_point, 30, 256, test[i].head_ids[:k], tstates[i, c])
                  for i in live]
    without = [HeadRow(r.arrival_p, r.arrival_point, 30, 256, r.head_ids) for r in with_state]
    p_state = rp.predict(with_state)[2]
    assert roc_auc_score(ran, p_state) > 0.9
    p_blind = rp.predict(without)[2]  # no state reported: the boosted classifier, as without states
    np.testing.assert_allclose(p_blind, blind.predict(without)[2])
    assert roc_auc_score(ran, p_blind) < 0.75
    # a training set keeps head states through a save, and rows added without them are unknown (NaN)
    n = len(rows)
    ts = TrainingSet("e", 8, np.zeros((n, N_FEATURES)), lengths, ["a"] * n, max_tokens=np.full(n, 256),
                     Z=np.zeros((n, 16)), probe="probe:m@1", H=states)
    ts.save(tmp_path / "t.npz")
    ts = TrainingSet.load(tmp_path / "t.npz")
    more = ts.extended(np.zeros((2, N_FEATURES)), np.array([5, 6]), ["a", "a"], np.full(2, 256),
                       Z=np.zeros((2, 16)))
    assert np.isnan(more.H[n:]).all() and np.allclose(more.H[:n], states, atol=1e-2)
    with pytest.raises(ValueError, match="head states"):
        TrainingSet("e", 8, np.zeros((n, N_FEATURES)), lengths, ["a"] * n, H=states)  # made by what?
    # an unprobed set with a worker layer's states (the mixture form), and one that gains them
    ts = TrainingSet("e", 8, np.zeros((n, N_FEATURES)), lengths, ["a"] * n, H=states, states="probe:m@3")
    ts.save(tmp_path / "u.npz")
    assert TrainingSet.load(tmp_path / "u.npz").states == "probe:m@3"
    bare = TrainingSet("e", 8, np.zeros((2, N_FEATURES)), [5, 6], ["a"] * 2)
    grown = bare.extended(np.zeros((n, N_FEATURES)), np.array(lengths), ["a"] * n, H=states, states="probe:m@3")
    assert grown.states == "probe:m@3" and np.isnan(grown.H[:2]).all()
    assert np.allclose(grown.H[2:], states, atol=1e-2)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, reqs: list[Request]) -> None:
        self.calls.append([r.id for r in reqs])
        for r in reqs:
            r.reprediction = Prediction(r.generated + 5, r.generated + 10, "repredicted", 0.0)


def test_core_repredicts_at_checkpoints_and_pcb_uses_it() -> None:
    policy = PredictiveContinuousPolicy(MemoryModel(delta=1.0, theta=1e9), max_batch_size=4)
    core = SchedulerCore(policy, [True])
    hook = _Recorder()
    core.repredict = hook
    req = Request("a", prompt_tokens=10, max_tokens=256, arrival=0.0, prompt_ids=[1] * 10,
                  prediction=Prediction(200, 256, "mixture", 0.9))
    core.add(req, 0.0)
    dispatched = core.schedule(0.0)
    assert dispatched and isinstance(dispatched[0].work(), WorkBatch)
    assert remaining_tokens(req) == 200
    core.update_progress(0, [RowProgress("a", 8, False, list(range(8)))], 1.0)
    core.update_progress(0, [RowProgress("a", 15, False, list(range(15)))], 1.1)  # no new checkpoint
    assert req.head_state is None
    core.update_progress(0, [RowProgress("a", 16, False, list(range(16)), [0.5, -1.0])], 1.2)
    assert req.head_state == [0.5, -1.0]  # the worker's head state goes to the re-prediction with the head
    assert req.head_states == {16: [0.5, -1.0]}  # and is kept by checkpoint (the predictor learns from it)
    assert remaining_tokens(req) == 5  # the re-prediction (21 total, 16 generated), not the arrival 200
    core.update_progress(0, [RowProgress("a", 80, False, [])], 1.3)  # past the head: nothing new
    assert hook.calls == [["a"], ["a"]]
    assert req.head_ids == list(range(16))
    assert remaining_tokens(req) == 256 - 80  # outgrew the re-predicted high: a likely runaway


def test_a_file_from_before_the_user_embedding_setting_reads_it() -> None:
    """Mixture files written before ``user_embedding`` existed were fitted on the user text's
    embedding, so they still read it; new ones record the setting (off by default)."""
    model = fitted(100)
    assert model.meta.params["user_embedding"] is False and not model.reads_user_embedding
    X, _, caps = synthetic(50, np.random.default_rng(3))
    noisy = X.copy()
    noisy[:, :D_USER] = 1e6  # the user values do not reach the forests
    np.testing.assert_array_equal(model.predict_lengths(X, caps)[0], model.predict_lengths(noisy, caps)[0])
    del model.meta.params["user_embedding"]
    assert model.reads_user_embedding
