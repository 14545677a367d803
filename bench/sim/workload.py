"""Workload side of the simulator: rows with token counts, true and predicted lengths, arrivals.

A row is a workload JSONL line (``bench.workload.records``) plus, from a truth file (``bench.workload.truth``),
``output_tokens``, ``prompt_tokens`` and ``input_tokens``; optionally ``predicted_tokens`` (from
the real predictor) and ``arrival``.

* Token counts that are absent are **estimated**: ``input = ceil(chars / 4)`` and
  ``prompt = ceil(instruction chars / 4) + input + TEMPLATE_TOKENS``.
* True lengths that are absent come from a **synthetic** length model (:func:`synthetic_output`),
  labelled as such in every report.
* Predictions: ``oracle`` (the true length), ``noisy`` (true x LogNormal(0, sigma), median
  unbiased; sigma 0.35 by default: half the predictions within about +-27% of the truth, one in
  ten off by more than 1.8x -- an assumption standing in for a measured predictor error) or
  ``file`` (the row's ``predicted_tokens``).

Lengths and predictions are properties of a row (the model runs at temperature 0 and the
predictor is deterministic), so a row sampled twice repeats both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.workload.records import read_jsonl

CHARS_PER_TOKEN = 4
#: Chat-template tokens around instruction and input (SmolLM2's template; measured on a truth
#: sample as prompt - input - instruction chars / 4).
TEMPLATE_TOKENS = 11
DEFAULT_NOISE_SIGMA = 0.35

#: Synthetic length model per application: (expected output tokens per input token, sigma of the
#: log-normal spread around it, share of "runaway" generations that only stop at ``max_tokens``).
#: Ratios: rewrites reproduce their input (1.0); commented code ~1.4x; code translation ~1.35x
#: (the builder's target-language estimates); translation 1.0 (the geometric mean of the English
#: -> X and X -> English directions, whose measured ratios are inverse). Rewrites of a given text
#: (grammar, bug fixing) vary least; free-form rewriting and commenting most.
SYNTHETIC_APPS: dict[str, tuple[float, float, float]] = {
    "machine_translation": (1.0, 0.20, 0.03),
    "grammar_correction": (1.0, 0.10, 0.02),
    "detoxification": (1.0, 0.30, 0.05),
    "code_translation": (1.35, 0.25, 0.05),
    "bug_fixing": (1.0, 0.15, 0.05),
    "code_commenting": (1.4, 0.30, 0.05),
}
SYNTHETIC_DEFAULT = (1.0, 0.25, 0.04)


@dataclass(frozen=True)
class Row:
    """One distinct workload request with everything the simulator needs."""

    id: str
    app: str
    input_tokens: int
    prompt_tokens: int
    max_tokens: int
    output_tokens: int  # true generation length, 1..max_tokens
    predicted_tokens: int | None = None  # from the file, when present
    predicted_high: int | None = None  # the predictor's high estimate, from the file, when present


@dataclass
class Workload:
    """Rows plus notes on what was estimated or synthesised."""

    rows: list[Row]
    arrivals: list[float] | None  # the file's ``arrival`` fields, when every row has one
    lengths: str  # "truth" or "synthetic"
    tokens: str  # "file" or "estimated (chars/4)"
    notes: list[str] = field(default_factory=list)


def estimate_tokens(text: str) -> int:
    """Token count estimate: ``ceil(chars / 4)`` (at least 1)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def synthetic_output(
    app: str, max_tokens: int, rng: np.random.Generator, input_tokens: int, expected: float | None = None
) -> int:
    """A synthetic true length: ``expected * LogNormal(0, sigma_app)``, or ``max_tokens`` for a
    runaway share of requests; in ``[1, max_tokens]``. ``expected`` defaults to the application's
    output ratio times ``input_tokens``."""
    ratio, sigma, runaway = SYNTHETIC_APPS.get(app, SYNTHETIC_DEFAULT)
    if expected is None:
        expected = max(1.0, ratio * input_tokens)
    if rng.random() < runaway:
        return max_tokens
    return int(min(max_tokens, max(1, round(expected * math.exp(rng.normal(0.0, sigma))))))


def load_workload(path: str, lengths: str = "auto", seed: int = 0) -> Workload:
    """Read a workload (or truth) JSONL. ``lengths``: ``truth`` (every row must carry
    ``output_tokens``), ``synthetic`` (ignore it) or ``auto`` (truth when every row has it)."""
    raw = [r for r in read_jsonl(path) if "error" not in r]  # failed truth lines carry no lengths
    if not raw:
        raise ValueError(f"{path}: no usable rows")
    has_truth = all("output_tokens" in r for r in raw)
    if lengths == "truth" and not has_truth:
        raise ValueError(f"{path}: --lengths truth but some rows lack output_tokens")
    use_truth = has_truth and lengths != "synthetic"
    has_tokens = all("prompt_tokens" in r and "input_tokens" in r for r in raw)
    rng = np.random.default_rng(seed)
    rows = []
    for r in raw:
        max_tokens = int(r["max_tokens"])
        inp = int(r["input_tokens"]) if "input_tokens" in r else estimate_tokens(r.get("input", ""))
        if "prompt_tokens" in r:
            prompt = int(r["prompt_tokens"])
        else:
            prompt = estimate_tokens(r.get("instruction", "")) + inp + TEMPLATE_TOKENS
        app = str(r.get("app", ""))
        if use_truth:
            out = int(min(max_tokens, max(1, int(r["output_tokens"]))))
        else:
            out = synthetic_output(app, max_tokens, rng, inp)
        pred, high = r.get("predicted_tokens"), r.get("predicted_high")
        rows.append(Row(str(r["id"]), app, inp, prompt, max_tokens, out, None if pred is None else int(pred),
                        None if high is None else int(high)))
    arrivals = [float(r["arrival"]) for r in raw] if all("arrival" in r for r in raw) else None
    notes = []
    if not use_truth:
        notes.append(
            "SYNTHETIC output lengths: a per-app output ratio x input tokens, x LogNormal(0, sigma_app), "
            "plus a per-app share running to max_tokens (bench/sim/workload.py SYNTHETIC_APPS); not "
            "measured on a model"
        )
    if not has_tokens:
        notes.append(f"token counts ESTIMATED as chars/{CHARS_PER_TOKEN} (+{TEMPLATE_TOKENS} template tokens)")
    return Workload(
        rows, arrivals, "truth" if use_truth else "synthetic",
        "file" if has_tokens else f"estimated (chars/{CHARS_PER_TOKEN})", notes,
    )


def predictions(rows: Sequence[Row], mode: str, sigma: float = DEFAULT_NOISE_SIGMA, seed: int = 0) -> list[int]:
    """Predicted generation length per row: ``oracle``, ``noisy`` or ``file``."""
    if mode == "oracle":
        return [r.output_tokens for r in rows]
    if mode == "noisy":
        if sigma < 0:
            raise ValueError("sigma must be >= 0")
        noise = np.exp(np.random.default_rng(seed).normal(0.0, sigma, size=len(rows)))
        return [max(1, round(r.output_tokens * float(z))) for r, z in zip(rows, noise, strict=True)]
    if mode == "file":
        missing = sum(r.predicted_tokens is None for r in rows)
        if missing:
            raise ValueError(f"--prediction file: {missing} rows lack predicted_tokens")
        return [max(1, int(r.predicted_tokens)) for r in rows]  # type: ignore[arg-type]
    raise ValueError(f"unknown prediction mode {mode!r}; use oracle, noisy or file")


def prediction_highs(rows: Sequence[Row], mode: str, points: Sequence[int]) -> list[int]:
    """The high estimate per row: the file's ``predicted_high`` with ``--prediction file`` (the
    point where a row has none), else the point itself (oracle and noisy predictions have no
    calibrated quantile)."""
    if mode != "file":
        return list(points)
    return [max(p, int(r.predicted_high)) if r.predicted_high is not None else p
            for r, p in zip(rows, points, strict=True)]


def sample_indices(n_rows: int, n: int | None, seed: int) -> np.ndarray:
    """Which rows the ``n`` simulated requests are: every row once in file order when ``n`` is
    None, else ``n`` draws with replacement (seeded)."""
    if n is None:
        return np.arange(n_rows)
    if n < 1:
        raise ValueError("n must be >= 1")
    return np.random.default_rng(seed).integers(0, n_rows, size=n)


def pearson_by_app(rows: Sequence[Row]) -> dict[str, float]:
    """Pearson r of input vs output tokens per application (and ``all``)."""
    out: dict[str, float] = {}
    for app in sorted({r.app for r in rows}) + ["all"]:
        mine = [r for r in rows if app == "all" or r.app == app]
        if len(mine) < 3:
            continue
        x = np.array([r.input_tokens for r in mine], dtype=float)
        y = np.array([r.output_tokens for r in mine], dtype=float)
        if x.std() == 0 or y.std() == 0:
            continue
        out[app] = float(np.corrcoef(x, y)[0, 1])
    return out
