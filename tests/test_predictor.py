"""Length predictor: features, forest round trip, continual learning, cold start, data, CLI.

Uses the real bundled embedder (all-MiniLM-L6-v2 on CPU) and real scikit-learn forests on small
synthetic workloads whose output length depends on the application and the input length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from predictor import (
    LengthPredictor,
    ModelMismatchError,
    PredictInput,
    Prediction,
    PredictorConfig,
    select_for_training,
)
from predictor.cli import main as cli_main
from predictor.data import load_jsonl, load_request_log
from predictor.embedder import DEFAULT_EMBEDDER, Embedder, get_embedder
from predictor.features import (
    FEATURE_VERSION,
    INPUT_TOKENS_COL,
    N_FEATURES,
    FeatureExtractor,
    build_features,
    compress,
)
from predictor.forest import ForestParams, LengthForest
from predictor.mixture import load_length_model
from predictor.repredict import HeadRow
from predictor.trainset import TrainingSet

APPS = {
    "translate": ("Translate the following English text into French.", 1.3, 2.0),
    "grammar": ("Correct the grammar of the following sentence.", 1.0, 1.0),
    "keywords": ("List three keywords for the following text.", 0.0, 6.0),
}
WORDS = ("the cat dog house river mountain quickly slowly green blue happy sad computer network "
         "model language data train city music book window garden coffee rain sun table chair "
         "morning evening friend teacher student write read build").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Synthetic requests: output length = a * input + b (+ noise) per application."""
    rng = np.random.default_rng(seed)
    names = list(APPS)
    rows = []
    for i in range(n):
        app = names[i % len(names)]
        instruction, a, b = APPS[app]
        k = int(rng.integers(3, 40))
        text = " ".join(rng.choice(WORDS, size=k))
        out = max(1, int(round(a * k + b + rng.normal(0, 1))))
        rows.append({"app": app, "instruction": instruction, "input": text, "input_tokens": k,
                     "output_tokens": out, "max_tokens": 256})
    return rows


def to_input(r: dict) -> PredictInput:
    return PredictInput(app_text=r["instruction"], user_text=r["input"], input_tokens=r["input_tokens"],
                        max_tokens=r["max_tokens"])


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder("default", threads=1)  # 1 thread: polite and fast on a shared CPU


def cfg(**kw: object) -> PredictorConfig:
    base = {"n_estimators": 30, "min_train": 20, "retrain_interval_s": 60.0}
    base.update(kw)
    return PredictorConfig(**base)  # type: ignore[arg-type]


# -- features --------------------------------------------------------------------------------
def test_compress_hand_computed() -> None:
    v = np.arange(10.0)  # 10 dims into 4 groups -> sizes 3, 3, 2, 2 (np.array_split)
    expected = [(0 + 1 + 2) / math.sqrt(3), (3 + 4 + 5) / math.sqrt(3), (6 + 7) / math.sqrt(2),
                (8 + 9) / math.sqrt(2)]
    assert np.allclose(compress(v, 4), expected)
    assert np.allclose(compress(np.arange(8.0), 4), np.array([1, 5, 9, 13]) / math.sqrt(2))
    batch = np.stack([np.arange(10.0), -np.arange(10.0)])
    assert np.allclose(compress(batch, 4), [expected, [-e for e in expected]])
    with pytest.raises(ValueError):
        compress(np.arange(3.0), 4)


def test_feature_layout() -> None:
    v_user = np.ones((2, 32))  # 16 groups of 2 -> 2 / sqrt(2)
    v_app = np.ones((2, 32))  # 4 groups of 8 -> 8 / sqrt(8)
    X = build_features(v_user, v_app, [7, 11])
    assert X.shape == (2, N_FEATURES) and X.dtype == np.float32
    assert np.allclose(X[:, :16], math.sqrt(2))
    assert np.allclose(X[:, 16:20], math.sqrt(8))
    assert list(X[:, INPUT_TOKENS_COL]) == [7, 11]


def test_feature_extractor_real_embedder(embedder: Embedder) -> None:
    fx = FeatureExtractor(embedder)
    X = fx.transform(["", "Translate this.", ""], ["hello there", "good morning", "another text"], [2, 2, 2])
    assert X.shape == (3, N_FEATURES)
    assert np.array_equal(X[0, 16:20], X[2, 16:20])  # empty instruction embeds consistently
    assert not np.array_equal(X[0, 16:20], X[1, 16:20])
    assert not np.array_equal(X[0, :16], X[2, :16])
    direct = build_features(embedder.encode(["hello there"]), embedder.encode([""]), [2])
    assert np.allclose(X[0], direct, atol=1e-5)
    hits = embedder.cache_hits
    fx.transform(["Translate this."], ["x"], [1])
    assert embedder.cache_hits == hits + 1


# -- forest and model files ------------------------------------------------------------------
def train_set(embedder: Embedder, rows: list[dict]) -> TrainingSet:
    X = FeatureExtractor(embedder).transform([r["instruction"] for r in rows], [r["input"] for r in rows],
                                             [r["input_tokens"] for r in rows])
    return TrainingSet(embedder.name, embedder.dim, X, [r["output_tokens"] for r in rows],
                       [r["instruction"] for r in rows])


def test_train_save_load_predict_round_trip(embedder: Embedder, tmp_path: Path) -> None:
    rows = make_rows(90)
    forest = LengthForest.fit(train_set(embedder, rows), ForestParams(n_estimators=40, seed=1))
    assert forest.meta.embedder == DEFAULT_EMBEDDER and forest.meta.train_size == 90
    assert forest.meta.feature_version == FEATURE_VERSION and forest.meta.metrics["oob_mae"] >= 0
    path = tmp_path / "model.joblib"
    forest.save(path)

    pred = LengthPredictor(cfg(model_path=str(path)), embedder=embedder)
    assert pred.stats()["trained"] == 1 and pred.stats()["train_size"] == 90
    test = make_rows(12, seed=7)
    out = pred.predict([to_input(r) for r in test])
    point, high = forest.predict(train_set(embedder, test).X, 0.9)
    assert [p.source for p in out] == ["forest"] * 12
    assert [p.tokens for p in out] == [max(1, int(math.floor(v + 0.5))) for v in point]
    assert [p.high for p in out] == [max(p.tokens, math.ceil(h)) for p, h in zip(out, high, strict=True)]
    # it learned the structure: a long translation is predicted longer than a keyword list
    long_tr = PredictInput(APPS["translate"][0], " ".join(WORDS[:35]), 35, 256)
    kw = PredictInput(APPS["keywords"][0], " ".join(WORDS[:35]), 35, 256)
    a, b = pred.predict([long_tr, kw])
    assert a.tokens > 25 and b.tokens < 15


def test_mismatched_model_file_refused(embedder: Embedder, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, N_FEATURES)), rng.integers(1, 50, size=30)
    other = TrainingSet("someone/other-embedder", embedder.dim, X, y, ["app"] * 30)
    path = tmp_path / "other.joblib"
    LengthForest.fit(other, ForestParams(n_estimators=5)).save(path)
    with pytest.raises(ModelMismatchError, match="someone/other-embedder"):
        LengthPredictor(cfg(model_path=str(path)), embedder=embedder)

    mine = TrainingSet(embedder.name, embedder.dim, X, y, ["app"] * 30)
    forest = LengthForest.fit(mine, ForestParams(n_estimators=5))
    forest.meta.feature_version = FEATURE_VERSION + 1
    forest.save(path)
    with pytest.raises(ModelMismatchError, match="feature version"):
        LengthPredictor(cfg(model_path=str(path)), embedder=embedder)

    ts_path = tmp_path / "train.npz"
    other.save(ts_path)
    with pytest.raises(ModelMismatchError, match="training set"):
        LengthPredictor(cfg(train_set_path=str(ts_path)), embedder=embedder)


# -- continual learning ----------------------------------------------------------------------
def test_selection_rule() -> None:
    def forest(t: int) -> Prediction:
        return Prediction(tokens=t, high=t, source="forest")

    # cold start: everything joins, whatever the prediction
    assert select_for_training(forest(100), 100, 256, trained=False)
    assert select_for_training(None, 5, 256, trained=False)
    # trained: error must exceed 10 tokens AND 10% of the truth
    assert not select_for_training(forest(100), 100, 256, trained=True)
    assert not select_for_training(forest(110), 100, 256, trained=True)  # 10 tokens: not > 10
    assert select_for_training(forest(112), 100, 256, trained=True)  # 12 > 10 and 12 > 10
    assert not select_for_training(forest(185), 200, 256, trained=True)  # 15 > 10 but 15 < 20
    assert select_for_training(forest(179), 200, 256, trained=True)  # 21 > 10 and 21 > 20
    assert not select_for_training(forest(1), 9, 256, trained=True)  # 8 tokens only
    # the prediction is capped by max_tokens as the scheduler caps it
    assert not select_for_training(forest(900), 256, 256, trained=True)
    # no forest prediction to judge: joins
    assert select_for_training(None, 100, 256, trained=True)
    assert select_for_training(Prediction(256, 256, "max_tokens"), 100, 256, trained=True)
    assert select_for_training(Prediction(50, 50, "app_median"), 100, 256, trained=True)
    # a caller that did not keep the source: judged like a forest prediction
    assert not select_for_training(Prediction(100, 100, ""), 100, 256, trained=True)
    assert select_for_training(Prediction(50, 50, ""), 100, 256, trained=True)
    # thresholds are parameters
    assert select_for_training(forest(105), 100, 256, trained=True, err_abs=2, err_rel=0.01)


def test_cold_start_fallback(embedder: Embedder) -> None:
    pred = LengthPredictor(cfg(), embedder=embedder)
    a = PredictInput("Summarise.", "some text", 2, max_tokens=64)
    b = PredictInput("Translate.", "other text", 2, max_tokens=128)
    assert pred.predict([a, b]) == [Prediction(64, 64, "max_tokens"), Prediction(128, 128, "max_tokens")]
    for true in (10, 30, 20):
        pred.observe(a, true, pred.predict([a])[0])
    pa, pb = pred.predict([a, b])
    assert (pa.tokens, pa.source) == (20, "app_median") and pa.high >= 20
    assert pa.high == math.ceil(np.quantile([10, 30, 20], 0.9))
    assert pb == Prediction(128, 128, "max_tokens")
    s = pred.stats()
    assert s["trained"] == 0 and s["observed"] == 3 and s["selected"] == 3 and s["fallback_predictions"] == 7
    # below min_train a due check keeps the rows but trains nothing
    assert pred.retrain_if_due(0.0) is False
    assert pred.stats()["train_size"] == 3 and pred.stats()["trained"] == 0


def test_retrain_persist_and_restart(embedder: Embedder, tmp_path: Path) -> None:
    c = cfg(model_path=str(tmp_path / "m.joblib"), train_set_path=str(tmp_path / "t.npz"),
            retrain_interval_s=100)
    pred = LengthPredictor(c, embedder=embedder)
    rows = make_rows(25)
    for r in rows:
        item = to_input(r)
        pred.observe(item, r["output_tokens"], pred.predict([item])[0])
    assert pred.retrain_if_due(1000.0) is True
    assert pred.trained and Path(c.model_path).exists() and Path(c.train_set_path).exists()
    assert pred.retrain_if_due(1050.0) is False  # interval not elapsed
    # with a forest, only badly predicted requests join
    good, bad = make_rows(2, seed=3)
    pred.observe(to_input(good), 50, Prediction(50, 60, "forest"))
    pred.observe(to_input(bad), 200, Prediction(20, 30, "forest"))
    assert pred.stats()["pending"] == 1
    probe = [to_input(r) for r in make_rows(5, seed=9)]
    before = pred.predict(probe)
    pred.stop()  # persists the queued row too

    again = LengthPredictor(c, embedder=embedder)
    assert again.trained and again.stats()["train_size"] == 26
    assert again.predict(probe) == before


def test_background_retrain_swaps_without_blocking_predict(embedder: Embedder) -> None:
    pred = LengthPredictor(cfg(n_estimators=300, retrain_interval_s=0.05), embedder=embedder)
    rows = make_rows(150, seed=5)
    for r in rows[:25]:
        pred.observe(to_input(r), r["output_tokens"], None)
    pred.start_background()
    try:
        deadline = time.monotonic() + 60
        while not pred.trained and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pred.trained
        first = pred._model
        # wrong forest predictions: all of these join and trigger a second, bigger retrain
        for r in rows[25:]:
            pred.observe(to_input(r), r["output_tokens"] + 40, Prediction(1, 1, "forest"))
        probe = to_input(rows[0])
        during_fit: list[float] = []
        while pred.stats()["retrains"] < 2 and time.monotonic() < deadline:
            phase_before = pred.stats()["retraining"]
            t0 = time.perf_counter()
            p = pred.predict([probe])[0]
            took = time.perf_counter() - t0
            assert p.source == "mixture"  # the default form
            if phase_before == 2 and pred.stats()["retraining"] == 2:
                during_fit.append(took)  # started and finished while the new forest was fitting
            time.sleep(0.01)  # arrivals, not a busy loop: one holding the GIL starves the retrain's embedding
        assert pred.stats()["retrains"] == 2 and pred._model is not first
        assert pred.stats()["train_size"] == 150
        assert during_fit, "no prediction completed while the forest was being fitted"
        assert max(during_fit) < pred.stats()["last_retrain_s"]  # none waited for the whole fit
    finally:
        pred.stop()
    assert not any(t.name == "length-predictor-retrain" for t in threading.enumerate())


# -- data and CLI ----------------------------------------------------------------------------
def test_load_jsonl_and_request_log(tmp_path: Path) -> None:
    rows = make_rows(4)
    rows[1].pop("app")
    rows[1].pop("max_tokens")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_jsonl(path)
    assert [r.output_tokens for r in loaded] == [r["output_tokens"] for r in rows]
    assert loaded[0].app == "translate" and loaded[1].max_tokens is None
    assert loaded[1].group.startswith("Correct")

    db = tmp_path / "log.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, app_text TEXT, user_text TEXT, "
                 "input_tokens INT, prompt_tokens INT, max_tokens INT, completion_tokens INT, "
                 "finish_reason TEXT, status TEXT)")
    conn.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?)", [
        ("a", "Fix.", "teh cat", 3, 12, 64, 4, "stop", "ok"),
        ("b", None, "hello", 1, 9, 8, 8, "length", "ok"),
        ("c", "Fix.", "x", 1, 9, 64, None, None, "error"),
        ("d", "Fix.", "y", 1, 9, 64, 2, "stop", "cancelled"),
    ])
    conn.commit()
    conn.close()
    log_rows = load_request_log(db)
    assert [(r.app_text, r.user_text, r.input_tokens, r.output_tokens, r.max_tokens) for r in log_rows] == [
        ("Fix.", "teh cat", 3, 4, 64), ("", "hello", 1, 8, 8)]
    assert [r.user_text for r in load_request_log(db, drop_truncated=True)] == ["teh cat"]


def test_cli_train_eval_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in make_rows(60, seed=11)))
    test.write_text("\n".join(json.dumps(r) for r in make_rows(21, seed=12)))
    model = tmp_path / "m.joblib"
    assert cli_main(["predictor", "train", "--from-jsonl", str(train), "--out", str(model),
                     "--n-estimators", "25", "--holdout", "0.2", "--threads", "1"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    predicted = tmp_path / "predicted.jsonl"
    assert cli_main(["predictor", "eval", str(test), "--model", str(model), "--json", str(out_json),
                     "--threads", "1", "--predictions", str(predicted)]) == 0
    rows = [json.loads(line) for line in predicted.read_text().splitlines()]
    source = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    assert len(rows) == len(source) and all(r["predicted_high"] >= r["predicted_tokens"] >= 1 for r in rows)
    assert [r["output_tokens"] for r in rows] == [r["output_tokens"] for r in source]  # the rows, kept whole
    printed = capsys.readouterr().out
    assert printed.startswith("**Best cheap baseline: ")
    assert "| application | method |" in printed and "| overall | predictor |" in printed
    res = json.loads(out_json.read_text())
    assert set(res["results"]) == {"translate", "grammar", "keywords", "overall"}
    overall = res["results"]["overall"]
    assert set(overall) == {"predictor", "max_tokens", "global median", "app mean", "app median",
                            "linear(input)", "app linear(input)"}
    best = res["best_baseline"]["overall"]
    assert best["name"] in overall and best["mae"] == min(overall[m]["mae"] for m in overall if m != "predictor")
    assert best["ratio"] == pytest.approx(overall["predictor"]["mae"] / best["mae"])
    assert res["coverage"] == overall["predictor"]["high_coverage"]
    assert res["runaways"]["counts"]["overall"] == {"runaways": 0, "n": 21, "share": 0.0}  # all far below 256
    assert overall["predictor"]["n"] == 21 and 0 <= overall["predictor"]["high_coverage"] <= 1
    assert res["meta"]["train_size"] == 48 and "holdout_mae" in res["meta"]["metrics"]
    # the forest beats the input-length-only line on this workload
    assert overall["predictor"]["mae"] < overall["linear(input)"]["mae"]
    assert cli_main(["predictor", "info", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["embedder"] == DEFAULT_EMBEDDER

    db = tmp_path / "log.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, app_text TEXT, user_text TEXT, "
                 "input_tokens INT, prompt_tokens INT, max_tokens INT, completion_tokens INT, "
                 "finish_reason TEXT, status TEXT)")
    conn.executemany("INSERT INTO requests (app_text, user_text, input_tokens, prompt_tokens, max_tokens, "
                     "completion_tokens, finish_reason, status) VALUES (?,?,?,?,?,?,?,?)",
                     [(r["instruction"], r["input"], r["input_tokens"], r["input_tokens"] + 12, 256,
                       r["output_tokens"], "stop", "ok") for r in make_rows(24, seed=13)])
    conn.commit()
    conn.close()
    from_log = tmp_path / "log.joblib"
    assert cli_main(["predictor", "train", "--from-log", str(db), "--out", str(from_log),
                     "--n-estimators", "5", "--threads", "1"]) == 0
    assert load_length_model(from_log, DEFAULT_EMBEDDER).meta.train_size == 24


@pytest.mark.parametrize("target", ["ratio", "tokens"])
def test_forest_target_extrapolates_only_as_ratio(target: str) -> None:
    # output = 2 x input on inputs 10..100; asked about input 300
    rng = np.random.default_rng(0)
    n = 200
    X = rng.normal(size=(n, 21)).astype(np.float32)
    X[:, -1] = rng.integers(10, 101, size=n)
    train = TrainingSet("e", 8, X, 2 * X[:, -1], ["a"] * n)
    forest = LengthForest.fit(train, ForestParams(n_estimators=30, target=target))
    q = X[:1].copy()
    q[0, -1] = 300
    point, high = forest.predict(q)
    if target == "ratio":
        assert point[0] == pytest.approx(600, rel=0.02) and high[0] >= point[0]
    else:
        assert point[0] <= 202  # a forest on lengths cannot leave the range it saw
    assert forest.meta.metrics["oob_mae"] < (2 if target == "ratio" else 20)


def test_health_stats_track_recent_error_and_runaways(embedder: Embedder) -> None:
    pred = LengthPredictor(cfg(), embedder=embedder)
    r = make_rows(1)[0]
    item = to_input(r)  # max_tokens 256
    assert pred.stats()["rolling_mae"] == -1.0
    pred.observe(item, 256, Prediction(256, 256, "mixture", 0.9))  # flagged, ran away
    pred.observe(item, 40, Prediction(60, 90, "mixture", 0.7))  # flagged, did not
    pred.observe(item, 256, Prediction(100, 200, "mixture", 0.1))  # missed runaway
    pred.observe(item, 30, Prediction(30, 40, "app_median"))  # a fallback: not in the model's health
    s = pred.stats()
    assert s["rolling_mae"] == pytest.approx((0 + 20 + 156) / 3)
    assert s["rolling_runaway_share"] == pytest.approx(2 / 3)
    assert s["rolling_runaway_precision"] == pytest.approx(1 / 2)
    assert s["rolling_runaway_recall"] == pytest.approx(1 / 2)


def test_mixture_form_learns_continually_and_keeps_censoring(embedder: Embedder, tmp_path: Path) -> None:
    pred = LengthPredictor(cfg(model_path=str(tmp_path / "m.joblib")), embedder=embedder)
    rows = make_rows(40, seed=3)
    for i, r in enumerate(rows):
        pred.observe(to_input(r), 256 if i % 4 == 0 else r["output_tokens"], None)  # every 4th runs away
    assert pred.retrain_if_due(0.0) and pred.trained
    model = load_length_model(tmp_path / "m.joblib")
    assert model.form == "mixture" and model.meta.metrics["runaway_share"] == pytest.approx(0.25)
    p = pred.predict([to_input(rows[1])])[0]
    assert p.source == "mixture" and p.p_runaway is not None and p.high >= p.tokens


def test_the_re_predictor_learns_from_the_first_tokens_of_served_requests(embedder: Embedder, tmp_path: Path) -> None:
    # Served requests carry their first generated tokens: a runaway's head loops, an answer's does
    # not. Once enough of them are observed, retraining fits a re-predictor on them; it is saved with
    # the model and the training set keeps the heads across a restart.
    rng = np.random.default_rng(5)
    pred = LengthPredictor(cfg(model_path=str(tmp_path / "m.joblib"), train_set_path=str(tmp_path / "t.npz")),
                           embedder=embedder)
    rows = make_rows(80, seed=6)
    for r in rows:
        if rng.random() < 0.35:  # runs away (whatever its application): repeats a phrase to max_tokens
            true, head = 256, [7, 8, 9] * 22
        else:
            true = 70 + int(rng.integers(0, 60))
            head = [int(t) for t in rng.integers(100, 5000, size=64)]
        pred.observe(to_input(r), true, None, head)
    pred.observe(to_input(rows[0]), 256, None)  # a row without a head: unknown, not learned from
    assert pred.retrain_if_due(0.0)
    model = load_length_model(tmp_path / "m.joblib")
    assert model.repredictor is not None and model.repredictor.train_rows == 80
    loop = HeadRow(0.3, 100.0, 10, 256, [7, 8, 9] * 11)
    varied = HeadRow(0.3, 100.0, 10, 256, [int(t) for t in rng.integers(100, 5000, size=33)])
    points, _, p_run = model.repredictor.predict([loop, varied])
    assert p_run[0] > 0.8 > 0.2 > p_run[1] and points[0] > points[1]
    train = TrainingSet.load(tmp_path / "t.npz")
    assert sum(bool(train.head(i)) for i in range(len(train))) == 80 and train.head(len(train) - 1) == []
    # a re-predictor is not replaced by one fitted on fewer rows: a model file whose training rows
    # lost their heads (as one trained before they were kept), then 50 served rows with heads
    old = load_length_model(tmp_path / "m.joblib")
    old.train = dataclasses.replace(old.train, heads=None)
    old.save(tmp_path / "old.joblib")
    kept = LengthPredictor(cfg(model_path=str(tmp_path / "old.joblib")), embedder=embedder)
    for r in rows[:50]:
        kept.observe(to_input(r), 80, None, [1, 2, 3] * 20)
    assert kept.retrain_if_due(0.0)
    assert load_length_model(tmp_path / "old.joblib").repredictor.train_rows == 80
    # too few rows with heads: the re-predictor there was is kept (here: none)
    few = LengthPredictor(cfg(model_path=str(tmp_path / "f.joblib")), embedder=embedder)
    for i, r in enumerate(rows[:30]):
        few.observe(to_input(r), 256 if i % 3 == 0 else 80, None, [1, 2, 3] * 20)
    assert few.retrain_if_due(0.0)
    assert load_length_model(tmp_path / "f.joblib").repredictor is None


def test_retraining_in_a_lowest_priority_child_process(embedder: Embedder) -> None:
    """The server's retrain runs in a spawned child at nice 19 with one thread per math library and
    yields the same model as a retrain on the caller's thread (same rows, same seed)."""
    rows = make_rows(30, seed=4)
    probe = [to_input(r) for r in make_rows(6, seed=11)]
    results = []
    for in_child in (False, True):
        pred = LengthPredictor(cfg(retrain_in_subprocess=in_child), embedder=embedder)
        for r in rows:
            pred.observe(to_input(r), r["output_tokens"], None)
        assert pred.retrain_if_due(0.0) is True
        results.append(pred.predict(probe))
        refitter = pred._refitter
        if in_child:
            pool = refitter._pool
            assert pool is not None
            assert pool.submit(os.nice, 0).result() == 19  # the child's priority
            pools = pool.submit(threadpool_info).result()  # BLAS and OpenMP: one thread, none to spin
            assert pools and all(p["num_threads"] == 1 for p in pools)
            assert pool.submit(os.getpid).result() != os.getpid()
        else:
            assert refitter._pool is None
        pred.stop()
        assert refitter._pool is None  # stop ends the child
    assert results[0] == results[1]


def _proc_state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_due_retrain_waits_for_idle_workers_and_its_child_pauses_while_they_are_busy(embedder: Embedder) -> None:
    """With the server's busy hook: the first model is fitted at once; a later due retrain waits
    while the workers are busy (until max_defer_s after it fell due), and its child is stopped
    while they are busy during the fit, then goes on and swaps the model in."""
    pred = LengthPredictor(cfg(retrain_in_subprocess=True, retrain_interval_s=100, max_defer_s=1000),
                           embedder=embedder)
    busy = {"now": True, "gate_open": False}

    def hook() -> bool:
        if busy["gate_open"]:  # idle once, at the gate; busy again while the fit runs
            busy["gate_open"] = False
            return False
        return busy["now"]

    pred.busy = hook
    try:
        for r in make_rows(30, seed=4):
            pred.observe(to_input(r), r["output_tokens"], None)
        assert pred.retrain_if_due(0.0) is True  # the first model does not wait
        for r in make_rows(40, seed=6):  # badly predicted: they join the next retrain
            pred.observe(to_input(r), r["output_tokens"] + 40, Prediction(1, 1, "forest"))
        assert pred.retrain_if_due(100.0) is False and pred.retrain_if_due(700.0) is False
        assert pred.stats()["retraining"] == 4 and pred.stats()["retrains"] == 1
        assert pred.stats()["pending"] == 40

        busy["gate_open"] = True
        result: list[bool] = []
        worker = threading.Thread(target=lambda: result.append(pred.retrain_if_due(800.0)))
        worker.start()
        deadline = time.monotonic() + 60
        while not pred._refitter.paused and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = pred._refitter._pid
        assert worker.is_alive() and pid is not None, "the fit ended before its first pause check"
        assert _proc_state(pid) == "T" and pred.stats()["retraining"] == 3
        time.sleep(0.5)
        assert worker.is_alive() and pred.stats()["retrains"] == 1  # stopped: no progress
        assert _proc_state(pid) == "T"
        busy["now"] = False
        worker.join(60)
        assert result == [True] and pred.stats()["retrains"] == 2 and pred.stats()["train_size"] == 70
        assert not pred._refitter.paused and _proc_state(pid) != "T"

        # past max_defer_s a due retrain runs although the workers stay busy, and is not paused
        for r in make_rows(20, seed=8):
            pred.observe(to_input(r), r["output_tokens"] + 40, Prediction(1, 1, "forest"))
        busy["now"] = True
        assert pred.retrain_if_due(900.0) is False
        assert pred.retrain_if_due(1950.0) is True and pred.stats()["retrains"] == 3
    finally:
        pred.stop()


def test_the_mixture_embeds_no_user_text_unless_configured(embedder: Embedder, tmp_path: Path) -> None:
    """By default the mixture reads only the application text's (cached) embedding: a prediction
    embeds nothing and does not depend on the user text; with ``user_embedding`` it embeds the user
    texts. The setting is recorded in the model file."""
    rows = make_rows(40, seed=2)
    a = to_input(rows[1])
    b = dataclasses.replace(a, user_text="a completely different request about something else")
    for user_embedding in (False, True):
        pred = LengthPredictor(cfg(user_embedding=user_embedding, model_path=str(tmp_path / f"{user_embedding}.joblib")),
                               embedder=embedder)
        for r in rows:
            pred.observe(to_input(r), r["output_tokens"], None)
        assert pred.retrain_if_due(0.0)
        assert load_length_model(tmp_path / f"{user_embedding}.joblib").reads_user_embedding is user_embedding
        embedded: list[str] = []
        real = embedder.encode

        def spy(texts, seen=embedded, encode=real, **kw):
            seen.extend(texts)
            return encode(texts, **kw)

        embedder.encode = spy  # type: ignore[method-assign]
        try:
            pa, pb = pred.predict([a, b])
        finally:
            del embedder.encode  # the class's method again
        if user_embedding:
            assert embedded == [a.user_text, b.user_text]
        else:
            assert embedded == [] and pa == pb  # the application texts were cached at training
        pred.stop()
