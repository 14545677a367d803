"""SQLite log of finished requests and batches, written by a background thread (WAL mode).

This is the data the length predictor and the batch-time estimator learn from.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    model TEXT,
    kind TEXT,                -- chat | completion
    app_text TEXT,            -- application-level text: system messages / instruction
    user_text TEXT,           -- user-level text
    input_tokens INTEGER,     -- user text length in the served model's tokens
    prompt_tokens INTEGER,    -- the whole prompt as run
    max_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    status TEXT,              -- ok | error | cancelled
    error TEXT,
    predicted_tokens INTEGER,
    predicted_high INTEGER,
    arrival REAL, dispatch REAL, first_token REAL, finish REAL,   -- unix seconds
    batch_id INTEGER,
    worker INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    policy TEXT,
    worker INTEGER,
    size INTEGER,
    max_prompt INTEGER,
    max_gen INTEGER,          -- true longest generation
    predicted_max_gen INTEGER,
    predicted_lengths TEXT,   -- JSON list, when a predictor was used
    dispatch REAL, start REAL, end REAL,
    prefill_s REAL, decode_s REAL,
    valid_tokens INTEGER, total_tokens INTEGER,
    peak_mem_bytes INTEGER,
    oom INTEGER
);
"""


@dataclass
class RequestRecord:
    id: str
    model: str
    kind: str
    app_text: str
    user_text: str
    input_tokens: int
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int
    finish_reason: str | None
    status: str
    error: str | None
    predicted_tokens: int | None
    predicted_high: int | None
    arrival: float
    dispatch: float | None
    first_token: float | None
    finish: float
    batch_id: int | None
    worker: int | None


@dataclass
class BatchRecord:
    id: int
    policy: str
    worker: int
    size: int
    max_prompt: int
    max_gen: int
    predicted_max_gen: int | None
    predicted_lengths: list[int] | None
    dispatch: float
    start: float
    end: float
    prefill_s: float
    decode_s: float
    valid_tokens: int
    total_tokens: int
    peak_mem_bytes: int | None
    oom: bool


def connect(path: Path | str) -> sqlite3.Connection:
    """Open (creating if needed) a log database with the schema and WAL on."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    return conn


class RequestLog:
    """Queue-backed writer: ``add`` never blocks the caller on disk I/O."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._q: queue.Queue[RequestRecord | BatchRecord | None] = queue.Queue()
        self._conn = connect(self.path)
        self._thread = threading.Thread(target=self._run, name="magnus-requestlog", daemon=True)
        self._thread.start()

    def last_batch_id(self) -> int:
        """The largest batch id already in the log (0 when none): new batches continue after it."""
        return int(self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM batches").fetchone()[0])

    def add(self, rec: RequestRecord | BatchRecord) -> None:
        self._q.put(rec)

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            batch = [rec]
            while not self._q.empty():  # write whatever piled up in one transaction
                batch.append(self._q.get_nowait())
            try:
                with self._conn:
                    for r in batch:
                        if r is not None:
                            self._write(r)
            except sqlite3.Error:
                log.exception("request log write failed")
            for _ in batch:
                self._q.task_done()
            if None in batch:
                return

    def _write(self, rec: RequestRecord | BatchRecord) -> None:
        row = asdict(rec)
        table = "requests" if isinstance(rec, RequestRecord) else "batches"
        if isinstance(rec, BatchRecord):
            row["predicted_lengths"] = json.dumps(rec.predicted_lengths) if rec.predicted_lengths else None
            row["oom"] = int(rec.oom)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._conn.execute(f"INSERT OR REPLACE INTO {table} ({cols}) VALUES ({marks})", list(row.values()))

    def flush(self) -> None:
        """Block until everything queued so far is on disk."""
        self._q.join()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)
        self._conn.close()
