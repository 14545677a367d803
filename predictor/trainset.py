"""The predictor's training set: feature rows, true lengths and application texts, persistable."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predictor.features import FEATURE_VERSION, INPUT_TOKENS_COL, N_FEATURES
from predictor.types import CHECKPOINTS

HEAD_K = CHECKPOINTS[-1]  # generated tokens kept per row for the re-predictor

_FORMAT = "magnus-length-trainset"


class ModelMismatchError(ValueError):
    """A model or training-set file was built for another embedder or feature version."""


def check_compatible(what: str, path: str | os.PathLike[str], embedder: str, dim: int, version: int,
                     want_embedder: str | None, want_dim: int | None) -> None:
    """Raise ``ModelMismatchError`` unless ``(embedder, dim, version)`` match what is wanted."""
    problems = []
    if want_embedder is not None and embedder != want_embedder:
        problems.append(f"embedder {embedder!r} (configured: {want_embedder!r})")
    if want_dim is not None and dim != want_dim:
        problems.append(f"embedding dimension {dim} (configured embedder gives {want_dim})")
    if version != FEATURE_VERSION:
        problems.append(f"feature version {version} (this code: {FEATURE_VERSION})")
    if problems:
        raise ModelMismatchError(
            f"refusing {what} {os.fspath(path)}: it was built with " + "; ".join(problems)
            + f". Retrain it (magnus predictor train --embedder {want_embedder or embedder}) "
            "or configure the embedder it was built with."
        )


@dataclass
class TrainingSet:
    """Rows for the regressor. ``apps[i]`` is the application-level text of row ``i``.

    ``served_model`` names the served LLM whose generation lengths the rows hold (None: not
    recorded, e.g. files written before it was).
    """

    embedder: str
    dim: int
    X: np.ndarray = field(default_factory=lambda: np.zeros((0, N_FEATURES), dtype=np.float32))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    apps: list[str] = field(default_factory=list)
    feature_version: int = FEATURE_VERSION
    served_model: str | None = None
    # each row's max_tokens (0: unknown). A length at its max_tokens is censored: a lower bound
    max_tokens: np.ndarray | None = None
    # each row's first HEAD_K generated token ids, -1 padded (all -1: unknown); the re-predictor's data
    heads: np.ndarray | None = None
    # the served model's view of each prompt (predictor.probe), (rows, probe dim); None: not probed
    Z: np.ndarray | None = None
    probe: str | None = None  # the probe that made Z (predictor.probe.PromptProbe.name)
    # head states (predictor.probe.head_state_means), (rows, len(CHECKPOINTS), hidden size), float16,
    # NaN where unknown; None: none. ``states`` names the layer that made them (probe_name): the
    # probe's (form probe), or a worker's reports / an offline probe forward (other forms)
    H: np.ndarray | None = None
    states: str | None = None

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32).reshape(-1, N_FEATURES)
        self.y = np.asarray(self.y, dtype=np.float32).reshape(-1)
        if self.max_tokens is None:
            self.max_tokens = np.zeros(len(self.y), dtype=np.float32)
        self.max_tokens = np.asarray(self.max_tokens, dtype=np.float32).reshape(-1)
        if self.heads is None:
            self.heads = np.full((len(self.y), HEAD_K), -1, dtype=np.int32)
        self.heads = np.asarray(self.heads, dtype=np.int32).reshape(-1, HEAD_K)
        if not (len(self.X) == len(self.y) == len(self.apps) == len(self.max_tokens) == len(self.heads)):
            raise ValueError("X, y, apps, max_tokens and heads must have the same length")
        if (self.Z is None) != (self.probe is None):
            raise ValueError("probe features Z and the probe's name go together")
        if self.Z is not None:
            self.Z = np.ascontiguousarray(self.Z, dtype=np.float32)
            if self.Z.ndim != 2 or len(self.Z) != len(self.y):
                raise ValueError("Z must hold one row of probe features per row")
        if self.H is None:
            self.states = None
        else:
            self.states = self.states or self.probe  # sets from before ``states``: the probe's
            if self.states is None:
                raise ValueError("head states H need the name of the layer that made them (states)")
            self.H = np.asarray(self.H, dtype=np.float16)
            if self.H.ndim != 3 or self.H.shape[:2] != (len(self.y), len(CHECKPOINTS)):
                raise ValueError("H must hold (rows, checkpoints, hidden size) head states")

    @staticmethod
    def pack_heads(heads: list[list[int]] | list[Any]) -> np.ndarray:
        """Rows of token ids (any length; empty: unknown) as the -1 padded ``heads`` array."""
        out = np.full((len(heads), HEAD_K), -1, dtype=np.int32)
        for i, h in enumerate(heads):
            ids = list(h or [])[:HEAD_K]
            out[i, : len(ids)] = ids
        return out

    def head(self, i: int) -> list[int]:
        """Row ``i``'s known first generated tokens (empty: unknown)."""
        assert self.heads is not None
        row = self.heads[i]
        return [int(t) for t in row[row >= 0]]

    @property
    def censored(self) -> np.ndarray:
        """Rows whose length reached their known max_tokens (runaways: the true length is at least y)."""
        return (self.max_tokens > 0) & (self.y >= self.max_tokens)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_tokens(self) -> np.ndarray:
        return self.X[:, INPUT_TOKENS_COL]

    def extended(self, X: np.ndarray, y: np.ndarray, apps: list[str],
                 max_tokens: np.ndarray | None = None, heads: np.ndarray | None = None,
                 Z: np.ndarray | None = None, H: np.ndarray | None = None,
                 states: str | None = None) -> TrainingSet:
        """A new training set with the rows appended (the original is left untouched). A probed
        set needs ``Z`` for the new rows; an unprobed one takes none. A set with head states keeps
        them: the new rows' ``H`` (NaN where unknown, and when not given); a set without them
        starts them with these rows' ``H`` (named ``states``; NaN for the rows it had)."""
        caps = np.zeros(len(y)) if max_tokens is None else np.asarray(max_tokens)
        new_heads = np.full((len(y), HEAD_K), -1, dtype=np.int32) if heads is None else heads
        assert self.max_tokens is not None and self.heads is not None
        if (Z is None) != (self.Z is None):
            raise ValueError("probe features must be given exactly when the training set has them")
        new_Z = None if self.Z is None else np.vstack([self.Z, np.asarray(Z, dtype=np.float32)])
        new_H, new_states = None, self.states
        if self.H is not None:
            add = np.full((len(y), *self.H.shape[1:]), np.nan, dtype=np.float16) if H is None else H
            new_H = np.concatenate([self.H, np.asarray(add, dtype=np.float16)])
        elif H is not None and states is not None:
            old = np.full((len(self), *np.shape(H)[1:]), np.nan, dtype=np.float16)
            new_H, new_states = np.concatenate([old, np.asarray(H, dtype=np.float16)]), states
        return TrainingSet(self.embedder, self.dim, np.vstack([self.X, np.asarray(X, dtype=np.float32)]),
                           np.concatenate([self.y, np.asarray(y, dtype=np.float32)]),
                           self.apps + list(apps), self.feature_version, self.served_model,
                           np.concatenate([self.max_tokens, caps.astype(np.float32)]),
                           np.vstack([self.heads, np.asarray(new_heads, dtype=np.int32).reshape(-1, HEAD_K)]),
                           new_Z, self.probe, new_H, new_states)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickled objects) with the metadata as a JSON string."""
        uniq = list(dict.fromkeys(self.apps))
        index = {a: i for i, a in enumerate(uniq)}
        meta = {"format": _FORMAT, "embedder": self.embedder, "dim": self.dim,
                "feature_version": self.feature_version, "served_model": self.served_model, "probe": self.probe,
                "states": self.states}
        probed = {} if self.Z is None else {"Z": self.Z}
        if self.H is not None:
            probed["H"] = self.H
        return {**probed, "X": self.X, "y": self.y, "max_tokens": np.asarray(self.max_tokens, dtype=np.float32),
                "heads": np.asarray(self.heads, dtype=np.int32),
                "app_idx": np.array([index[a] for a in self.apps], dtype=np.int32),
                "app_texts": np.array(uniq, dtype=np.str_), "meta": np.array(json.dumps(meta))}

    @classmethod
    def from_arrays(cls, arrs: dict[str, np.ndarray] | np.lib.npyio.NpzFile) -> TrainingSet:
        meta = json.loads(str(arrs["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError("not a magnus training set")
        app_texts = [str(a) for a in arrs["app_texts"]]
        apps = [app_texts[i] for i in np.asarray(arrs["app_idx"])]
        caps = arrs["max_tokens"] if "max_tokens" in arrs else None  # files from before: unknown
        heads = arrs["heads"] if "heads" in arrs else None
        probe = meta.get("probe")
        return cls(meta["embedder"], int(meta["dim"]), arrs["X"], arrs["y"], apps,
                   int(meta["feature_version"]), meta.get("served_model"), caps, heads,
                   arrs["Z"] if probe is not None else None, probe,
                   arrs["H"] if "H" in arrs else None, meta.get("states"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` file atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **self.to_arrays())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], want_embedder: str | None = None,
             want_dim: int | None = None) -> TrainingSet:
        """Read a file written by ``save``; refuses (``ModelMismatchError``) other embedders/versions."""
        with np.load(path, allow_pickle=False) as arrs:
            ts = cls.from_arrays(arrs)
        check_compatible("training set", path, ts.embedder, ts.dim, ts.feature_version,
                         want_embedder, want_dim)
        return ts
