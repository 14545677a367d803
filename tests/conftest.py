"""Shared fixtures: a tiny real Llama model and real `magnus serve` processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.launcher import CACHE, Server, start_server, wait_healthy

__all__ = ["Server", "start_server", "wait_healthy"]


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The embedded SmolLM2 converted to a transformers directory (cached across runs)."""
    from worker.loader import materialize, resolve

    return materialize(resolve("default"), CACHE / "models")


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on demand (each in its own directory); all are stopped at the end."""
    started: list[Server] = []

    def make(model: str, **settings: object) -> Server:
        d = tmp_path / f"srv{len(started)}"
        d.mkdir()
        srv = start_server(d, model, **settings)
        started.append(srv)
        return srv

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One VS server on the tiny model, shared by a test module."""
    srv = start_server(tmp_path_factory.mktemp("tiny-server"), tiny_model_dir, policy="vs",
                       served_model_name="tiny", batch_size=4, max_wait=0.05)
    yield srv
    srv.stop()
