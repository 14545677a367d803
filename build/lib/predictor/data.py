"""Training and evaluation rows from a JSONL file or from the service's SQLite request log."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    """One finished request with its true generation length."""

    app_text: str  # application-level text (instruction / system prompt), "" if none
    user_text: str  # user input
    input_tokens: int  # user input length in the served model's tokens
    output_tokens: int  # true generation length
    max_tokens: int | None = None  # the request's limit, when known
    app: str = ""  # application label for reports ("" when the source has none)
    id: str = ""  # the row's id, when the source has one

    @property
    def group(self) -> str:
        """Label to report this row under: the application label, else its application text."""
        return self.app or _short(self.app_text)


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    if not text:
        return "(no instruction)"
    return text if len(text) <= width else text[: width - 3] + "..."


def load_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Rows from JSONL with fields ``instruction``, ``input``, ``input_tokens``, ``output_tokens``
    and optionally ``app`` (label) and ``max_tokens``. Blank lines are skipped; a missing
    required field raises ``ValueError`` naming the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                max_tokens = rec.get("max_tokens")
                rows.append(Row(app_text=rec.get("instruction") or "", user_text=rec["input"],
                                input_tokens=int(rec["input_tokens"]),
                                output_tokens=int(rec["output_tokens"]),
                                max_tokens=None if max_tokens is None else int(max_tokens),
                                app=str(rec.get("app") or ""), id=str(rec.get("id") or "")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{os.fspath(path)}:{lineno}: bad row ({exc!r})") from exc
    return rows


def load_request_log(db_path: str | os.PathLike[str], drop_truncated: bool = False,
                     limit: int | None = None) -> list[Row]:
    """Finished requests (``status = 'ok'``) from the service's SQLite log, in insertion order.

    Opens the database read-only. Rows missing a length are skipped. ``completion_tokens`` of
    a request stopped by its limit (``finish_reason = 'length'``) is a lower bound of its
    natural length; ``drop_truncated`` leaves such rows out.
    """
    if not Path(db_path).exists():
        raise FileNotFoundError(db_path)
    sql = ("SELECT app_text, user_text, input_tokens, max_tokens, completion_tokens FROM requests "
           "WHERE status = 'ok' AND input_tokens IS NOT NULL AND completion_tokens IS NOT NULL")
    if drop_truncated:
        sql += " AND (finish_reason IS NULL OR finish_reason != 'length')"
    sql += " ORDER BY rowid"
    params: tuple[int, ...] = ()
    if limit is not None:
        sql += " LIMIT ?"
        params = (limit,)
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        cur = conn.execute(sql, params)
        return [Row(app_text=app or "", user_text=user or "", input_tokens=int(itok),
                    output_tokens=int(out), max_tokens=None if mt is None else int(mt))
                for app, user, itok, mt, out in cur]
    finally:
        conn.close()
