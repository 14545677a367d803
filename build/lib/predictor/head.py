"""Features of a running request's first generated tokens (its "head"): how repetitive it already is.

A greedy small model that runs away repeats itself: a phrase, a line, a token. These features
measure that on token ids only (no tokenizer needed), so the scheduler can re-predict a running
request's length from what the worker reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

#: Names of ``head_features``' values, in order.
HEAD_FEATURES = ("k", "distinct_share", "top1_share", "top2gram_share", "top3gram_share", "top4gram_share",
                 "periodicity", "tail_periodicity", "tail_distinct_share", "longest_repeat",
                 "longest_repeat_share", "best_shift_match_share")


def _periodicity(a: np.ndarray, max_period: int) -> float:
    """Best share, over periods ``p <= max_period``, of the second half's tokens equal to the one ``p`` before."""
    n = len(a)
    best = 0.0
    for p in range(1, max_period + 1):
        if n < 2 * p:
            break
        lo = max(p, n // 2)
        best = max(best, float((a[lo:] == a[lo - p:n - p]).mean()))
    return best


def head_features(head_ids: Sequence[int]) -> np.ndarray:
    """The ``HEAD_FEATURES`` of the generated tokens ``head_ids`` (at least one)."""
    a = np.asarray(head_ids, dtype=np.int64)
    k = len(a)
    if k == 0:
        raise ValueError("head_ids must not be empty")
    out = [float(k), len(np.unique(a)) / k]
    for n in (1, 2, 3, 4):
        grams = Counter(tuple(a[i:i + n]) for i in range(k - n + 1))
        out.append(max(grams.values()) / max(k - n + 1, 1) if grams else 0.0)
    out.append(_periodicity(a, 16))
    tail = a[-16:]
    out.append(_periodicity(tail, 8))
    out.append(len(np.unique(tail)) / len(tail))
    # the longest run of tokens equal to those some shift earlier = the longest repeated substring
    longest, matched = 0, 0
    for p in range(1, k):
        eq = np.concatenate(([0], (a[p:] == a[:-p]).astype(np.int8), [0]))
        d = np.diff(eq)
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        if len(starts):
            longest = max(longest, int((ends - starts).max()))
            matched = max(matched, int(eq.sum()))
    out += [float(longest), longest / k, matched / k]
    return np.asarray(out, dtype=np.float64)
