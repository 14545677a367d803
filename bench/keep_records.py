"""Copy a ``magnus bench compare`` work directory's per-request records and request logs into the
repository: ``python -m bench.keep_records WORK_DIR OUT_DIR``.

Each policy's ``records_<rate>.json`` becomes ``OUT_DIR/<policy>_r<rate>.records.json.gz`` and its
SQLite log ``OUT_DIR/<policy>.log.db`` (a consistent copy through SQLite's backup, the write-ahead
log included); ``:`` in a policy variant's name becomes ``_``. These are what ``magnus bench
report`` re-summarizes and ``magnus simulate --replay`` re-runs.
"""

from __future__ import annotations

import gzip
import shutil
import sqlite3
import sys
from pathlib import Path


def keep(work: Path, out: Path) -> list[Path]:
    """Copy every policy directory's records and log under ``work`` to ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for policy in sorted(p for p in work.iterdir() if p.is_dir()):
        safe = policy.name.replace(":", "_")
        for rec in sorted(policy.glob("records_*.json")):
            rate = rec.stem.removeprefix("records_")
            dest = out / f"{safe}_r{rate}.records.json.gz"
            with rec.open("rb") as src, gzip.open(dest, "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
            written.append(dest)
        db = policy / "log.db"
        if db.exists():
            dest = out / f"{safe}.log.db"
            dest.unlink(missing_ok=True)
            src, dst = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(dest)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                src.close()
                dst.close()
            written.append(dest)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for path in keep(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path, path.stat().st_size)
