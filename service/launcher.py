"""Start and stop a real `magnus serve` subprocess on a free loopback port (benchmarks and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MAGNUS_TEST_CACHE", Path.home() / ".cache" / "magnus"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def metric(self, name: str, api_key: str | None = None, **labels: str) -> float:
        """The value of one sample of ``/metrics`` with these labels (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        text = httpx.get(self.base_url + "/metrics", headers=headers, timeout=10).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server (SIGTERM: graceful) and wait; kill it if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(workdir: Path, model: str, wait: bool = True, timeout: float = 300, **settings: object) -> Server:
    """Start `magnus serve` with ``settings`` (as MAGNUS_* variables), its DB and state in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ)
    env.update({
        "MAGNUS_PORT": str(port), "MAGNUS_MODEL": model, "MAGNUS_DB_PATH": str(workdir / "log.db"),
        "MAGNUS_STATE_DIR": str(workdir / "state"), "MAGNUS_CACHE_DIR": str(CACHE / "models"),
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    env.update({f"MAGNUS_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = workdir / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "magnus", "serve"], cwd=ROOT, env=env,
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )
    srv = Server(f"http://127.0.0.1:{port}", proc, workdir / "log.db", log_path, model)
    if wait:
        wait_healthy(srv, timeout)
    return srv


def wait_healthy(srv: Server, timeout: float = 300) -> None:
    """Poll /health until 200; raise with the server's log tail if it exits or times out."""
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
