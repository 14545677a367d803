"""A KV cache that grows in place: a decode step writes its column into spare room.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the layer's whole cache every step. On CPU that copy dominates long contexts: one decode step of
the default model at 32 rows and 750 cached columns takes 260 ms with it and 197-207 ms in place;
at 1,500 columns 860 ms against 272 ms (``bench/results/kv_cache_cpu.md``, ``python -m
bench.kv_cache``). ``GrowableLayer`` keeps each layer's keys and values in a buffer with
``headroom`` spare columns and exposes the filled part as views, so a step copies only its new
column; the buffer is reallocated (one copy) when the room runs out, or when someone replaces
``keys``/``values`` (a runner merging joiners or trimming padding), which it notices at the next
update.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GrowableLayer(DynamicLayer):
    """``DynamicLayer`` with ``headroom`` spare columns: appends are in-place writes."""

    def __init__(self, headroom: int = 64) -> None:
        super().__init__()
        self.headroom = max(int(headroom), 1)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._kview: torch.Tensor | None = None  # the view last handed out as ``keys``
        self._len = 0

    @classmethod
    def adopting(cls, layer: DynamicLayer, headroom: int) -> GrowableLayer:
        """A growable layer holding ``layer``'s keys and values (copied at its first update)."""
        g = cls(headroom)
        if layer.is_initialized:
            g.device, g.is_initialized = layer.device, True
            g.keys, g.values = layer.keys, layer.values
        return g

    def _owned(self) -> bool:
        return self._kbuf is not None and self.keys is self._kview

    def _views(self) -> None:
        self.keys = self._kview = self._kbuf[:, :, :self._len]
        self.values = self._vbuf[:, :, :self._len]

    def _adopt(self, extra: int) -> None:
        """Copy the current keys and values into fresh buffers with room for ``extra`` + headroom."""
        k, v = self.keys, self.values
        b, h, n, _ = k.shape
        cap = n + extra + self.headroom
        self._kbuf = k.new_empty((b, h, cap, k.shape[-1]))
        self._vbuf = v.new_empty((b, v.shape[1], cap, v.shape[-1]))
        self._kbuf[:, :, :n] = k
        self._vbuf[:, :, :n] = v
        self._len = n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.numel() == 0:  # nothing cached yet: the first states start the buffer
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        n = key_states.shape[-2]
        if not self._owned() or self._len + n > self._kbuf.shape[2]:
            self._adopt(n)
        self._kbuf[:, :, self._len:self._len + n] = key_states
        self._vbuf[:, :, self._len:self._len + n] = value_states
        self._len += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self._owned():
            super().batch_select_indices(indices)
            return
        self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]  # the spare room goes along
        self._views()

    def reset(self) -> None:
        self._kbuf = self._vbuf = self._kview = None
        self._len = 0
        super().reset()


def grow_in_place(cache, headroom: int):
    """Turn ``cache``'s plain ``DynamicLayer`` layers into ``GrowableLayer`` (others, e.g. sliding
    window layers, stay as they are). ``headroom`` 0 leaves the cache untouched. Returns ``cache``."""
    if headroom > 0 and cache is not None and hasattr(cache, "layers"):
        cache.layers = [GrowableLayer.adopting(layer, headroom) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers]
    return cache
