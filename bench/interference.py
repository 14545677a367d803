"""Decode step time with a CPU neighbour: what the front end's work costs the model's worker.

    python -m bench.interference [--model default] [--rows 16] [--steps 96] [--out FILE.md]

A worker decodes ``--rows`` rows (greedy, transformers' concatenating KV cache, ``--prompt-len`` random prompt tokens) for
``--steps`` steps in this process, with torch's default threads (as a server's worker), while
one neighbour process runs beside it:

* ``none``: nothing;
* ``embed@R``: the length predictor's embedder (the bundled sentence model, one torch thread, as
  the server's front end) embeds one request's texts at R arrivals per second (Poisson);
* ``busy``: one thread of CPU-bound numpy work, as a retraining child at normal priority;
* ``busy-nice19``: the same at ``nice 19``.

The conditions run in turn, twice (ABC ABC), and the table reports each one's median and mean
step time and the ratio to ``none``, so a slowdown is read within one run on a shared machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

from bench.steps import emit, header, load_cpu_model, step_times

TEXT = ("Translate the following English text into French. The committee will meet next week to "
        "review the budget and decide which projects to fund in the coming year.")


def _embed_loop(rate: float, stop, ready) -> None:
    import numpy as np

    from predictor.embedder import get_embedder

    emb = get_embedder("default", threads=1)
    emb.encode([TEXT])
    ready.set()
    rng = np.random.default_rng(0)
    k = 0
    while not stop.is_set():
        time.sleep(float(rng.exponential(1.0 / rate)))
        emb.encode([f"{TEXT} {k}"])  # a new text each time: no cache
        k += 1


def _busy_loop(niceness: int, stop, ready) -> None:
    os.nice(niceness)
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((256, 256))
    ready.set()
    with threadpool_limits(1):
        while not stop.is_set():
            a = np.tanh(a @ a.T / 256.0)


def neighbour(kind: str):
    """A started neighbour process (None for ``none``) and its stop event."""
    if kind == "none":
        return None, None
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    if kind.startswith("embed@"):
        p = ctx.Process(target=_embed_loop, args=(float(kind.split("@")[1]), stop, ready), daemon=True)
    elif kind in ("busy", "busy-nice19"):
        p = ctx.Process(target=_busy_loop, args=(19 if kind.endswith("19") else 0, stop, ready), daemon=True)
    else:
        raise ValueError(f"unknown neighbour {kind!r}")
    p.start()
    ready.wait(120)
    time.sleep(1.0)
    return p, stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--neighbours", default="none,embed@0.5,embed@2,busy-nice19")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    model = load_cpu_model(args.model)
    vocab = int(model.config.vocab_size)
    kinds = [k.strip() for k in args.neighbours.split(",") if k.strip()]
    step_times(model, args.rows, args.prompt_len, args.prompt_len, 8, 0, vocab)  # warm-up
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            proc, stop = neighbour(kind)
            try:
                results[kind] += step_times(model, args.rows, args.prompt_len, args.prompt_len, args.steps, 0, vocab)
            finally:
                if proc is not None:
                    stop.set()
                    proc.join(30)
    base = statistics.median(results[kinds[0]])
    lines = [
        *header("Decode step time with a CPU neighbour", "bench.interference", argv,
                f"model `{args.model}`, {args.rows} rows, prompt {args.prompt_len} tokens, {args.steps} steps per "
                f"pass, {args.repeats} passes per condition (in turn)"),
        f"| neighbour | median step (ms) | mean step (ms) | median vs `{kinds[0]}` |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind in kinds:
        med = statistics.median(results[kind])
        lines.append(f"| {kind} | {med * 1e3:.1f} | {statistics.fmean(results[kind]) * 1e3:.1f} | {med / base:.2f}x |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
