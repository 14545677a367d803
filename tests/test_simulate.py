"""Tests of ``magnus simulate`` (bench/simulate.py, bench/sim_*.py): the event loop drives the real
policies on a virtual clock. Small synthetic workloads; the whole file runs in seconds."""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.sim.cli import POLICY_ORDER, main, register_simulate
from bench.sim.engine import Simulation
from bench.sim.setup import (
    CostSetup,
    PolicyParams,
    build_policy,
    cost_setup,
    load_model_profile,
    read_batch_log,
)
from bench.sim.trace import make_trace, simulate_policy, trace_requests
from bench.sim.workload import Row, Workload, load_workload, predictions
from predictor.types import Prediction
from scheduler.costmodel import CHATGLM_6B, HARDWARE, CostModel, GiB
from scheduler.memory import MemoryModel
from scheduler.predictive import ABPPolicy, MagnusPolicy
from scheduler.request import FailureCode, Request, RequestStatus
from scheduler.vs import VanillaPolicy
from service.requestlog import SCHEMA

V100 = HARDWARE["V100-32GB"]
SETUP = CostSetup(CHATGLM_6B, V100, V100, "test")
APPS = ("machine_translation", "grammar_correction", "code_commenting")


# -- a small synthetic workload generator -----------------------------------------------------------
def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Workload-plus-truth lines: input 5..400 tokens, output ~ a * input with noise, some hitting
    max_tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        app = APPS[i % len(APPS)]
        inp = int(math.exp(rng.uniform(math.log(5), math.log(400))))
        expected = max(1, round(inp * (0.6, 1.0, 1.4)[i % 3]))
        max_tokens = min(512, math.ceil(1.3 * expected) + 16)
        out = min(max_tokens, max(1, round(expected * math.exp(rng.gauss(0, 0.2)))))
        rows.append({
            "id": f"s-{i:04d}", "app": app, "instruction": "Do the task.", "input": "x" * (4 * inp),
            "max_tokens": max_tokens, "input_tokens": inp, "prompt_tokens": inp + 20, "output_tokens": out,
        })
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_workload(rows: list[Row]) -> Workload:
    return Workload(rows, None, "truth", "file")


def sim_requests(shapes: list[tuple[int, int, int, float, int | None]]) -> list[Request]:
    """``(prompt, true, max_tokens, arrival, predicted)`` -> simulated requests."""
    return [
        Request(f"q{i}", p, m, t, prediction=None if pred is None else Prediction(pred, pred, "test"), true_tokens=g)
        for i, (p, g, m, t, pred) in enumerate(shapes)
    ]


OK = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


# -- workload side ----------------------------------------------------------------------------------
def test_load_workload_truth_and_estimates(tmp_path: Path) -> None:
    rows = synthetic_rows(30)
    wl = load_workload(str(write_rows(tmp_path / "t.jsonl", rows)))
    assert wl.lengths == "truth" and wl.tokens == "file" and not wl.notes
    assert [r.output_tokens for r in wl.rows] == [r["output_tokens"] for r in rows]
    bare = [{k: v for k, v in r.items() if k not in ("output_tokens", "prompt_tokens", "input_tokens")} for r in rows]
    syn = load_workload(str(write_rows(tmp_path / "w.jsonl", bare)))
    assert syn.lengths == "synthetic" and "estimated" in syn.tokens and len(syn.notes) == 2
    assert all(1 <= r.output_tokens <= r.max_tokens for r in syn.rows)
    assert syn.rows[0].input_tokens == math.ceil(len(bare[0]["input"]) / 4)
    with pytest.raises(ValueError):
        load_workload(str(tmp_path / "w.jsonl"), lengths="truth")


def test_predictions_modes() -> None:
    rows = [Row(f"r{i}", "a", 10, 20, 500, 100 + i) for i in range(2000)]
    assert predictions(rows, "oracle") == [r.output_tokens for r in rows]
    noisy = np.array(predictions(rows, "noisy", sigma=0.35, seed=1), dtype=float)
    ratio = np.log(noisy / np.array([r.output_tokens for r in rows]))
    assert abs(float(np.median(ratio))) < 0.05 and 0.3 < float(ratio.std()) < 0.4
    with pytest.raises(ValueError):
        predictions(rows, "file")


# -- the event loop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POLICY_ORDER)
def test_every_request_finishes_or_fails_exactly_once(name: str) -> None:
    wl = make_workload(load_rows(synthetic_rows(120, seed=3)))
    trace = make_trace(wl, 400, rate=30.0, seed=5, prediction="noisy")
    run, reqs = simulate_policy(name, trace, SETUP, PolicyParams(), workers=3)
    assert all(t.request.status.finished for t in reqs)  # a second finish would have raised
    s = run.summary
    assert s.sent == 400 and s.completed + sum(s.errors.values()) == 400
    assert s.completed == 400  # everything fits a V100 alone
    assert all(t.request.finished_at >= t.request.arrival for t in reqs)
    assert s.valid_tokens == sum(t.request.true_tokens for t in reqs)
    assert run.sim.total_tokens >= s.valid_tokens
    if name in ("ccb", "pcb"):
        assert run.sim.total_tokens == s.valid_tokens  # no padding in continuous batching


def load_rows(rows: list[dict]) -> list[Row]:
    return [Row(r["id"], r["app"], r["input_tokens"], r["prompt_tokens"], r["max_tokens"], r["output_tokens"])
            for r in rows]


def test_static_batch_time_equals_cost_model() -> None:
    cost = CostModel(CHATGLM_6B, V100)
    shapes = [(100, 50, 512, 0.0, None), (300, 200, 512, 0.0, None), (40, 10, 512, 0.0, None)]
    sim = Simulation(VanillaPolicy(batch_size=3, max_wait=0.0), cost, n_workers=1)
    reqs = sim_requests(shapes)
    stats = sim.run(reqs)
    expected = cost.batch_time(3, 300, 200)  # L(B) = 300, true G(B) = 200
    assert stats.batches == 1 and stats.total_tokens == 3 * 200
    for r in reqs:  # static batch: everyone ends (and, by default, gets its first token) at the end
        assert r.finished_at == pytest.approx(expected) and r.first_token_at == pytest.approx(expected)
    streaming = Simulation(VanillaPolicy(batch_size=3, max_wait=0.0), cost, 1, ttft="first-token")
    reqs = sim_requests(shapes)
    streaming.run(reqs)
    assert reqs[0].first_token_at == pytest.approx(cost.prefill_time(3, 300) + cost.hw.batch_overhead_s)


def test_ccb_lone_request_costs_prefill_plus_decode() -> None:
    cost = CostModel(CHATGLM_6B, V100)
    policy = build_policy("ccb", SETUP, PolicyParams())
    reqs = sim_requests([(120, 80, 200, 0.0, None)])
    Simulation(policy, cost, 1).run(reqs)
    assert reqs[0].finished_at == pytest.approx(cost.prefill_time(1, 120) + cost.decode_time(1, 120, 80))
    assert reqs[0].first_token_at == pytest.approx(cost.prefill_time(1, 120))


def test_ccb_joiner_waits_for_the_next_iteration_boundary() -> None:
    cost = CostModel(CHATGLM_6B, V100)
    policy = build_policy("ccb", SETUP, PolicyParams())
    first_step_end = cost.prefill_time(1, 100)
    arrive = first_step_end + 0.5 * cost.step_time(1, 101)  # mid way through the first decode step
    reqs = sim_requests([(100, 50, 100, 0.0, None), (60, 5, 100, arrive, None)])
    stats = Simulation(policy, cost, 1).run(reqs)
    boundary = first_step_end + cost.step_time(1, 101)
    joined = boundary + cost.prefill_time(1, 60) + cost.step_time(1, 102)
    assert reqs[1].first_token_at == pytest.approx(joined)
    assert stats.total_tokens == 55


@pytest.mark.parametrize("padded", [False, True])
def test_ccb_step_reads_the_packed_or_the_padded_cache(padded: bool) -> None:
    cost = CostModel(CHATGLM_6B, V100)
    policy = build_policy("ccb", SETUP, PolicyParams())
    reqs = sim_requests([(1000, 50, 100, 0.0, None), (10, 50, 100, 0.0, None)])  # one prefill, then 49 steps
    Simulation(policy, cost, 1, padded=padded).run(reqs)
    # step k reads 2 rows: each at the longer row's 1000 + k tokens (padded), or at their mean (packed)
    per_row = [1000 + k if padded else (1000 + 10) / 2 + k for k in range(1, 50)]
    end = cost.prefill_time(2, 1000) + sum(cost.step_time(2, w) for w in per_row)
    assert reqs[0].finished_at == pytest.approx(end) and reqs[1].finished_at == pytest.approx(end)


def test_pcb_preempts_rows_that_outgrow_short_predictions_and_resumes_them() -> None:
    # Predictions 10x too short: pcb admits by them, the rows outgrow their reservations, and the
    # progress reports make it preempt; each preempted row resumes with the tokens it had.
    cap_tokens = 12_000
    hw = replace(V100, mem_bytes=CHATGLM_6B.weight_bytes + cap_tokens * CHATGLM_6B.delta)
    setup = CostSetup(CHATGLM_6B, hw, hw, "test")
    reqs = sim_requests([(200, 400, 512, 0.01 * i, 40) for i in range(60)])
    policy = build_policy("pcb", setup, PolicyParams())
    stats = Simulation(policy, setup.cost("pcb"), 1).run(reqs)
    assert all(r.status in OK and r.output_tokens == 400 for r in reqs)
    assert stats.preemptions >= 5 and sum(r.preemptions for r in reqs) == stats.preemptions
    assert stats.oom_batches == 0 and stats.peak_kv_frac <= 1.0
    assert stats.total_tokens == 60 * 400  # a resumed row generates only what it lacked
    # without progress reports (as CCB's policy), nothing is preempted: the same rows are admitted by
    # max_tokens and run to the end
    ccb_reqs = sim_requests([(200, 400, 512, 0.01 * i, 40) for i in range(60)])
    ccb = Simulation(build_policy("ccb", setup, PolicyParams()), setup.cost("ccb"), 1).run(ccb_reqs)
    assert ccb.preemptions == 0 and all(r.preemptions == 0 for r in ccb_reqs)


def test_pcb_swaps_a_long_running_request_for_a_much_shorter_waiting_one() -> None:
    # One running slot: a 500-token request runs; a 10-token one arrives. pcb preempts the long
    # one at its next progress report, so the short one ends long before the long one would have.
    setup = SETUP
    reqs = sim_requests([(50, 500, 512, 0.0, 500), (50, 10, 512, 1.0, 10)])
    policy = build_policy("pcb", setup, PolicyParams(max_batch_size=1))
    stats = Simulation(policy, setup.cost("pcb"), 1).run(reqs)
    long, short = reqs
    assert stats.preemptions == 1 and long.preemptions == 1
    assert short.finished_at < long.finished_at
    assert long.output_tokens == 500 and short.output_tokens == 10
    # the same trace without the swap (swap_factor 0 keeps the order of admission)
    again = sim_requests([(50, 500, 512, 0.0, 500), (50, 10, 512, 1.0, 10)])
    policy = build_policy("pcb", setup, PolicyParams(max_batch_size=1))
    policy.swap_factor = 0.0
    Simulation(policy, setup.cost("pcb"), 1).run(again)
    assert again[1].finished_at > again[0].finished_at > short.finished_at


def test_oom_splits_and_finishes_everything() -> None:
    # A device whose KV capacity holds 12,000 tokens; ABP is told 4x more memory than there is,
    # and predictions are 4x too short, so its batches run out of memory and get split.
    cap_tokens = 12_000
    hw = replace(V100, mem_bytes=CHATGLM_6B.weight_bytes + cap_tokens * CHATGLM_6B.delta)
    cost = CostModel(CHATGLM_6B, hw)
    memory = MemoryModel(delta=CHATGLM_6B.delta, theta=4 * cap_tokens * CHATGLM_6B.delta)
    shapes = [(200, 400, 512, 0.001 * i, 100) for i in range(40)]
    shapes.append((6000, 7000, 8000, 0.05, 10))  # cannot fit even alone
    reqs = sim_requests(shapes)
    sim = Simulation(ABPPolicy(memory=memory), cost, n_workers=2)
    stats = sim.run(reqs)
    assert stats.oom_batches >= 2 and stats.batch_requests > len(reqs)  # a batch ran again after its split
    failed = [r for r in reqs if r.status == RequestStatus.FINISHED_ERROR]
    assert [r.id for r in failed] == ["q40"] and failed[0].failure.code is FailureCode.INSUFFICIENT_MEMORY
    ok = [r for r in reqs if r.status in OK]
    assert len(ok) == 40 and all(r.finished_at is not None for r in ok)
    assert stats.peak_kv_frac <= 1.0  # every batch that ran to the end fitted


def test_magnus_beats_vs_on_a_pilot_like_workload() -> None:
    """The paper's pilot, repeated: ~1000-token and ~10-token requests interleaved."""
    rng = random.Random(0)
    rows = []
    for i in range(70):
        big = i % 7 == 3
        n_in, n_out = (rng.randint(970, 1030), rng.randint(970, 1030)) if big else (rng.randint(8, 12), rng.randint(8, 12))
        rows.append(Row(f"p{i}", "pilot", n_in, n_in + 10, 1100 if big else 32, n_out))
    trace = make_trace(make_workload(rows), None, rate=1.0, seed=0, prediction="noisy", sigma=0.1)
    vs, _ = simulate_policy("vs", trace, SETUP, PolicyParams(batch_size=7), workers=1)
    magnus, _ = simulate_policy("magnus", trace, SETUP, PolicyParams(min_wait=0.5), workers=1)
    assert vs.summary.completed == magnus.summary.completed == 70
    assert magnus.summary.response_time["mean"] < 0.5 * vs.summary.response_time["mean"]
    assert magnus.summary.valid_token_throughput >= vs.summary.valid_token_throughput


def test_ccb_admission_never_reserves_more_than_theta() -> None:
    wl = make_workload(load_rows(synthetic_rows(200, seed=1)))
    trace = make_trace(wl, 600, rate=200.0, seed=2)  # overload: admission is what limits
    small = CostSetup(CHATGLM_6B, replace(V100, mem_bytes=16 * GiB), replace(V100, mem_bytes=16 * GiB), "test")
    run, _ = simulate_policy("ccb", trace, small, PolicyParams(), workers=2)
    theta = small.cost("ccb").memory_model().theta
    assert 0.8 < run.sim.peak_reserved_frac <= 1.0  # admission binds, never beyond Theta
    kv_capacity = 16 * GiB - CHATGLM_6B.weight_bytes
    assert run.sim.peak_kv_frac * kv_capacity <= theta  # so the true cache stays within it too
    assert run.sim.oom_batches == 0 and run.summary.completed == 600


def test_magnus_estimator_learns_during_the_run() -> None:
    wl = make_workload(load_rows(synthetic_rows(200, seed=4)))
    trace = make_trace(wl, 800, rate=20.0, seed=4)
    policy = build_policy("magnus", SETUP, PolicyParams(estimator_interval_s=30.0))
    assert isinstance(policy, MagnusPolicy)
    Simulation(policy, SETUP.cost("magnus"), 4).run([t.request for t in trace_requests(trace, True)])
    assert policy.estimator.using_knn and policy.estimator.n_train >= policy.estimator.min_samples


# -- cost models --------------------------------------------------------------------------------------
def test_fit_log_recovers_the_cost_model(tmp_path: Path) -> None:
    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "intermediate_size": 1536, "vocab_size": 49152, "hidden_act": "silu", "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model_profile(str(tmp_path / "config.json"), "float32")
    assert model.dtype_bytes == 4 and model.weight_bits == 32
    truth = CostModel(model, replace(HARDWARE["cpu-local"], mfu=0.2, mbu=0.4, step_overhead_s=0.02))
    db = tmp_path / "log.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)  # the server's own request log
        rng = random.Random(0)
        shrinking = 0
        for i in range(40):
            b, L = rng.randint(1, 8), rng.randint(10, 300)
            gens = [rng.randint(2, 200) for _ in range(b)]
            early = i % 2 == 0  # half the batches let their rows go as they end
            t = max(truth.row_end_times(L, gens)) if early else truth.batch_time(b, L, max(gens))
            total = sum(gens) if early else b * max(gens)
            shrinking += early and sum(gens) < b * max(gens)
            conn.execute("INSERT INTO batches (id, size, max_prompt, max_gen, prefill_s, decode_s, start, end, oom, "
                         "total_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                         (i + 1, b, L, max(gens), 0.0, t, 1000.0, 1000.0 + t, total))
            for j, g in enumerate(gens):
                conn.execute("INSERT INTO requests (id, status, completion_tokens, batch_id) VALUES (?, 'ok', ?, ?)",
                             (f"r{i}-{j}", g, i + 1))
        conn.execute("INSERT INTO batches (size, max_prompt, max_gen, prefill_s, decode_s, start, end, oom) "
                     "VALUES (4, 10, 10, 0, 0, 0, 99, 1)")  # an OOM batch is not a timing sample
    assert sum(not isinstance(g, int) for _, _, g, _ in read_batch_log(db)) == shrinking > 10
    assert len(read_batch_log(db)) == 40
    setup = cost_setup("cpu-local", model, db)
    fitted = setup.cost("vs")
    for shape in [(1, 20, 20), (8, 300, 200), (4, 100, 50)]:
        assert fitted.batch_time(*shape) == pytest.approx(truth.batch_time(*shape), rel=0.02)
    assert setup.prior_hw.name == "cpu-local" and setup.prior_hw.mfu == HARDWARE["cpu-local"].mfu  # prior unfitted
    assert "fitted to 40 batches" in setup.source


def _iteration_worker_log(db: Path, truth: CostModel, n: int, seed: int, padded: bool = False) -> None:
    """A log as an iteration-level worker writes it (one-row batches that overlap), timed by
    ``truth`` within +-3% noise: requests join between steps (one prefill per group of joiners,
    its time shared by their rows), every step runs every live row (``padded``: each at the
    longest row's length)."""
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, 400) for _ in range(n))
    todo = [(a, rng.randint(20, 300), rng.randint(2, 250)) for a in arrivals]
    live: list[list] = []  # [id, start, prefill_s, prompt, gen, made]
    t, i, rows = 0.0, 0, []
    while i < len(todo) or live:
        if not live and i < len(todo):
            t = max(t, todo[i][0])
        new = []
        while i < len(todo) and todo[i][0] <= t:
            new.append(todo[i])
            i += 1
        if new:
            pre = truth.prefill_time(len(new), max(L for _a, L, _g in new)) * rng.uniform(0.97, 1.03)
            live += [[len(rows) + k, t, pre, L, g, 1] for k, (_a, L, g) in enumerate(new)]
            rows += [None] * len(new)
            t += pre
        running = [r for r in live if r[5] < r[4]]
        if running:
            caches = [r[3] + r[5] for r in running]
            per_row = max(caches) if padded else sum(caches) / len(caches)
            t += truth.step_time(len(running), per_row) * rng.uniform(0.97, 1.03)
            for r in running:
                r[5] += 1
        for r in [r for r in live if r[5] >= r[4]]:
            rows[r[0]] = (r[1], t, r[2], r[3], r[4])
            live.remove(r)
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
        for k, (start, end, pre, L, g) in enumerate(rows):
            conn.execute("INSERT INTO batches (id, worker, size, max_prompt, max_gen, prefill_s, decode_s, start, end, "
                         "valid_tokens, total_tokens, oom) VALUES (?, 0, 1, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                         (k + 1, L, g, pre, end - start - pre, start, end, g, g))


@pytest.mark.parametrize("padded", [False, True])
def test_fit_log_of_an_iteration_worker_recovers_its_step_cost(tmp_path: Path, padded: bool) -> None:
    model = load_model_profile("ChatGLM-6B", "float16")
    truth = CostModel(model, replace(V100, mfu=0.3, mbu=0.6, step_overhead_s=0.004))
    _iteration_worker_log(tmp_path / "log.sqlite", truth, 300, seed=1, padded=padded)
    setup = cost_setup("V100-32GB", model, tmp_path / "log.sqlite", padded=padded)
    assert "rows of an iteration-level worker" in setup.source
    fitted = setup.cost("ccb")
    for size, kv in [(1, 100), (8, 300), (32, 400)]:
        assert fitted.step_time(size, kv) == pytest.approx(truth.step_time(size, kv), rel=0.1)
    assert fitted.prefill_time(4, 200) == pytest.approx(truth.prefill_time(4, 200), rel=0.05)
    if padded:  # fitted as packed, the padded log's steps seem to read fewer tokens than they do
        packed = cost_setup("V100-32GB", model, tmp_path / "log.sqlite").cost("ccb")
        def err(c: CostModel) -> float:
            return abs(c.step_time(32, 400) / truth.step_time(32, 400) - 1)
        assert err(fitted) < err(packed) / 3
    # read as static one-row batches (each as if it ran alone), the same log misfits the step
    naive = CostModel(model, V100).fitted(read_batch_log(tmp_path / "log.sqlite"))
    assert naive.step_time(32, 400) != pytest.approx(truth.step_time(32, 400), rel=0.1)


def test_vsq_runs_the_quantized_model() -> None:
    assert SETUP.cost("vsq").model.weight_bytes == pytest.approx(CHATGLM_6B.weight_bytes / 4)
    assert SETUP.cost("vsq").memory_model().theta > SETUP.cost("vs").memory_model().theta


# -- CLI ---------------------------------------------------------------------------------------------
def test_cli_sweep_writes_json_markdown_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wl = write_rows(tmp_path / "w.jsonl", synthetic_rows(60))
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main([str(wl), "--policies", "vs,magnus", "--rates", "5,20", "--n", "150", "--workers", "2",
               "--out", str(out), "--md", str(md), "--plot-dir", str(tmp_path), "--plot-prefix", "t_",
               "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(r["policy"], r["rate"]) for r in doc["runs"]] == [("vs", 5.0), ("magnus", 5.0), ("vs", 20.0), ("magnus", 20.0)]
    assert all(r["summary"]["completed"] == 150 for r in doc["runs"])
    assert "| magnus | 20 |" in capsys.readouterr().out
    assert "bench.sim.cli" in md.read_text() and "| vs | 5 |" in md.read_text()
    assert (tmp_path / "t_mean_response_time.png").stat().st_size > 1000


def test_cli_policy_variants_carry_their_own_knobs(tmp_path: Path) -> None:
    wl = write_rows(tmp_path / "w.jsonl", synthetic_rows(60))
    out = tmp_path / "r.json"
    rc = main([str(wl), "--policies", "vs,vs:batch_size=32,magnus:batch_exit=literal", "--rate", "40", "--n", "150",
               "--workers", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"vs", "vs:batch_size=32", "magnus:batch_exit=literal"}
    assert runs["vs"]["sim"]["mean_batch"] <= 8 < runs["vs:batch_size=32"]["sim"]["mean_batch"]
    # literal static batches compute every row to the batch's longest: padding tokens appear
    literal = runs["magnus:batch_exit=literal"]
    assert literal["sim"]["total_tokens"] > literal["summary"]["valid_tokens"]
    assert runs["vs"]["sim"]["total_tokens"] == runs["vs"]["summary"]["valid_tokens"]  # early exit: none
    assert main([str(wl), "--policies", "vs:batchsize=3", "--rate", "1", "--no-progress"]) == 2
    assert main([str(wl), "--policies", "nope", "--rate", "1", "--no-progress"]) == 2


def test_register_simulate_adds_the_command(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="magnus")
    register_simulate(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", "w.jsonl", "--rate", "3", "--policies", "ccb"])
    assert callable(args.func) and args.rate == 3.0 and args.policies == "ccb"


def test_file_arrivals_and_file_predictions(tmp_path: Path) -> None:
    rows = synthetic_rows(40)
    for i, r in enumerate(rows):
        r["arrival"] = 100.0 + 0.5 * i  # a trace; times are taken relative to its first arrival
        r["predicted_tokens"] = r["output_tokens"] + 3
    wl = load_workload(str(write_rows(tmp_path / "trace.jsonl", rows)))
    trace = make_trace(wl, None, rate=None, prediction="file")
    assert trace.arrivals.tolist() == [0.5 * i for i in range(40)]
    assert trace.predicted == [r["output_tokens"] + 3 for r in rows]
    run, reqs = simulate_policy("abp", trace, SETUP, PolicyParams(), workers=2)
    assert run.summary.completed == 40 and reqs[5].request.predicted_tokens == rows[5]["output_tokens"] + 3
    with pytest.raises(ValueError):
        make_trace(wl, 41, rate=None)
    assert main([str(tmp_path / "trace.jsonl"), "--policies", "vs", "--no-progress"]) == 0


def test_early_exit_rows_leave_a_shrinking_batch() -> None:
    cost = CostModel(CHATGLM_6B, V100)
    shapes = [(100, 10, 512, 0.0, None), (300, 200, 512, 0.0, None), (40, 50, 512, 0.0, None)]
    assert cost.row_end_times(300, [50, 50, 50])[0] == pytest.approx(cost.batch_time(3, 300, 50))
    ends = cost.row_end_times(300, [10, 200, 50])
    assert ends[0] < ends[2] < ends[1] < cost.batch_time(3, 300, 200)  # fewer rows after each departure
    early = sim_requests(shapes)
    stats = Simulation(VanillaPolicy(batch_size=3, max_wait=0.0), cost, 1, early_exit=True).run(early)
    assert [r.finished_at for r in early] == pytest.approx(ends)
    assert stats.total_tokens == 10 + 200 + 50  # each row its own length, no post-end steps
    literal = sim_requests(shapes)
    stats = Simulation(VanillaPolicy(batch_size=3, max_wait=0.0), cost, 1).run(literal)
    assert all(r.finished_at == pytest.approx(cost.batch_time(3, 300, 200)) for r in literal)
    assert stats.total_tokens == 3 * 200


def test_early_exit_oom_returns_the_rows_that_ended_first() -> None:
    cap_tokens = 900  # two rows of L=300 fit to token 150; one row alone to 600
    hw = replace(V100, mem_bytes=CHATGLM_6B.weight_bytes + cap_tokens * CHATGLM_6B.delta)
    cost = CostModel(CHATGLM_6B, hw)
    reqs = sim_requests([(300, 100, 512, 0.0, None), (300, 500, 512, 0.0, None)])
    stats = Simulation(VanillaPolicy(batch_size=2, max_wait=0.0), cost, 1, early_exit=True).run(reqs)
    assert stats.oom_batches == 0  # the short row left at 100 tokens, so the long one fits alone
    reqs = sim_requests([(300, 200, 512, 0.0, None), (300, 700, 512, 0.0, None)])
    stats = Simulation(VanillaPolicy(batch_size=2, max_wait=0.0), cost, 1, early_exit=True).run(reqs)
    assert stats.oom_batches >= 1 and reqs[0].status in OK  # 2 x (300 + 200) > 900: split, then both run
    assert reqs[1].status == RequestStatus.FINISHED_ERROR  # 300 + 700 > 900 even alone
