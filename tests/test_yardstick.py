"""The predictor's yardstick (``predictor.evaluate``) on synthetic truth where every answer is known,
and the honesty of the committed workload (fixed ``max_tokens``, split by source document).

No embedder, model server or workload build: these run in well under a second.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.workload.builder import MAX_TOKENS, split_by_source
from bench.workload.records import APPS, Request, read_jsonl
from predictor.data import Row
from predictor.evaluate import (
    BASELINES,
    FOREST,
    Yardstick,
    runaway_probability,
    runaway_report,
    tree_lengths,
    yardstick,
)
from predictor.features import INPUT_TOKENS_COL, N_FEATURES
from predictor.forest import ForestParams, LengthForest
from predictor.trainset import TrainingSet

WORKLOADS = Path(__file__).resolve().parents[1] / "bench" / "workloads"
FIX, TRANSLATE = "Fix the text.", "Translate the text."


def rows(spec: list[tuple[str, int, int, int]]) -> list[Row]:
    """Rows from (instruction, input_tokens, output_tokens, max_tokens); the label is the instruction's first word."""
    return [Row(app_text=a, user_text=f"text {i}", input_tokens=x, output_tokens=y, max_tokens=m,
                app=a.split()[0].lower()) for i, (a, x, y, m) in enumerate(spec)]


def fit_arrays(train: list[Row]) -> tuple[list[str], np.ndarray, np.ndarray]:
    return ([r.app_text for r in train], np.array([r.input_tokens for r in train]),
            np.array([r.output_tokens for r in train]))


def mae(report: Yardstick, method: str, group: str = "overall") -> float:
    return report.results[group][method].mae


# --- constant length per application: the per-application median is exactly right -----------------
# "fix" is 10 tokens (one training outlier of 70 pulls its mean to 25), "translate" is always 50.
CONST_TRAIN = rows([(FIX, 5, 10, 64), (FIX, 6, 10, 64), (FIX, 7, 10, 64), (FIX, 8, 70, 128),
                    (TRANSLATE, 5, 50, 128), (TRANSLATE, 9, 50, 128), (TRANSLATE, 12, 50, 128),
                    (TRANSLATE, 20, 50, 128)])
# two "fix" rows reach their max_tokens (10): runaways
CONST_TEST = rows([(FIX, 4, 10, 64), (FIX, 9, 10, 10), (FIX, 30, 10, 10), (FIX, 2, 10, 100),
                   (TRANSLATE, 3, 50, 128), (TRANSLATE, 40, 50, 64), (TRANSLATE, 7, 50, 128),
                   (TRANSLATE, 11, 50, 200)])


@pytest.fixture()
def const_report() -> Yardstick:
    true = np.array([r.output_tokens for r in CONST_TEST], dtype=float)
    point = true + np.array([3, -3, 3, -3, 3, -3, 3, -3])  # forest MAE 3
    high = true - np.array([0, 0, 1, 0, 0, 1, 0, 0])  # 6 of 8 covered
    score = np.array([0.1, 0.9, 0.4, 0.2, 0.6, 0.0, 0.0, 0.3])  # runaways are rows 1 and 2
    return yardstick(*fit_arrays(CONST_TRAIN), CONST_TEST, point, high, 0.9, score, 0.5, "test score")


def test_baselines_on_constant_lengths(const_report: Yardstick) -> None:
    true = np.array([r.output_tokens for r in CONST_TEST], dtype=float)
    caps = np.array([r.max_tokens for r in CONST_TEST], dtype=float)
    assert const_report.baselines == list(BASELINES)
    assert mae(const_report, "app median") == 0.0
    # "fix" predicted at its mean 25, or at max_tokens 10 where that is the cap: off by 15 on two rows
    assert mae(const_report, "app mean") == pytest.approx(2 * 15 / 8)
    assert mae(const_report, "global median") == pytest.approx(2 * 40 / 8)  # median 50, same two rows off
    assert mae(const_report, "max_tokens") == pytest.approx(np.mean(caps - true))
    assert mae(const_report, "app median", "translate") == mae(const_report, "app median", "fix") == 0.0
    assert mae(const_report, FOREST) == 3.0
    assert const_report.best_baseline() == "app median"
    assert const_report.ratio() is None  # the best baseline is exact: no finite ratio


def test_runaway_share_auc_precision_recall(const_report: Yardstick) -> None:
    r = const_report.runaways
    assert r is not None
    assert r.counts == {"fix": (2, 4), "translate": (0, 4), "overall": (2, 8)}
    assert r.share("fix") == 0.5 and r.share("translate") == 0.0 and r.share() == 0.25
    # runaway scores 0.9 and 0.4 against 0.1, 0.2, 0.6, 0, 0, 0.3: 11 of 12 pairs ordered right
    assert r.auc == pytest.approx(11 / 12)
    assert (r.flagged, r.precision, r.recall) == (2, 0.5, 0.5)  # flags 0.9 (hit) and 0.6 (miss)


def test_coverage_and_report(const_report: Yardstick) -> None:
    assert const_report.coverage == 0.75
    assert const_report.results["fix"][FOREST].high_coverage == 0.75
    text = const_report.markdown()
    assert text.startswith("**Best cheap baseline: app median**")
    assert "75.0% of the test rows" in text and "2 of 8 (25.0%)" in text
    assert "| fix | 4 | 2 | 50.0% |" in text and "| overall | app median | 8 | 0.00 |" in text
    d = const_report.as_dict()
    assert d["best_baseline"]["overall"] == {"name": "app median", "mae": 0.0, "predictor_mae": 3.0, "ratio": None}
    assert d["coverage"] == 0.75 and d["runaways"]["counts"]["fix"] == {"runaways": 2, "n": 4, "share": 0.5}


def test_best_baseline_and_forest_ratio() -> None:
    """Lengths on one line per application: the per-application line is the best baseline."""
    def length(app: str, x: int) -> int:
        return 2 * x if app == FIX else 3 * x + 5

    train = rows([(a, x, length(a, x), 400) for a in (FIX, TRANSLATE) for x in (10, 20, 40, 80)])
    noise = [2, -2, 2, -2, 2, -2]
    test = rows([(a, x, length(a, x) + e, 400)
                 for (a, x), e in zip([(FIX, 15), (FIX, 50), (FIX, 70), (TRANSLATE, 12), (TRANSLATE, 30),
                                       (TRANSLATE, 60)], noise, strict=True)])
    true = np.array([r.output_tokens for r in test], dtype=float)
    report = yardstick(*fit_arrays(train), test, true + 3, true + 10, 0.9)
    assert mae(report, "app linear(input)") == pytest.approx(2.0)
    assert all(mae(report, b) > 2.0 for b in BASELINES if b != "app linear(input)")
    assert report.best_baseline() == "app linear(input)"
    assert report.ratio() == pytest.approx(1.5)
    assert report.markdown().startswith("**Best cheap baseline: app linear(input)**")
    assert report.runaways is not None and report.runaways.share() == 0.0 and report.runaways.auc is None
    # every line's max_tokens baseline error is its distance to 400
    assert mae(report, "max_tokens") == pytest.approx(np.mean(400 - true))


def test_no_max_tokens_no_max_tokens_baseline_nor_runaways() -> None:
    test = [Row(FIX, "a", 4, 8), Row(FIX, "b", 6, 12)]
    report = yardstick([FIX, FIX], np.array([4, 6]), np.array([8, 12]), test, np.array([8.0, 12.0]),
                       np.array([8.0, 12.0]), 0.9)
    assert "max_tokens" not in report.baselines and report.runaways is None
    assert runaway_report(["a"], np.array([5.0]), [None]) is None


def test_runaway_probability_counts_trees() -> None:
    trees = np.array([[10, 300, 5], [20, 256, 5], [30, 100, 5], [300, 50, 5]], dtype=float)
    p = runaway_probability(trees, [256, 256, None])
    assert p[:2].tolist() == [0.25, 0.5] and np.isnan(p[2])


def test_tree_lengths_match_the_forest() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, N_FEATURES)).astype(np.float32)
    X[:, INPUT_TOKENS_COL] = rng.integers(5, 100, size=40)
    y = 2 * X[:, INPUT_TOKENS_COL]
    train = TrainingSet("test-embedder", 8, X, y, ["a"] * 40)
    for target in ("ratio", "tokens"):
        forest = LengthForest.fit(train, ForestParams(n_estimators=7, target=target))
        trees = tree_lengths(forest, X[:5])
        assert trees.shape == (7, 5)
        np.testing.assert_allclose(trees.mean(axis=0), forest.predict(X[:5])[0], rtol=1e-5)


# --- the workload: fixed max_tokens per application, split by source document ----------------------


def test_split_by_source_keeps_sources_whole_and_stratifies() -> None:
    rng = np.random.default_rng(0)
    apps = list(APPS)
    requests = [Request(f"r{i}", apps[i % 6], "", "", 1, source=f"doc{int(rng.integers(0, 150))}-{i % 3}")
                for i in range(1200)]
    train = split_by_source(requests, 0.25, np.random.default_rng(1))
    sides = {}
    for r in requests:
        assert sides.setdefault(r.source, r.source in train) == (r.source in train)
    per_app = Counter(r.app for r in requests if r.source in train)
    assert all(abs(per_app[a] - 50) <= 3 for a in apps), per_app  # 25% of 200 each


def test_committed_workload_is_honest() -> None:
    all_rows = read_jsonl(WORKLOADS / "all.jsonl")
    train, test = read_jsonl(WORKLOADS / "train.jsonl"), read_jsonl(WORKLOADS / "test.jsonl")
    assert sorted(r["id"] for r in train + test) == sorted(r["id"] for r in all_rows)
    assert all(r["max_tokens"] == MAX_TOKENS[r["app"]] for r in all_rows)
    assert all(r["source"] for r in all_rows)
    assert not {r["source"] for r in train} & {r["source"] for r in test}
    n_app = Counter(r["app"] for r in all_rows)
    n_train = Counter(r["app"] for r in train)
    assert all(abs(n_train[a] / n_app[a] - 0.25) < 0.03 for a in APPS), n_train
