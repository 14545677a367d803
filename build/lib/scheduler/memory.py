"""Memory model of a static batch (DESIGN §2.2, §4).

``MEM(B) = |B| * (L(B) + G(B)) * Delta`` where ``Delta`` is the key+value cache of one token:
``2 * layers * kv_heads * head_dim * bytes`` (grouped-/multi-query attention counts only the KV
heads). ``Theta`` is what a worker has left for the KV cache once the weights are loaded.

An optional prefill-activation term covers the transient tensors of the prompt forward pass:
``|B| * L(B) * act_per_token``. It is only live during prefill, when the cache holds ``L(B)``
tokens, so the peak is ``max(|B| L (Delta + act), |B| (L + G) Delta)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Default multiple of ``hidden_size * dtype_bytes`` for the prefill activations of one prompt
#: token. Reasoning: the largest live intermediates of a decoder layer are in the MLP, whose
#: width is ~2.7-4x hidden; a gated MLP holds gate, up and their product (~3 x 4h = 12h) while
#: the residual stream and the attention output add a few more h. Logits are excluded because
#: recent ``generate`` computes them for the last position only (``logits_to_keep``); with
#: eager attention the ``L x L`` score matrix is also excluded (SDPA/flash never materialise it).
#: An estimate, to be replaced by a measured figure.
DEFAULT_ACT_FACTOR = 12.0

_ALIASES: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads", "multi_query_group_num", "n_head_kv"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "head_dim": ("head_dim", "kv_channels"),
}


def cfg_get(cfg_like: Any, *names: str, default: Any = None) -> Any:
    """First present, non-None attribute or key among ``names`` of an object or mapping."""
    for name in names:
        value = cfg_like.get(name) if isinstance(cfg_like, Mapping) else getattr(cfg_like, name, None)
        if value is not None:
            return value
    return default


def config_dims(cfg_like: Any) -> dict[str, int]:
    """``layers``, ``heads``, ``kv_heads``, ``hidden``, ``head_dim`` of a transformers-style config
    (object or dict). ``kv_heads`` defaults to the attention heads, ``head_dim`` to
    ``hidden // heads``. ChatGLM's ``multi_query_group_num`` counts only when
    ``multi_query_attention`` is set."""
    layers = cfg_get(cfg_like, *_ALIASES["layers"])
    heads = cfg_get(cfg_like, *_ALIASES["heads"])
    hidden = cfg_get(cfg_like, *_ALIASES["hidden"])
    if layers is None or heads is None:
        raise ValueError("config lacks the number of layers or attention heads")
    if cfg_get(cfg_like, "multi_query_attention") is False:
        kv_heads = heads
    else:
        kv_heads = cfg_get(cfg_like, *_ALIASES["kv_heads"], default=heads)
    head_dim = cfg_get(cfg_like, *_ALIASES["head_dim"])
    if head_dim is None:
        if hidden is None:
            raise ValueError("config lacks head_dim and hidden_size")
        head_dim = hidden // heads
    if hidden is None:
        hidden = heads * head_dim
    return {
        "layers": int(layers),
        "heads": int(heads),
        "kv_heads": int(kv_heads),
        "hidden": int(hidden),
        "head_dim": int(head_dim),
    }


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: float) -> float:
    """Delta: bytes of key and value cache for one token, ``2 * layers * kv_heads * head_dim * bytes``."""
    if min(num_layers, num_kv_heads, head_dim) < 1 or dtype_bytes <= 0:
        raise ValueError("dimensions and dtype_bytes must be positive")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def delta_from_config(cfg_like: Any, dtype_bytes: float) -> float:
    """Delta of a transformers config object (or dict); see :func:`config_dims`."""
    d = config_dims(cfg_like)
    return kv_bytes_per_token(d["layers"], d["kv_heads"], d["head_dim"], dtype_bytes)


def act_bytes_per_token(hidden: int, dtype_bytes: float, factor: float = DEFAULT_ACT_FACTOR) -> float:
    """Estimated transient prefill activation bytes per prompt token (``factor * hidden * bytes``)."""
    return factor * hidden * dtype_bytes


def batch_kv_bytes(size: int, max_prompt: int, max_gen: int, delta: float) -> float:
    """``MEM(B) = |B| * (L(B) + G(B)) * Delta``."""
    return size * (max_prompt + max_gen) * delta


@dataclass(frozen=True)
class MemoryModel:
    """Answers "does a batch of this shape fit?"; the assembler decides what to do about it."""

    delta: float  # Delta: KV-cache bytes per token
    theta: float  # Theta: bytes available for the KV cache (and prefill activations) on a worker
    act_per_token: float = 0.0  # transient prefill activation bytes per prompt token; 0 ignores them

    def __post_init__(self) -> None:
        if self.delta <= 0 or self.theta <= 0 or self.act_per_token < 0:
            raise ValueError("delta and theta must be > 0, act_per_token >= 0")

    def mem(self, size: int, max_prompt: int, max_gen: int) -> float:
        """Peak bytes of a batch: the KV cache at the last step, or prefill KV plus activations."""
        kv_end = batch_kv_bytes(size, max_prompt, max_gen, self.delta)
        if not self.act_per_token:
            return kv_end
        return max(kv_end, size * max_prompt * (self.delta + self.act_per_token))

    def fits(self, size: int, max_prompt: int, max_gen: int) -> bool:
        """Whether ``MEM(B) <= Theta``."""
        return self.mem(size, max_prompt, max_gen) <= self.theta

    def max_batch(self, max_prompt: int, max_gen: int) -> int:
        """The largest batch size of this shape that fits (0 when not even one request fits)."""
        per_req = self.mem(1, max_prompt, max_gen)
        return int(self.theta // per_req) if per_req > 0 else 0

    @classmethod
    def for_device(
        cls,
        delta: float,
        device_bytes: float,
        weight_bytes: float,
        reserve_frac: float = 0.1,
        act_per_token: float = 0.0,
    ) -> MemoryModel:
        """Theta = device memory minus weights minus a reserve (framework, fragmentation)."""
        theta = device_bytes * (1.0 - reserve_frac) - weight_bytes
        if theta <= 0:
            raise ValueError("the weights do not leave any memory for the KV cache")
        return cls(delta=delta, theta=theta, act_per_token=act_per_token)
