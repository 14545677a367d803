"""Shared parts of the decode-step micro-benchmarks (``bench.interference``, ``bench.kv_cache``)."""

from __future__ import annotations

import os
import sys
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
