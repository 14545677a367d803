"""Predictor features (DESIGN section 2.1): compressed embeddings plus the user input length.

The feature vector of one request is ``[compress(v_user, 16), compress(v_app, 4), input_tokens]``
(21 values). ``compress`` splits an embedding into groups of consecutive dimensions and
replaces each group by ``sum(group) / sqrt(len(group))``.

When ``d`` is not divisible by the group count, the groups follow ``np.array_split``: the first
``d % groups`` groups hold ``d // groups + 1`` dimensions, the others ``d // groups``, and each
group sum is divided by the square root of *its own* size. (For the paper's LaBSE, d = 768, and
the default all-MiniLM-L6-v2, d = 384, every group has the same size.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from predictor.embedder import Embedder

#: Bump whenever the meaning of the feature vector changes; model files record it.
FEATURE_VERSION = 1
D_USER = 16
D_APP = 4
N_FEATURES = D_USER + D_APP + 1
#: Column of the user input length (in the served model's tokens) in the feature vector.
INPUT_TOKENS_COL = D_USER + D_APP


def group_bounds(d: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each group of ``d`` dimensions split into ``groups`` (array_split)."""
    if groups <= 0 or d < groups:
        raise ValueError(f"cannot split {d} dimensions into {groups} groups")
    sizes = np.full(groups, d // groups, dtype=np.int64)
    sizes[: d % groups] += 1
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return starts, sizes


def compress(v: np.ndarray, groups: int) -> np.ndarray:
    """Group-sum compression of the last axis of ``v`` to ``groups`` values.

    Each group becomes the sum of its values divided by the square root of the group size.
    Works on one vector ``(d,)`` or a batch ``(n, d)``.
    """
    v = np.asarray(v, dtype=np.float64)
    starts, sizes = group_bounds(v.shape[-1], groups)
    return np.add.reduceat(v, starts, axis=-1) / np.sqrt(sizes)


def build_features(v_user: np.ndarray, v_app: np.ndarray,
                   input_tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Feature matrix ``(n, 21)`` (float32) from embeddings ``(n, d)`` and input lengths ``(n,)``."""
    tokens = np.asarray(input_tokens, dtype=np.float64).reshape(-1, 1)
    if not (len(v_user) == len(v_app) == len(tokens)):
        raise ValueError("v_user, v_app and input_tokens must have the same length")
    feats = np.hstack([compress(v_user, D_USER), compress(v_app, D_APP), tokens])
    return np.ascontiguousarray(feats, dtype=np.float32)


class FeatureExtractor:
    """Turns (application text, user text, input length) triples into feature vectors.

    Application texts (instructions, system prompts) repeat across requests, so they go through
    the embedder's LRU cache; user texts are embedded fresh. An empty application text is
    embedded as ``""`` like any other text, so "no instruction" is a consistent application.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    def transform(
        self,
        app_texts: Sequence[str],
        user_texts: Sequence[str],
        input_tokens: Sequence[int] | np.ndarray,
        show_progress: bool = False,
        user: bool = True,
    ) -> np.ndarray:
        """Feature matrix ``(n, 21)``; blocking (runs the embedding model). ``user=False``: the user
        texts are not embedded (their 16 values are 0), for a model that does not read them."""
        if not (len(app_texts) == len(user_texts) == len(input_tokens)):
            raise ValueError("app_texts, user_texts and input_tokens must have the same length")
        if len(user_texts) == 0:
            return np.zeros((0, N_FEATURES), dtype=np.float32)
        v_app = self.embedder.encode_cached([t or "" for t in app_texts])
        if not user:
            return build_features(np.zeros((len(user_texts), v_app.shape[1])), v_app, input_tokens)
        v_user = self.embedder.encode([t or "" for t in user_texts], show_progress=show_progress)
        return build_features(v_user, v_app, input_tokens)
