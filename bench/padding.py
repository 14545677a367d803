"""How much of a left-padded KV cache was padding during a run, estimated from its request log.

    python -m bench.padding LOG.db [LOG.db ...] [--dt 0.25]

Every ``--dt`` seconds of the run, the running requests are those dispatched and not yet finished;
a row's content is its prompt plus the tokens generated so far (linear between its first token and
its end). A left-padded cache (our runners) is as wide as its longest row, so each step computes
``rows x longest`` columns of which ``sum(content)`` are real. Printed per log: the busy seconds,
the mean number of running rows, the mean longest row, and the padding share
``1 - sum(content) / sum(rows x longest)`` over the run. An estimate: a preempted request counts
as running from its last dispatch, and a static batch's rows are padded to their batch's longest
prompt, not to the longest running row.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path


def padding(db: Path, dt: float = 0.25) -> dict[str, float]:
    """Busy seconds, mean rows, mean longest row and padding share of one request log."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT dispatch, first_token, finish, prompt_tokens, completion_tokens FROM requests "
                            "WHERE status = 'ok' AND dispatch IS NOT NULL AND finish IS NOT NULL").fetchall()
    if not rows:
        raise ValueError(f"{db}: no answered requests")
    t, end = min(r[0] for r in rows), max(r[2] for r in rows)
    busy = n_sum = longest_sum = real = padded = 0.0
    while t < end:
        content = [p + g * (0.0 if t < f else (t - f) / max(e - f, 1e-6)) for d, f, e, p, g in rows if d <= t < e]
        if content:
            busy += dt
            n_sum += len(content)
            longest_sum += max(content)
            real += sum(content)
            padded += len(content) * max(content)
        t += dt
    steps = busy / dt
    return {"busy_s": busy, "mean_rows": n_sum / steps, "mean_longest": longest_sum / steps,
            "padding_share": 1.0 - real / padded}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.padding", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--dt", type=float, default=0.25, help="sampling interval in seconds")
    args = p.parse_args(argv)
    print("| log | busy (s) | mean running rows | mean longest row (tokens) | padding share |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for db in args.logs:
        r = padding(db, args.dt)
        print(f"| `{db.name}` | {r['busy_s']:.0f} | {r['mean_rows']:.1f} | {r['mean_longest']:.0f} | "
              f"{r['padding_share']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
