"""bench.runaway_horizon: the runaway ranking after k generated tokens, on a real (tiny) model's head states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.runaway_horizon import first_loop, first_repeat
from bench.runaway_horizon import main as horizon_main


def _write(path: Path, recs: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _split(tmp_path: Path, name: str, n: int, seed: int) -> tuple[str, str]:
    """Truth and head files: half the rows run away and repeat a short phrase from token 10 on; the
    others write distinct tokens and end at 200 (past every k measured). The runaways' inputs say
    "again" where the others say "once"."""
    rng = np.random.default_rng(seed)
    truth, heads = [], []
    for i in range(n):
        runaway = i % 2 == 0
        start = [int(t) for t in rng.integers(1000, 9000, 10)]
        tail = [301, 302, 303] * 40 if runaway else [int(t) for t in rng.integers(1000, 9000, 120)]
        truth.append({"id": f"{name}-{i}", "app": "grammar_correction", "instruction": "Correct the grammar.",
                      "input": f"say it {'again' if runaway else 'once'} number {i}", "max_tokens": 256,
                      "input_tokens": 7 + i % 5, "output_tokens": 256 if runaway else 200})
        heads.append({"id": f"{name}-{i}", "head_ids": (start + tail)[:128], "ended": False})
    return _write(tmp_path / f"{name}.jsonl", truth), _write(tmp_path / f"{name}_heads.jsonl", heads)


def test_the_markers_fire_where_the_repetition_allows() -> None:
    loop = list(range(100, 120)) + [7, 8] * 60
    assert first_loop(loop) == 70  # 48 periodic tokens + one period after the 20 distinct ones
    assert first_loop(loop[:69]) is None and first_loop(list(range(100, 228))) is None
    assert first_loop([7] * 100) == 64  # the worker checks from 64 tokens on
    phrase = list(range(200, 220))  # a 20-token sentence said three times: a 16-gram's third time
    assert first_repeat(list(range(100, 110)) + phrase * 3) == 10 + 40 + 16
    assert first_repeat(list(range(100, 228))) is None


def test_horizon_ranks_runaways_that_repeat_and_counts_the_loop_detector(tiny_model_dir: str,
                                                                        tmp_path: Path) -> None:
    train, train_heads = _split(tmp_path, "train", 60, 0)
    test, test_heads = _split(tmp_path, "test", 20, 1)
    out = tmp_path / "horizon.json"
    horizon_main([train, test, train_heads, test_heads, "--ks", "8,64", "--model", tiny_model_dir,
                  "--layer", "1", "--arrival-layers", "1,2", "--json", str(out), "--out", str(tmp_path / "horizon.md")])
    result = json.loads(out.read_text())
    at = {a["k"]: a for a in result["at"]}
    assert at[8]["running"] == at[64]["running"] == 20 and at[64]["runaways"] == 10
    # after 64 tokens the repetition measures separate the two halves; after 8 nothing repeats yet
    assert at[64]["auc_request_repetition"] == 1.0
    assert at[8]["auc_request_repetition"] < 0.8
    assert at[64]["loop_recall"] == 1.0 and at[64]["loop_false_flags"] == 0.0
    assert at[64]["repeat_recall"] == 1.0 and at[64]["repeat_false_flags"] == 0.0
    assert at[8]["loop_recall"] == at[8]["repeat_recall"] == 0.0
    assert "| 64 | 20 | 10 |" in (tmp_path / "horizon.md").read_text()
    # at arrival the request features (one application, input lengths unrelated to the outcome) do not
    # rank; the mean over the prompt sees the word that decides it, the last token (the assistant
    # header, the same in every prompt) sees it only through attention
    arrival = {a["layer"]: a for a in result["arrival"]}
    assert sorted(arrival) == [0, 1, 2] and arrival[0]["auc_last"] < 0.8
    assert arrival[1]["auc_mean"] == arrival[2]["auc_mean"] == 1.0
