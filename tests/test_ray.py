"""Workers on a Ray cluster (``--workers ray``): a real two-node cluster on loopback (a head and a
``ray start --address`` node, one CPU each), a real server on the tiny model as its driver.
Requests are served by workers on both nodes; a node that joins adds a worker without a restart;
a worker actor killed mid-batch and a node stopped lose no request. Everything started is stopped."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest

from service.launcher import Server, free_port, start_server

pytest.importorskip("ray")

def health(srv: Server) -> dict:
    return httpx.get(srv.base_url + "/health", timeout=10).json()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def complete(srv: Server, prompts: list[str], max_tokens: int) -> list[httpx.Response]:
    def one(p: str) -> httpx.Response:
        return httpx.post(srv.v1 + "/completions", json={"model": "tiny", "prompt": p, "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=300)

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from bench.ray_local import LocalRayCluster

    d = tmp_path_factory.mktemp("ray")
    ray = LocalRayCluster(d, free_port())
    try:
        srv = start_server(d / "srv", tiny_model_dir, served_model_name="tiny", policy="vs", batch_size=2,
                           max_wait=0.05, workers="ray", ray_address=ray.address, ray_scale_interval_s=1,
                           step_delay_s=0.03, worker_threads=1)
        try:
            yield {"srv": srv, "ray": ray}
        finally:
            srv.stop()
    finally:
        ray.stop()


def test_a_joining_node_adds_a_worker_and_both_nodes_serve(cluster: dict) -> None:
    srv = cluster["srv"]
    h = health(srv)
    assert len(h["workers"]) == 1 and h["workers"][0]["ready"]  # the head's one CPU holds one worker
    cluster["ray"].add_node()
    wait_for(lambda: [w["ready"] for w in health(srv)["workers"]] == [True, True], 180, "a second worker")
    nodes = {w["node_id"] for w in health(srv)["workers"]}
    assert len(nodes) == 2  # one worker per node
    rs = complete(srv, [f"request number {i} about the weather" for i in range(8)], 16)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert all(r.json()["usage"]["completion_tokens"] == 16 for r in rs)
    with sqlite3.connect(srv.db_path) as db:
        workers = {w for (w,) in db.execute("select worker from requests where status = 'ok'")}
    assert workers == {0, 1}


def test_a_killed_worker_actor_loses_no_request(cluster: dict) -> None:
    srv = cluster["srv"]
    before = health(srv)["workers"]
    victim = before[0]["pid"]
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, srv, [f"long answer {i}" for i in range(6)], 60)
        wait_for(lambda: _running(srv) > 0, 60, "a running batch")
        os.kill(victim, signal.SIGKILL)
        rs = fut.result(timeout=600)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in rs)
    wait_for(lambda: (w := health(srv)["workers"][0])["ready"] and w["pid"] != victim, 180, "the actor restarted")
    assert _metric(srv, "magnus_worker_restarts_total") >= 1


def test_a_stopped_node_loses_no_request(cluster: dict) -> None:
    srv = cluster["srv"]
    wait_for(lambda: all(w["ready"] for w in health(srv)["workers"]), 180, "every worker ready")
    node2 = cluster["ray"].nodes[1]
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, srv, [f"another long answer {i}" for i in range(6)], 60)
        # batches of 2: four running requests means a batch on each worker, so the stopped node has one
        wait_for(lambda: _running(srv) >= 4, 60, "batches on both workers")
        cluster["ray"].stop_node(node2)
        rs = fut.result(timeout=600)
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in rs)
    # the node's worker was seen dead and waits for room again (the killed actor of the test above was the first)
    wait_for(lambda: _metric(srv, "magnus_worker_restarts_total") >= 2, 120, "the node's worker restarted")


def _metric(srv: Server, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _running(srv: Server) -> float:
    return _metric(srv, "magnus_running_requests")


def test_the_default_policy_runs_on_ray_workers(cluster: dict, tiny_model_dir: str, tmp_path) -> None:
    """pcb (the default, no policy named) on a Ray worker: requests join one running set and end."""
    cluster["srv"].stop()  # its actor held the head's one CPU
    srv = start_server(tmp_path / "pcb", tiny_model_dir, served_model_name="tiny", workers="ray",
                       ray_address=cluster["ray"].address, worker_threads=1, step_delay_s=0.03)
    try:
        wait_for(lambda: [w["ready"] for w in health(srv)["workers"]] == [True], 180, "a pcb worker")
        assert health(srv)["policy"] == "pcb"
        rs = complete(srv, [f"request number {i} about the sea" for i in range(4)], 16)
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        assert all(r.json()["usage"]["completion_tokens"] == 16 for r in rs)
        with sqlite3.connect(srv.db_path) as db:
            spans = db.execute("select dispatch, finish from requests where status = 'ok'").fetchall()
            policies = {p for (p,) in db.execute("select distinct policy from batches")}
        assert policies == {"pcb"} and len(spans) == 4
        assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    finally:
        srv.stop()
