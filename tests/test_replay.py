"""Tests of ``magnus simulate --replay`` (bench/replay.py): a measured run re-run in simulation,
with the overheads outside the batch fitted from the server's real SQLite log schema."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.loadgen.load import RequestRecord, read_result, result_json, summarize
from bench.sim.cli import main
from bench.sim.replay import Overheads, fit_overheads, replay_workload
from bench.sim.setup import PolicyParams, cost_setup, load_model_profile
from bench.sim.trace import make_trace, simulate_policy, to_record
from bench.sim.workload import Row, Workload
from service.requestlog import connect

SETUP = cost_setup("V100-32GB", load_model_profile("ChatGLM-6B"))


def rows(n: int) -> list[Row]:
    return [Row(f"r{i}", "grammar_correction", 20 + 7 * i % 90, 30 + 7 * i % 90, 200, 10 + 13 * i % 180)
            for i in range(n)]


def test_replaying_a_run_reproduces_its_metrics(tmp_path: Path) -> None:
    """Records of a (simulated) run replayed through the CLI give the same metrics back: same
    requests, same order, same send times, same true lengths."""
    trace = make_trace(Workload(rows(40), None, "truth", "file"), 80, rate=2.0, seed=3)
    params = PolicyParams(batch_size=4, max_wait=0.5)
    run, reqs = simulate_policy("vs", trace, SETUP, params, workers=1)
    records = [to_record(r) for r in reqs]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(result_json({"policy": "vs"}, run.summary, records)))
    out, md = tmp_path / "replay.json", tmp_path / "replay.md"
    rc = main(["--replay", str(path), "--policies", "vs", "--workers", "1", "--batch-size", "4",
               "--max-wait", "0.5", "--out", str(out), "--md", str(md), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    replayed = doc["runs"][0]["summary"]
    assert replayed["completed"] == 80
    assert replayed["request_throughput"] == pytest.approx(run.summary.request_throughput, rel=1e-9)
    assert replayed["response_time"]["mean"] == pytest.approx(run.summary.response_time["mean"], rel=1e-9)
    assert replayed["response_time"]["p95"] == pytest.approx(run.summary.response_time["p95"], rel=1e-9)
    assert doc["measured"]["response_time"]["mean"] == pytest.approx(run.summary.response_time["mean"])
    assert "| mean response time (s) |" in md.read_text() and "+0%" in md.read_text()
    # a replay is the run's own trace: a rate or a count would contradict it
    assert main(["--replay", str(path), "--rate", "3", "--no-progress"]) == 2
    assert main([str(path), "--replay", str(path), "--no-progress"]) == 2


def test_unanswered_requests_replay_at_max_tokens(tmp_path: Path) -> None:
    recs = [RequestRecord("a", "x", 64, send=10.0, end=11.0, completion_tokens=5, prompt_tokens=30),
            RequestRecord("b", "x", 64, send=10.5, status="timeout", error="no answer")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result_json({}, summarize(recs), recs)))
    _, back = read_result(path)
    wl = replay_workload(back)
    assert wl.arrivals == [0.0, 0.5]
    assert [(r.prompt_tokens, r.output_tokens) for r in wl.rows] == [(30, 5), (30, 64)]
    assert any("not answered" in n for n in wl.notes)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a load result"):
        read_result(tmp_path / "bad.json")


def _log(db: Path) -> None:
    """A server log (the service's own schema): two back-to-back batches on worker 0, one alone."""
    conn = connect(db)
    with conn:
        batches = [(1, 0, 100.0, 100.1, 104.0), (2, 0, 104.05, 104.06, 108.0), (3, 0, 200.0, 200.0, 201.0)]
        for bid, w, disp, start, end in batches:
            conn.execute("INSERT INTO batches (id, policy, worker, size, max_prompt, max_gen, dispatch, start, end, "
                         "prefill_s, decode_s, valid_tokens, total_tokens, oom) VALUES (?, 'vs', ?, 1, 10, 10, ?, ?, "
                         "?, 0, 0, 10, 10, 0)", (bid, w, disp, start, end))
        # (id, arrival, dispatch, finish, batch, predicted): c arrived while batch 1 ran
        reqs = [("a", 99.9, 100.0, 104.01, 1, 7), ("c", 101.0, 104.05, 108.02, 2, 9),
                ("d", 199.0, 200.0, 201.01, 3, None)]
        for rid, arr, disp, fin, bid, pred in reqs:
            conn.execute("INSERT INTO requests (id, status, arrival, dispatch, finish, batch_id, predicted_tokens, "
                         "prompt_tokens, completion_tokens, max_tokens) VALUES (?, 'ok', ?, ?, ?, ?, ?, 10, 10, 16)",
                         (rid, arr, disp, fin, bid, pred))
    conn.close()


def test_fit_overheads_from_the_request_log(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    _log(db)
    # client side: sent 20/30/40 ms before the server saw them, got the end 10/20/30 ms after
    recs = [
        RequestRecord("w1", "x", 16, send=99.88, end=104.02, completion_tokens=10, prompt_tokens=10, response_id="a"),
        RequestRecord("w2", "x", 16, send=100.97, end=108.04, completion_tokens=10, prompt_tokens=10,
                      response_id="c"),
        RequestRecord("w3", "x", 16, send=198.96, end=201.04, completion_tokens=10, prompt_tokens=10,
                      response_id="d"),
    ]
    ov = fit_overheads(recs, db)
    assert ov.samples == 3 and ov.ingress_s == pytest.approx(0.03) and ov.egress_s == pytest.approx(0.02)
    # batch 2 followed batch 1 with work waiting (50 ms); batch 3 waited for its request: no sample
    assert ov.batch_samples == 1 and ov.turnaround_s == pytest.approx(0.05)
    wl = replay_workload(recs, db)
    assert [r.predicted_tokens for r in wl.rows] == [7, 9, None]
    with pytest.raises(ValueError, match="completion ids"):
        fit_overheads([RequestRecord("z", "x", 16, send=1.0, end=2.0, response_id="unknown")], db)
    assert fit_overheads([RequestRecord("z", "x", 16, send=1.0, end=2.0)], db) == Overheads()


def test_overheads_are_charged() -> None:
    """Ingress and egress add to each response time; turnaround delays a worker's next batch."""
    sparse = Workload(rows(5), [0.0, 100.0, 200.0, 300.0, 400.0], "truth", "file")
    trace = make_trace(sparse, None, rate=None)
    params = PolicyParams(batch_size=1, max_wait=0.0)
    base, _ = simulate_policy("vs", trace, SETUP, params, workers=1)
    slow, _ = simulate_policy("vs", trace, SETUP, params, workers=1,
                              overheads=Overheads(ingress_s=0.5, egress_s=0.25))
    assert slow.summary.response_time["mean"] == pytest.approx(base.summary.response_time["mean"] + 0.75)
    burst = make_trace(Workload(rows(5), [0.0] * 5, "truth", "file"), None, rate=None)
    base, reqs0 = simulate_policy("vs", burst, SETUP, params, workers=1)
    turned, reqs1 = simulate_policy("vs", burst, SETUP, params, workers=1, overheads=Overheads(turnaround_s=0.1))
    assert max(t.request.finished_at for t in reqs1) == pytest.approx(max(t.request.finished_at for t in reqs0) + 4 * 0.1)
    assert asdict(turned.sim)["batches"] == 5
