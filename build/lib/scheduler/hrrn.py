"""Highest-response-ratio-next batch choice (DESIGN §2.4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scheduler.wma import WaitingBatch

_MIN_TP = 1e-6  # seconds; keeps the ratio finite for a (mis)estimated zero-time batch


def response_ratio(waited: float, processing: float) -> float:
    """``(T_w + T_p) / T_p``."""
    tp = max(processing, _MIN_TP)
    return (max(waited, 0.0) + tp) / tp


def pick_hrrn(
    batches: Sequence[WaitingBatch],
    processing_times: Callable[[Sequence[WaitingBatch]], Sequence[float]],
    now: float,
) -> WaitingBatch | None:
    """The batch with the highest response ratio, ``T_w`` counted from its earliest arrival and
    ``T_p = processing_times(batches)[i]`` (one vectorised call). Ties go to the earliest arrival."""
    if not batches:
        return None
    tps = processing_times(batches)
    best, best_key = None, None
    for b, tp in zip(batches, tps, strict=True):
        key = (response_ratio(now - b.since, tp), -b.since)
        if best_key is None or key > best_key:
            best, best_key = b, key
    return best
