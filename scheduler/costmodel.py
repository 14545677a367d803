"""Analytical batch-time model after Pope et al. (DESIGN §4).

A static batch of ``b`` requests, prompt ``L`` (padded) and ``G`` generated tokens runs one
prefill forward pass (which yields the first token) and ``n = G - 1`` decode steps.

* prefill: ``max(2 P b L / F, W / BW)`` -- compute-bound except for tiny prompts, where the floor
  is reading the weights once;
* decode step ``j`` (1..n): ``(W + b (L + j) Delta) / BW + 2 P b / F + s`` -- memory-bound floor
  (weights plus the batch's KV cache) plus the matmul FLOPs and a fixed per-step overhead ``s``;
* summed in closed form: ``n W/BW + b Delta (n L + n (n + 1) / 2) / BW + 2 P b n / F + n s``;
* plus a per-batch overhead ``c``.

``F = peak_flops * mfu`` and ``BW = mem_bandwidth * mbu`` are the effective figures. They, ``s``
and ``c`` can be fitted to observed ``(size, L, G, seconds)`` tuples with :func:`fit_hardware`
(non-negative least squares; the prefill ``max`` is resolved by iterating on the active branch),
and to an iteration-level worker's overlapping rows with :func:`fit_hardware_continuous`.
Attention FLOPs (``~4 layers hidden L`` per token) are left out: small next to ``2P`` for the
prompt lengths served here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from scheduler.memory import (
    DEFAULT_ACT_FACTOR,
    MemoryModel,
    act_bytes_per_token,
    cfg_get,
    config_dims,
    kv_bytes_per_token,
)

GiB = 1024**3


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator (or this CPU) as the cost model sees it."""

    name: str
    peak_flops: float  # dense FLOP/s at the serving dtype
    mem_bandwidth: float  # bytes/s
    mem_bytes: float  # device memory, bytes
    mfu: float = 0.5  # achieved fraction of peak FLOP/s (model FLOPS utilization)
    mbu: float = 0.7  # achieved fraction of memory bandwidth
    step_overhead_s: float = 0.0  # fixed cost of a decode step (launches, sampling, Python)
    batch_overhead_s: float = 0.0  # fixed cost per batch (tokenization, padding, transfers)

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.mem_bandwidth <= 0 or self.mem_bytes <= 0:
            raise ValueError("peak_flops, mem_bandwidth and mem_bytes must be positive")
        if self.mfu <= 0 or self.mbu <= 0 or self.step_overhead_s < 0 or self.batch_overhead_s < 0:
            raise ValueError("efficiencies must be positive and overheads non-negative")

    @property
    def flops(self) -> float:
        """Effective FLOP/s."""
        return self.peak_flops * self.mfu

    @property
    def bandwidth(self) -> float:
        """Effective bytes/s."""
        return self.mem_bandwidth * self.mbu


#: Datasheet figures (dense fp16/bf16 tensor-core peak, HBM bandwidth). The efficiencies are
#: typical of a plain transformers static-batch engine, not of a tuned kernel stack.
HARDWARE: dict[str, HardwareProfile] = {
    "V100-32GB": HardwareProfile("V100-32GB", 125e12, 900e9, 32 * GiB, mfu=0.4, mbu=0.7),
    "A100-80GB": HardwareProfile("A100-80GB", 312e12, 2.039e12, 80 * GiB, mfu=0.5, mbu=0.75),
    "H100-80GB": HardwareProfile("H100-80GB", 989e12, 3.35e12, 80 * GiB, mfu=0.5, mbu=0.75),
    # Placeholder for this machine (2 cores, AVX2 FMA ~ 2 x 2.5 GHz x 32 FLOP/cycle, DDR ~20 GB/s);
    # meant to be replaced by fit_hardware() on a real batch log.
    "cpu-local": HardwareProfile(
        "cpu-local", 1.6e11, 2e10, 16 * GiB, mfu=0.3, mbu=0.5, step_overhead_s=0.01, batch_overhead_s=0.05
    ),
}


def get_hardware(name: str) -> HardwareProfile:
    """A built-in profile by name (``cpu-local`` takes this machine's memory size)."""
    if name not in HARDWARE:
        raise KeyError(f"unknown hardware profile {name!r}; known: {sorted(HARDWARE)}")
    hw = HARDWARE[name]
    if name == "cpu-local":
        try:
            hw = replace(hw, mem_bytes=float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))
        except (ValueError, OSError, AttributeError):
            pass
    return hw


@dataclass(frozen=True)
class ModelProfile:
    """The numbers of a served model the cost and memory models need."""

    name: str
    params: float  # parameter count
    layers: int
    kv_heads: int  # key/value heads (GQA/MQA)
    head_dim: int
    hidden: int
    dtype_bytes: float = 2.0  # activations and KV cache
    weight_bits: float = 16.0  # 4 for a 4-bit quantized model (VSQ)

    def __post_init__(self) -> None:
        if self.params <= 0 or min(self.layers, self.kv_heads, self.head_dim, self.hidden) < 1:
            raise ValueError("model dimensions must be positive")

    @property
    def delta(self) -> float:
        """KV-cache bytes per token."""
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype_bytes)

    @property
    def weight_bytes(self) -> float:
        """Bytes the weights occupy in memory."""
        return self.params * self.weight_bits / 8

    @property
    def weight_traffic_bytes(self) -> float:
        """Bytes moved per forward pass to use the weights. Quantized weights (bitsandbytes-style)
        are read packed and dequantized to the compute dtype before the matmul, so they cost
        their packed size plus one pass in the compute dtype: less memory, not less traffic."""
        if self.weight_bits >= 8 * self.dtype_bytes:
            return self.weight_bytes
        return self.weight_bytes + self.params * self.dtype_bytes

    def quantized(self, bits: float) -> ModelProfile:
        """The same model with ``bits``-bit weights (the KV cache keeps its dtype)."""
        return replace(self, name=f"{self.name}-int{bits:g}", weight_bits=bits)

    @classmethod
    def from_config(
        cls, cfg_like: Any, dtype_bytes: float = 2.0, params: float | None = None, name: str = ""
    ) -> ModelProfile:
        """From a transformers config (object or dict). Without ``params`` the count is estimated:
        per layer ``2h(h + kv_dim)`` attention + ``3 h I`` (gated, SiLU) or ``2 h I`` MLP, plus
        embeddings (untied output counted twice)."""
        d = config_dims(cfg_like)
        if params is None:
            h = d["hidden"]
            inter = cfg_get(cfg_like, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * h)
            vocab = cfg_get(cfg_like, "vocab_size", "padded_vocab_size", default=0)
            kv_dim = d["kv_heads"] * d["head_dim"]
            act = str(cfg_get(cfg_like, "hidden_act", "activation_function", default="")).lower()
            mlp_mats = 3 if act in ("silu", "swish", "swiglu") else 2  # gated (Llama-style) or not
            per_layer = 2 * h * (h + kv_dim) + mlp_mats * h * inter
            tied = bool(cfg_get(cfg_like, "tie_word_embeddings", default=False))
            params = d["layers"] * per_layer + vocab * h * (1 if tied else 2)
        return cls(
            name=name or str(cfg_get(cfg_like, "_name_or_path", "model_type", default="model")),
            params=float(params),
            layers=d["layers"],
            kv_heads=d["kv_heads"],
            head_dim=d["head_dim"],
            hidden=d["hidden"],
            dtype_bytes=dtype_bytes,
        )


#: The paper's model: 28 layers, 32 heads of 128 (no MQA in v1), hidden 4096, ~6.2 B parameters.
CHATGLM_6B = ModelProfile("ChatGLM-6B", 6.17e9, layers=28, kv_heads=32, head_dim=128, hidden=4096)
MODELS: dict[str, ModelProfile] = {"ChatGLM-6B": CHATGLM_6B}


@dataclass(frozen=True)
class CostModel:
    """Batch time of ``model`` on ``hw``; callable as ``cost(size, L, G) -> seconds``."""

    model: ModelProfile
    hw: HardwareProfile

    @classmethod
    def default(cls) -> CostModel:
        """The paper's setup: ChatGLM-6B on a V100 32 GB."""
        return cls(CHATGLM_6B, HARDWARE["V100-32GB"])

    def prefill_time(self, size: int, max_prompt: int) -> float:
        compute = 2 * self.model.params * size * max_prompt / self.hw.flops
        return max(compute, self.model.weight_traffic_bytes / self.hw.bandwidth)

    def step_time(self, size: int, kv_tokens: int) -> float:
        """One decode step with ``kv_tokens`` cached tokens per sequence."""
        mem = (self.model.weight_traffic_bytes + size * kv_tokens * self.model.delta) / self.hw.bandwidth
        return mem + 2 * self.model.params * size / self.hw.flops + self.hw.step_overhead_s

    def decode_time(self, size: int, max_prompt: int, max_gen: int) -> float:
        """Sum of the ``G - 1`` decode steps in closed form (the KV cache grows by one each step)."""
        return self.decode_steps_time(size, max_prompt, 0, max(max_gen - 1, 0))

    def decode_steps_time(self, size: int, max_prompt: int, first: int, last: int) -> float:
        """Decode steps ``first + 1 .. last`` of ``size`` rows (step ``j`` reads ``L + j`` cached
        tokens per row), in closed form."""
        n = max(last - first, 0)
        kv_token_reads = size * (n * max_prompt + (first + 1 + last) * n / 2)
        mem = (n * self.model.weight_traffic_bytes + kv_token_reads * self.model.delta) / self.hw.bandwidth
        compute = 2 * self.model.params * size * n / self.hw.flops
        return mem + compute + n * self.hw.step_overhead_s

    def row_end_times(self, max_prompt: int, gens: list[int]) -> list[float]:
        """A static batch whose rows leave as they end (early exit): seconds from the batch's start
        to each row's last token, in the order of ``gens``. Step ``j`` runs the rows with ``G > j``."""
        if not gens:
            return []
        t = self.hw.batch_overhead_s + self.prefill_time(len(gens), max_prompt)
        ends: dict[int, float] = {}
        done_steps, live = 0, len(gens)
        for g in sorted(set(gens)):
            t += self.decode_steps_time(live, max_prompt, done_steps, max(g - 1, 0))
            done_steps = max(g - 1, done_steps)
            ends[g] = t
            live -= gens.count(g)
        return [ends[g] for g in gens]

    def batch_time(self, size: int, max_prompt: int, max_gen: int) -> float:
        """Seconds for a static batch: prefill + decode + per-batch overhead."""
        if size <= 0:
            return 0.0
        return (
            self.prefill_time(size, max_prompt)
            + self.decode_time(size, max_prompt, max_gen)
            + self.hw.batch_overhead_s
        )

    def __call__(self, size: int, max_prompt: int, max_gen: int) -> float:
        return self.batch_time(size, max_prompt, max_gen)

    def fitted(self, samples: Iterable[tuple[int, int, int, float]], **kwargs: Any) -> CostModel:
        """This model with the hardware figures fitted to observed ``(size, L, G, seconds)``
        tuples (see :func:`fit_hardware`)."""
        return CostModel(self.model, fit_hardware(self.model, samples, self.hw, **kwargs))

    def memory_model(
        self, reserve_frac: float = 0.1, act_factor: float | None = DEFAULT_ACT_FACTOR
    ) -> MemoryModel:
        """Theta = device memory minus weights minus a reserve; prefill activations estimated with
        ``act_factor`` (None or 0 ignores them)."""
        act = 0.0
        if act_factor:
            act = act_bytes_per_token(self.model.hidden, self.model.dtype_bytes, act_factor)
        return MemoryModel.for_device(
            self.model.delta, self.hw.mem_bytes, self.model.weight_bytes, reserve_frac, act
        )


def _design_row(
    model: ModelProfile, size: int, max_prompt: int, gen: int | Sequence[int], prefill_compute: bool
) -> list[float]:
    """Coefficients of ``[1/F, 1/BW, s, c]`` in the batch time (linear once the prefill branch is
    fixed). ``gen``: G(B), every row decoding until it (a literal static batch), or each row's own
    length (early exit: step ``j`` runs the rows with ``G > j``)."""
    segments: list[tuple[int, int, int]] = []  # (live rows, first step, last step)
    if isinstance(gen, int):
        segments.append((size, 0, max(gen - 1, 0)))
    else:
        done, live = 0, len(gen)
        for g in sorted(set(gen)):
            segments.append((live, done, max(g - 1, done)))
            done, live = max(g - 1, done), live - list(gen).count(g)
    flops = mem = 0.0
    n = 0
    for rows, a, b in segments:
        k = b - a
        n += k
        flops += 2 * model.params * rows * k
        mem += k * model.weight_traffic_bytes + rows * (k * max_prompt + (a + 1 + b) * k / 2) * model.delta
    if prefill_compute:
        flops += 2 * model.params * size * max_prompt
    else:
        mem += model.weight_traffic_bytes
    return [flops, mem, float(n), 1.0]


def fit_hardware(
    model: ModelProfile,
    samples: Iterable[tuple[int, int, int | Sequence[int], float]],
    base: HardwareProfile,
    fit_step_overhead: bool = True,
    fit_batch_overhead: bool = True,
    iters: int = 20,
) -> HardwareProfile:
    """Fit the effective FLOP/s and bandwidth (and, optionally, the per-step and per-batch overheads)
    of ``base`` to observed ``(size, L(B), G(B), seconds)`` tuples (``G(B)`` may be each row's length,
    for batches whose rows left as they ended) by non-negative least squares,
    minimising relative error. Returns ``base`` with ``mfu``, ``mbu`` and overheads replaced
    (``mfu``/``mbu`` stay relative to ``base``'s peak figures and may exceed 1 when those are
    nominal)."""
    data = [(int(b), int(L), G if isinstance(G, int) else tuple(int(g) for g in G), float(t)) for b, L, G, t in samples]
    if len(data) < 2:
        raise ValueError("need at least two samples")
    cols = [0, 1] + ([2] if fit_step_overhead else []) + ([3] if fit_batch_overhead else [])
    y = np.array([t for *_, t in data])
    x = np.array([1 / base.flops, 1 / base.bandwidth, base.step_overhead_s, base.batch_overhead_s])
    branch: list[bool] | None = None
    for _ in range(iters):
        new_branch = [_compute_bound(model, b, L, x) for b, L, _G, _t in data]
        if new_branch == branch:
            break
        branch = new_branch
        rows = [_design_row(model, b, L, G, br) for (b, L, G, _t), br in zip(data, branch, strict=True)]
        x = _nnls_step(np.array(rows), y, x, cols)
    return _with_coefficients(base, x)


def _nnls_step(a: np.ndarray, y: np.ndarray, x: np.ndarray, cols: list[int]) -> np.ndarray:
    """``x`` with its ``cols`` refitted so that ``a @ x ~ y`` in relative error (non-negative)."""
    from scipy.optimize import nnls

    weights = 1.0 / np.maximum(y, 1e-6)  # relative error: short and long samples count alike
    fixed = [i for i in range(len(x)) if i not in cols]  # coefficients not fitted keep their values
    target = y - a[:, fixed] @ x[fixed]
    scale = np.maximum(np.abs(a[:, cols]).max(axis=0), 1e-300)  # condition the columns
    sol, _ = nnls((a[:, cols] / scale) * weights[:, None], target * weights)
    x = x.copy()
    x[cols] = sol / scale
    return x


def fit_hardware_continuous(
    model: ModelProfile,
    workers: Sequence[Sequence[tuple[float, float, float, int, int]]],
    base: HardwareProfile,
    iters: int = 20,
    padded: bool = False,
) -> HardwareProfile:
    """Fit the effective FLOP/s, bandwidth and per-step overhead to iteration-level workers' rows
    ``(start, end, prefill_s, cached, generated)`` (one list per worker; ``cached``: the tokens its
    prefill put in the cache, ``generated``: the tokens it produced there).

    A row's decode time is the sum of the steps taken while it ran, and every step runs every
    live row: step ``t`` costs ``(W + kv_t Delta) / BW + 2 P n_t / F + s`` with ``n_t`` live rows
    holding ``kv_t`` cached tokens, as the simulator charges it. Each row contributes its decode
    seconds minus the prefills of rows that joined meanwhile, against its steps times the mean
    ``n`` and ``kv`` over its life (every row's cache assumed to grow evenly from its start to its
    end); each prefill (rows sharing one forward pass share its ``prefill_s``) contributes its
    FLOPs. Fitting one-row "batches" as if each ran alone would put the whole step into ``s``.
    ``padded`` (a left-padded cache, as the server's iteration runner): every live row reads the
    longest live row's length, ``n_t max kv`` instead of the sum (the mean over 16 points of the
    row's life)."""
    design: list[list[float]] = []
    y: list[float] = []
    prefills: list[tuple[int, int, float]] = []  # (rows, longest cached, seconds)
    for rows in workers:
        lives = [(s + p, e, L, g) for s, e, p, L, g in rows]
        for a, b, _L, g in lives:
            steps = g - 1
            if steps <= 0 or b <= a:
                continue
            n = kv = 0.0
            for c, d, L2, g2 in lives:
                lo, hi = max(a, c), min(b, d)
                if hi <= lo:
                    continue
                n += hi - lo  # the other row's cache grows from L2 to L2 + g2 over [c, d]
                kv += (hi - lo) * (L2 + g2 * ((lo + hi) / 2 - c) / (d - c))
            span = b - a
            t = span - sum({p for s, _e, p, _L, _g in rows if a < s < b})  # joiners' prefills stall it
            if t <= 0:
                continue
            n, kv = n / span, kv / span
            if padded:
                kv = float(np.mean([_padded_reads(lives, a + (i + 0.5) * span / 16) for i in range(16)]))
            design.append([2 * model.params * n * steps, steps * (model.weight_traffic_bytes + kv * model.delta),
                           float(steps), 0.0])
            y.append(t)
        for p, cached in _groups(rows).items():
            prefills.append((len(cached), max(cached), p))
    if len(y) + len(prefills) < 3:
        raise ValueError("need at least three rows with decode steps or prefills")
    x = np.array([1 / base.flops, 1 / base.bandwidth, base.step_overhead_s, base.batch_overhead_s])
    # each prefill is compute- or weight-bound: iterate on the active branch, starting from compute
    # (from weight-bound, nothing but the decode rows would pin the FLOP rate)
    branch = [True] * len(prefills)
    for _ in range(iters):
        rows_p = [[2 * model.params * b * L, 0.0, 0.0, 0.0] if br else [0.0, model.weight_traffic_bytes, 0.0, 0.0]
                  for (b, L, _p), br in zip(prefills, branch, strict=True)]
        x = _nnls_step(np.array(design + rows_p), np.array(y + [p for *_, p in prefills]), x, [0, 1, 2])
        new_branch = [_compute_bound(model, b, L, x) for b, L, _p in prefills]
        if new_branch == branch:
            break
        branch = new_branch
    return _with_coefficients(base, x)


def _padded_reads(lives: Sequence[tuple[float, float, int, int]], t: float) -> float:
    """Cached tokens a left-padded step at time ``t`` reads: the live rows times the longest."""
    caches = [L + g * (t - c) / (d - c) for c, d, L, g in lives if c <= t < d]
    return len(caches) * max(caches, default=0.0)


def _compute_bound(model: ModelProfile, size: int, max_prompt: int, x: np.ndarray) -> bool:
    """Whether a prefill of ``size`` x ``max_prompt`` tokens is compute-bound under coefficients ``x``."""
    return 2 * model.params * size * max_prompt * x[0] >= model.weight_traffic_bytes * x[1]


def _groups(rows: Sequence[tuple[float, float, float, int, int]]) -> dict[float, list[int]]:
    """The prefill forward passes of a worker's rows: ``prefill_s`` -> the cached tokens of the rows
    that shared it."""
    out: dict[float, list[int]] = {}
    for _s, _e, p, L, _g in rows:
        if p > 0:
            out.setdefault(p, []).append(L)
    return out


def _with_coefficients(base: HardwareProfile, x: np.ndarray) -> HardwareProfile:
    tiny = 1e-30  # a zero coefficient means "never the bottleneck": keep the figure finite
    return replace(
        base,
        mfu=1 / max(x[0], tiny) / base.peak_flops,
        mbu=1 / max(x[1], tiny) / base.mem_bandwidth,
        step_overhead_s=float(x[2]),
        batch_overhead_s=float(x[3]),
    )


def default_memory() -> MemoryModel:
    """The paper's setup: ChatGLM-6B fp16 on a V100 32 GB with a 10% reserve (see
    :meth:`CostModel.memory_model`)."""
    return CostModel.default().memory_model()
