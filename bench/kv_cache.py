"""Decode step time with transformers' concatenating KV cache against ``worker.kvcache``'s in-place one.

    python -m bench.kv_cache [--model default] [--shapes 16x300/300,32x750/300] [--steps 16]
                             [--headroom 64] [--repeats 2] [--out FILE.md]

Each shape ``RxL/C`` is R rows in a cache of L columns of which each row fills its last C (the
rest is left padding, as on the iteration runner when rows of different lengths run together:
59% of its cache was padding in ``bench/results/pcb_abab/``'s runs). For each shape the two caches
run in turn (``--repeats`` times each): a padded prefill, then ``--steps`` greedy decode steps;
the table gives the median step time of each and their ratio, within this one run.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.steps import emit, header, load_cpu_model, step_times

DEFAULT_SHAPES = "16x300/300,16x750/300,16x750/750,16x1500/300,32x300/300,32x750/300,32x750/750,32x1500/300"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"16x750/300,..."`` -> ``[(16, 750, 300), ...]`` (rows, cache columns, filled columns)."""
    out = []
    for part in text.split(","):
        rows, rest = part.strip().split("x")
        cols, filled = rest.split("/")
        if not 0 < int(filled) <= int(cols):
            raise ValueError(f"filled columns must be in 1..{cols}: {part!r}")
        out.append((int(rows), int(cols), int(filled)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="RxL/C,...: rows x cache columns / filled columns")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--headroom", type=int, default=64, help="spare columns of the in-place cache")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)

    model = load_cpu_model(args.model)
    vocab = int(model.config.vocab_size)
    step_times(model, 4, 64, 64, 4, 0, vocab)  # warm-up
    rows_md = []
    for rows, cols, filled in shapes:
        got: dict[int, list[float]] = {0: [], args.headroom: []}
        for _ in range(args.repeats):
            for headroom in got:
                got[headroom] += step_times(model, rows, cols, filled, args.steps, headroom, vocab)[2:]
        cat, grown = statistics.median(got[0]), statistics.median(got[args.headroom])
        rows_md.append(f"| {rows} | {cols} | {filled} | {cat * 1e3:.1f} | {grown * 1e3:.1f} | {grown / cat:.2f}x |")
        print(rows_md[-1], flush=True)
    lines = [
        *header("Decode step: concatenating KV cache vs in-place growth", "bench.kv_cache", argv,
                f"model `{args.model}` (float32), {args.steps} decode steps per pass, {args.repeats} passes per "
                f"cache (in turn), headroom {args.headroom} columns"),
        "| rows | cache columns | filled per row | concatenating (ms) | in place (ms) | in place vs concatenating |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows_md,
    ]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
