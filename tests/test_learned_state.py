"""Learned state is keyed by what it learned from: the served model (and, for the batch-time
estimator, the device and dtype). State learned for another one is not reused.

Real parts only: a real ``BatchTimeEstimator`` writing its JSON file, a real ``LengthPredictor``
with the bundled embedder (as in test_predictor.py), real forests and the real CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from predictor import LengthPredictor, ModelMismatchError, PredictInput, PredictorConfig
from predictor.cli import main as cli_main
from predictor.embedder import Embedder, get_embedder
from predictor.features import N_FEATURES
from predictor.forest import ForestParams, LengthForest
from predictor.mixture import load_length_model
from predictor.trainset import TrainingSet
from scheduler.estimator import BatchRecord, BatchTimeEstimator

MODEL_A = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "dtype": "float32"}
MODEL_B = {"model": "Qwen2.5-0.5B-Instruct", "device": "cpu", "dtype": "float32"}


def prior(size: int, max_prompt: int, max_gen: int) -> float:
    return 0.001 * size * (max_prompt + max_gen)


# -- batch-time estimator -------------------------------------------------------------------
def learned_estimator(path: Path, source: dict[str, str] | None) -> BatchTimeEstimator:
    """An estimator at ``path`` that learned 8 batches (its cold start: a KNN now) and saved them."""
    est = BatchTimeEstimator(prior, min_samples=8, path=path, source=source)
    for i in range(8):
        est.log(BatchRecord(size=1 + i % 4, max_prompt=20 + 10 * i, pred_gen=50, true_gen=40 + 5 * i,
                            seconds=3.0 + i), now=float(i))
    assert est.using_knn and path.exists()
    return est


def test_estimator_reuses_state_for_same_source(tmp_path: Path) -> None:
    path = tmp_path / "estimator.json"
    first = learned_estimator(path, MODEL_A)
    assert json.loads(path.read_text())["source"] == MODEL_A

    again = BatchTimeEstimator(prior, min_samples=8, path=path, source=dict(MODEL_A))
    assert not again.discarded_state and again.source == MODEL_A
    assert again.n_train == 8 and again.using_knn
    assert again.estimate(2, 50, 60) == first.estimate(2, 50, 60) != prior(2, 50, 60)


def test_estimator_ignores_state_for_other_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "estimator.json"
    learned_estimator(path, MODEL_A)
    saved = path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="scheduler.estimator"):
        est = BatchTimeEstimator(prior, min_samples=8, path=path, source=MODEL_B)
    assert est.discarded_state and est.n_train == 0 and not est.using_knn
    assert est.estimate(2, 50, 60) == prior(2, 50, 60)  # fresh: the prior answers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "scheduler.estimator"]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert str(path) in msg and MODEL_A["model"] in msg and MODEL_B["model"] in msg and "fresh" in msg
    assert path.read_bytes() == saved  # kept as it was, not deleted

    # the next save replaces it with state learned for B
    for i in range(8):
        est.log(BatchRecord(size=2, max_prompt=30 + i, pred_gen=10, true_gen=10, seconds=1.0), now=float(i))
    assert est.using_knn
    data = json.loads(path.read_text())
    assert data["source"] == MODEL_B and len(data["y"]) == 8


def test_estimator_file_without_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "estimator.json"
    learned_estimator(path, None)  # as written before sources were recorded
    data = json.loads(path.read_text())
    data.pop("source", None)
    path.write_text(json.dumps(data))
    saved = path.read_bytes()

    with caplog.at_level(logging.WARNING, logger="scheduler.estimator"):
        est = BatchTimeEstimator(prior, min_samples=8, path=path, source=MODEL_A)
    assert est.discarded_state and est.n_train == 0
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == saved

    # no source given: any file is accepted, as before
    assert BatchTimeEstimator(prior, min_samples=8, path=path).n_train == 8
    learned_estimator(path, MODEL_B)
    anyone = BatchTimeEstimator(prior, min_samples=8, path=path)
    assert not anyone.discarded_state and anyone.n_train == 8


# -- length predictor -----------------------------------------------------------------------
APPS = ("Translate the following English text into French.", "List three keywords for the following text.")
WORDS = "the cat dog house river mountain green blue happy computer network model garden coffee rain".split()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder("default", threads=1)


def cfg(**kw: object) -> PredictorConfig:
    base = {"n_estimators": 10, "min_train": 10, "retrain_interval_s": 60.0}
    base.update(kw)
    return PredictorConfig(**base)  # type: ignore[arg-type]


def requests(n: int, seed: int = 0) -> list[tuple[PredictInput, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 20))
        item = PredictInput(APPS[i % 2], " ".join(rng.choice(WORDS, size=k)), k, 256)
        out.append((item, 2 * k if i % 2 == 0 else 6))
    return out


def random_rows(embedder: Embedder, served_model: str | None, n: int = 30) -> TrainingSet:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(n, N_FEATURES))
    X[:, -1] = rng.integers(1, 40, size=n)
    return TrainingSet(embedder.name, embedder.dim, X, rng.integers(1, 80, size=n), ["app"] * n,
                       served_model=served_model)


def test_predictor_state_reused_for_same_served_model_only(embedder: Embedder, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    model_path, train_path = tmp_path / "predictor.joblib", tmp_path / "predictor_trainset.npz"
    state = {"model_path": str(model_path), "train_set_path": str(train_path)}
    pred = LengthPredictor(cfg(served_model="A", **state), embedder=embedder)
    for item, true in requests(12):
        pred.observe(item, true, pred.predict([item])[0])
    assert pred.retrain_if_due(0.0) is True
    pred.stop()
    assert load_length_model(model_path).meta.served_model == "A"
    assert TrainingSet.load(train_path).served_model == "A"
    saved = {p: p.read_bytes() for p in (model_path, train_path)}

    same = LengthPredictor(cfg(served_model="A", **state), embedder=embedder)
    assert same.discarded_state == [] and same.trained and same.stats()["train_size"] == 12

    with caplog.at_level(logging.WARNING, logger="predictor.predictor"):
        other = LengthPredictor(cfg(served_model="B", **state), embedder=embedder)
    assert sorted(other.discarded_state) == sorted([str(model_path), str(train_path)])
    assert not other.trained and other.stats()["train_size"] == 0
    item = requests(1)[0][0]
    assert other.predict([item])[0].source == "max_tokens"  # no medians carried over either
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "predictor.predictor"]
    assert len(warnings) == 2
    for path in (model_path, train_path):
        msg = next(m for m in warnings if str(path) in m)
        assert "'A'" in msg and "'B'" in msg and "fresh" in msg
    assert {p: p.read_bytes() for p in saved} == saved  # not deleted, not rewritten

    # what B learns records B and replaces A's files
    for it, true in requests(12, seed=5):
        other.observe(it, true, other.predict([it])[0])
    assert other.retrain_if_due(0.0) is True
    assert load_length_model(model_path).meta.served_model == "B"
    assert TrainingSet.load(train_path).served_model == "B"


def test_predictor_files_without_served_model(embedder: Embedder, tmp_path: Path) -> None:
    # state-dir files written before the served model was recorded
    model_path, train_path = tmp_path / "predictor.joblib", tmp_path / "predictor_trainset.npz"
    rows = random_rows(embedder, None)
    LengthForest.fit(rows, ForestParams(n_estimators=5)).save(model_path)
    rows.save(train_path)
    state = {"model_path": str(model_path), "train_set_path": str(train_path)}

    fresh = LengthPredictor(cfg(served_model="A", **state), embedder=embedder)
    assert sorted(fresh.discarded_state) == sorted([str(model_path), str(train_path)])
    assert not fresh.trained and fresh.stats()["train_size"] == 0

    # no served model configured: used as before
    legacy = LengthPredictor(cfg(**state), embedder=embedder)
    assert legacy.discarded_state == [] and legacy.trained and legacy.stats()["train_size"] == 30


def test_explicit_model_for_other_served_model_refused(embedder: Embedder, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"instruction": it.app_text, "input": it.user_text,
                                          "input_tokens": it.input_tokens, "output_tokens": true})
                              for it, true in requests(20)))
    model = tmp_path / "offline.joblib"
    assert cli_main(["predictor", "train", "--from-jsonl", str(rows), "--out", str(model), "--n-estimators", "5",
                     "--threads", "1", "--served-model", "A"]) == 0
    assert load_length_model(model).meta.served_model == "A"
    saved = model.read_bytes()

    with pytest.raises(ModelMismatchError, match=r"(?s)offline\.joblib.*'A'.*'B'"):
        LengthPredictor(cfg(model_path=str(model), model_is_explicit=True, served_model="B"), embedder=embedder)
    assert model.read_bytes() == saved
    ok = LengthPredictor(cfg(model_path=str(model), model_is_explicit=True, served_model="A"), embedder=embedder)
    assert ok.trained and ok.discarded_state == []

    # the same file found in the state dir (not explicit) is skipped instead of refused
    state = LengthPredictor(cfg(model_path=str(model), served_model="B"), embedder=embedder)
    assert not state.trained and state.discarded_state == [str(model)]

    # an explicit offline model that records no served model is accepted, with an INFO line
    plain = tmp_path / "plain.joblib"
    assert cli_main(["predictor", "train", "--from-jsonl", str(rows), "--out", str(plain), "--n-estimators", "5",
                     "--threads", "1"]) == 0
    assert load_length_model(plain).meta.served_model is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="predictor.predictor"):
        taken = LengthPredictor(cfg(model_path=str(plain), model_is_explicit=True, served_model="B"),
                                embedder=embedder)
    assert taken.trained and taken.discarded_state == [] and taken.stats()["train_size"] == 20
    assert any(r.levelno == logging.INFO and str(plain) in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "predictor.predictor")


def test_embedder_mismatch_still_raises_with_served_model(embedder: Embedder, tmp_path: Path) -> None:
    path = tmp_path / "predictor.joblib"
    other = random_rows(embedder, "A")
    other.embedder = "someone/other-embedder"
    LengthForest.fit(other, ForestParams(n_estimators=5)).save(path)
    with pytest.raises(ModelMismatchError, match="someone/other-embedder"):
        LengthPredictor(cfg(model_path=str(path), served_model="A"), embedder=embedder)
