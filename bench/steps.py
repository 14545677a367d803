"""Shared parts of the decode-step micro-benchmarks (``bench.interference``, ``bench.kv_cache``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def load_cpu_model(name: str):
    """The served model ``name`` (e.g. ``default``) in float32 on CPU, from the converted-weights cache."""
    import torch

    from service.settings import Settings
    from worker.loader import load_model, materialize, resolve

    return load_model(materialize(resolve(name), Settings().cache_dir), "cpu", torch.float32)


def header(title: str, module: str, argv: list[str] | None, facts: str) -> list[str]:
    """A report's title, the command that made it, and ``facts`` plus the machine's threads, CPUs and load."""
    import torch

    return [f"# {title}", "", "```", f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
            "```", "", f"- {facts}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
            f"1-min load average at the end {os.getloadavg()[0]:.2f}", ""]


def emit(lines: list[str], out: Path | None) -> None:
    """Print the report and write it to ``out`` (when given)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)


def step_times(model, rows: int, cols: int, filled: int, steps: int, headroom: int, vocab: int) -> list[float]:
    """Per-step seconds of ``steps`` greedy decode steps after a left-padded prefill."""
    import torch

    from worker.kvcache import grow_in_place

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, cols), generator=g)
    mask = torch.zeros((rows, cols), dtype=torch.long)
    mask[:, cols - filled:] = 1
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        cache, pos = grow_in_place(out.past_key_values, headroom), mask.sum(-1)
        nxt = out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
            t = time.perf_counter()
            out = model(input_ids=nxt.view(rows, 1), attention_mask=mask, position_ids=pos.view(rows, 1),
                        past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache, pos, nxt = out.past_key_values, pos + 1, out.logits[:, -1].argmax(-1)
    return times
