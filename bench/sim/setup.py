"""What a simulation runs on: the model and hardware profiles (or a fit to a server's batch log),
and the policies built by the shared builder (``scheduler.builder``)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.builder import PolicySettings, build_scheduler, served_profile
from scheduler.costmodel import (
    MODELS,
    CostModel,
    HardwareProfile,
    ModelProfile,
    fit_hardware_continuous,
    get_hardware,
)
from scheduler.policy import Policy

DTYPES = {"float16": 2.0, "bfloat16": 2.0, "float32": 4.0}


# -- cost models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostSetup:
    """What the simulated workers cost and what Magnus's estimator starts from."""

    model: ModelProfile
    hw: HardwareProfile  # the workers' ground truth: fitted to a batch log, or the analytical profile
    prior_hw: HardwareProfile  # the analytical profile (the server's cold-start prior)
    source: str

    def cost(self, policy: str) -> CostModel:
        return CostModel(served_profile(policy, self.model), self.hw)


def load_model_profile(name_or_path: str, dtype: str = "float16") -> ModelProfile:
    """A built-in profile (``ChatGLM-6B``) or one from a HF ``config.json``, at ``dtype``."""
    nbytes = DTYPES[dtype]
    if name_or_path in MODELS:
        base = MODELS[name_or_path]
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ValueError(f"unknown model profile {name_or_path!r}: not one of {sorted(MODELS)} nor a config.json")
        base = ModelProfile.from_config(json.loads(path.read_text()), name=path.parent.name or path.stem)
    return replace(base, dtype_bytes=nbytes, weight_bits=8 * nbytes)


def read_batch_log(
    db: str | Path, window: tuple[float, float] | None = None
) -> list[tuple[int, int, int | tuple[int, ...], float]]:
    """``(size, L(B), G(B), seconds)`` of the finished (not OOM) batches in a server log; with
    ``window`` (wall-clock seconds), only the batches that started within it. For a batch whose
    rows left as they ended (early exit: its row-steps ``total_tokens`` equal the sum of its
    requests' lengths), ``G(B)`` is the tuple of those lengths, as ``fit_hardware`` takes it."""
    lo, hi = window if window is not None else (-math.inf, math.inf)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT id, size, max_prompt, max_gen, prefill_s, decode_s, start, end, total_tokens FROM batches "
            "WHERE COALESCE(oom, 0) = 0 AND size > 0 AND max_gen > 0 AND start >= ? AND start <= ?", (lo, hi)
        ).fetchall()
        gens: dict[int, list[int]] = {}
        for batch_id, n in conn.execute("SELECT batch_id, completion_tokens FROM requests WHERE status = 'ok'"):
            gens.setdefault(batch_id, []).append(int(n))
    out: list[tuple[int, int, int | tuple[int, ...], float]] = []
    for bid, size, L, G, pre, dec, start, end, total in rows:
        secs = end - start if start is not None and end is not None and end > start else (pre or 0) + (dec or 0)
        if secs <= 0:
            continue
        mine = gens.get(bid, [])
        shrinking = len(mine) == size and total is not None and total == sum(mine) < size * G
        out.append((int(size), int(L), tuple(mine) if shrinking else int(G), float(secs)))
    return out


def read_continuous_log(
    db: str | Path, window: tuple[float, float] | None = None
) -> list[list[tuple[float, float, float, int, int]]] | None:
    """An iteration-level worker's rows ``(start, end, prefill_s, cached, generated)`` per worker
    (as ``fit_hardware_continuous`` takes them), or None when the log holds static batches: a
    continuous worker logs each request as a one-row batch, and rows on one worker overlap."""
    lo, hi = window if window is not None else (-math.inf, math.inf)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT worker, size, start, end, COALESCE(prefill_s, 0), max_prompt, max_gen, valid_tokens FROM batches "
            "WHERE COALESCE(oom, 0) = 0 AND size > 0 AND max_gen > 0 AND start IS NOT NULL AND end > start "
            "AND start >= ? AND start <= ? ORDER BY start", (lo, hi)
        ).fetchall()
    if not rows or any(size != 1 for _w, size, *_ in rows):
        return None
    workers: dict[int, list[tuple[float, float, float, int, int]]] = {}
    for w, _size, start, end, pre, L, G, valid in rows:
        made = int(valid if valid is not None else G)
        workers.setdefault(int(w or 0), []).append((float(start), float(end), float(pre), int(L) + int(G) - made, made))
    overlap = any(b[0] < a[1] for rs in workers.values() for a, b in zip(rs, rs[1:], strict=False))
    return list(workers.values()) if overlap else None


def cost_setup(
    hardware: str, model: ModelProfile, fit_log: str | Path | None = None,
    window: tuple[float, float] | None = None, padded: bool = False,
) -> CostSetup:
    """The analytical model, or (with ``fit_log``) the hardware figures fitted to that log's
    batches (those that started within ``window``, when given); ``padded``: an iteration-level
    worker's steps read every row at the longest row's length (``fit_hardware_continuous``)."""
    prior = get_hardware(hardware)
    if fit_log is None:
        return CostSetup(model, prior, prior, f"analytical: {model.name} on {prior.name}")
    scope = " started during the replayed run" if window else ""
    continuous = read_continuous_log(fit_log, window)
    if continuous is not None:
        fitted = fit_hardware_continuous(model, continuous, prior, padded=padded)
        what = f"{sum(map(len, continuous))} rows of an iteration-level worker ({'padded' if padded else 'packed'} cache)"
    else:
        samples = read_batch_log(fit_log, window)
        if len(samples) < 2:
            raise ValueError(f"{fit_log}: need at least two finished batches to fit, found {len(samples)}"
                             + (" in the replayed run's time window" if window else ""))
        fitted = CostModel(model, prior).fitted(samples).hw
        what = f"{len(samples)} batches"
    return CostSetup(model, fitted, prior, (
        f"fitted to {what}{scope} of {fit_log} ({model.name} on {prior.name}: mfu {fitted.mfu:.3g}, "
        f"mbu {fitted.mbu:.3g}, step overhead {fitted.step_overhead_s:.3g} s, batch overhead "
        f"{fitted.batch_overhead_s:.3g} s)"
    ))


# -- policies --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyParams:
    """Policy knobs; None keeps each policy's own default (as ``make_policy``)."""

    batch_size: int | None = None
    max_wait: float | None = None
    min_wait: float | None = None
    phi: float | None = None
    max_batch_size: int | None = None
    reserve_frac: float = 0.1  # Theta = device memory x (1 - reserve) - weights
    estimator_interval_s: float = 120.0
    swap_factor: float | None = None  # pcb's order-swap preemption threshold


def build_policy(name: str, setup: CostSetup, params: PolicyParams) -> Policy:
    """The policy as the server builds it (``scheduler.builder``), with Theta from the cost model
    of its workers and the analytical profile as the estimator's prior."""
    settings = PolicySettings(name, params.batch_size, params.max_wait, params.min_wait, params.phi,
                              params.max_batch_size, params.estimator_interval_s,
                              swap_factor=params.swap_factor)
    return build_scheduler(settings, setup.model, setup.hw, reserve_frac=params.reserve_frac,
                           prior=setup.prior_hw).policy
