"""First and second start-up time of `magnus serve` on a model (GGUF conversion, then the cached copy).

    python -m bench.startup [--model default]

Uses a fresh, empty cache directory, so the first start converts the weights and the second
loads the converted copy. Time = process start until GET /health answers 200.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from service.launcher import start_server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--policy", default="vs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in (1, 2):
            t0 = time.perf_counter()
            srv = start_server(Path(tmp) / f"run{i}", args.model, policy=args.policy, cache_dir=Path(tmp) / "models")
            times.append(time.perf_counter() - t0)
            srv.stop()
    print(f"| start | seconds to healthy ({args.model}, policy {args.policy}) |\n| --- | ---: |")
    print(f"| first (converts weights) | {times[0]:.1f} |\n| second (cached weights) | {times[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
