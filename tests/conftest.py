"""Shared fixtures: a tiny real Llama model and real `magnus serve` processes on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MAGNUS_TEST_CACHE", Path.home() / ".cache" / "magnus"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    db_path: Path
    log_path: Path
    model: str

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(tmp: Path, model: str, wait: bool = True, **settings: object) -> Server:
    """Start `magnus serve` in a subprocess with the given settings (as MAGNUS_* env vars)."""
    port = free_port()
    env = dict(os.environ)
    env.update({
        "MAGNUS_PORT": str(port), "MAGNUS_MODEL": model, "MAGNUS_DB_PATH": str(tmp / "log.db"),
        "MAGNUS_STATE_DIR": str(tmp / "state"), "MAGNUS_CACHE_DIR": str(CACHE / "models"),
        "MAGNUS_LOG_LEVEL": "info", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    for k, v in settings.items():
        env[f"MAGNUS_{k.upper()}"] = str(v)
    log_path = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )
    srv = Server(f"http://127.0.0.1:{port}", proc, tmp / "log.db", log_path, model)
    if wait:
        wait_healthy(srv)
    return srv


def wait_healthy(srv: Server, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited ({srv.proc.returncode}):\n{srv.log()[-4000:]}")
        try:
            if httpx.get(srv.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    srv.stop()
    raise TimeoutError(f"server not healthy in {timeout}s:\n{srv.log()[-4000:]}")


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
