"""bench.padding's estimate of a left-padded cache's padding, on a real request-log file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bench.padding import padding
from service.requestlog import SCHEMA


def test_padding_share_of_two_rows_of_different_lengths(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        # A: 100 prompt tokens, no output, runs 0-10 s; B: 20 prompt tokens + 40 generated over 0-10 s
        for rid, prompt, gen in (("a", 100, 0), ("b", 20, 40)):
            conn.execute("INSERT INTO requests (id, status, prompt_tokens, completion_tokens, dispatch, first_token, "
                         "finish) VALUES (?, 'ok', ?, ?, 0, 0, 10)", (rid, prompt, gen))
    got = padding(db, dt=0.5)
    # at t: contents 100 and 20 + 4t (t = 0, 0.5, ..., 9.5): the cache is 100 wide for both rows
    ts = [0.5 * k for k in range(20)]
    real = sum(120 + 4 * t for t in ts)
    assert got["busy_s"] == pytest.approx(10.0)
    assert got["mean_rows"] == pytest.approx(2.0)
    assert got["mean_longest"] == pytest.approx(100.0)
    assert got["padding_share"] == pytest.approx(1 - real / (200 * 20))
