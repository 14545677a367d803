"""A Ray cluster of several nodes on this machine (loopback), for tests and benchmarks: each node is
a ``ray start --block`` in a session of its own, so stopping the session stops the whole node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class LocalRayCluster:
    """A head on ``port`` plus nodes added with ``add_node``; ``stop`` tears everything down."""

    def __init__(self, workdir: Path, port: int, cpus: int = 1, object_store_mib: int = 100) -> None:
        self.dir, self.port, self.cpus, self.store = workdir, port, cpus, object_store_mib
        self.nodes: list[subprocess.Popen] = []
        self.nodes.append(self._start("head", "--head", "--port", str(port), "--include-dashboard", "false"))
        deadline = time.time() + 120
        while subprocess.run([RAY, "status", "--address", self.address], env=ENV, capture_output=True).returncode:
            if time.time() > deadline:
                raise TimeoutError(f"the Ray head did not start: {(workdir / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.dir / f"{name}.log").open("w")
        return subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", str(self.cpus),
             "--object-store-memory", str(self.store * 2**20), *args],
            env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_node(self) -> subprocess.Popen:
        """One more node (``ray start --address``) with the same CPUs."""
        node = self._start(f"node{len(self.nodes)}", "--address", self.address)
        self.nodes.append(node)
        return node

    @staticmethod
    def stop_node(node: subprocess.Popen) -> None:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait(30)

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node)
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)  # stragglers, if any
