"""Pure-Python tests of the scheduling core (issue 4): memory, WMA, cost model, estimator,
HRRN, the policies and the factory. Each runs in milliseconds on a CPU."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from bench.sim.engine import Simulation
from predictor.types import Prediction
from scheduler.batch import Batch, BatchOutcome
from scheduler.ccb import CCBAdmission, CCBPolicy
from scheduler.costmodel import (
    CHATGLM_6B,
    HARDWARE,
    CostModel,
    HardwareProfile,
    ModelProfile,
    fit_hardware,
    get_hardware,
)
from scheduler.estimator import BatchRecord, BatchTimeEstimator
from scheduler.factory import POLICIES, make_policy
from scheduler.hrrn import pick_hrrn, response_ratio
from scheduler.memory import MemoryModel, delta_from_config, kv_bytes_per_token
from scheduler.pcb import PredictiveContinuousPolicy
from scheduler.policy import Policy
from scheduler.predictive import ABPPolicy, GLPPolicy, MagnusPolicy, PredictivePolicy
from scheduler.request import Request
from scheduler.vs import VanillaPolicy, VSQPolicy
from scheduler.wma import DEFAULT_PHI, WaitingBatch, WmaAssembler, phi_for_tokens, wma, wma_gen, wma_wait

COST = CostModel.default()  # ChatGLM-6B on a V100 32 GB, as in the paper's pilot
DELTA = CHATGLM_6B.delta


# -- factory helpers ---------------------------------------------------------------------------
def create_requests(
    shapes: list[tuple[int, int]],
    *,
    start: float = 0.0,
    gap: float = 0.001,
    max_tokens: int = 4096,
    predict: bool = True,
    prefix: str = "r",
) -> list[Request]:
    """Requests with ``(prompt, true generation)`` shapes, arriving ``gap`` apart; the prediction is
    the true length when ``predict``."""
    return [
        Request(
            id=f"{prefix}{i}",
            prompt_tokens=p,
            max_tokens=max_tokens,
            arrival=start + i * gap,
            prediction=Prediction(g, g, "oracle") if predict else None,
            true_tokens=g,
        )
        for i, (p, g) in enumerate(shapes)
    ]


def large_mem(n_large: int, tokens: int = 2100) -> MemoryModel:
    """A memory model whose Theta holds ``n_large`` requests of ``tokens`` (prompt + generation)."""
    return MemoryModel(delta=DELTA, theta=n_large * tokens * DELTA)


@dataclass
class SimResult:
    makespan: float
    mean_response: float
    batches: list[Batch]


def simulate(policy: Policy, reqs: list[Request], cost: CostModel = COST, workers: int = 1) -> SimResult:
    """The requests through the real core on the simulator's cost-model workers (static batches
    run until their longest TRUE generation)."""
    sim = Simulation(policy, cost, workers)
    stats = sim.run(reqs)
    assert all(r.status.finished for r in reqs)
    resp = [r.finished_at - r.arrival for r in reqs]
    return SimResult(stats.makespan, sum(resp) / len(resp), sim.batches)


def pilot_requests(seed: int = 0) -> list[Request]:
    """The paper's pilot: 3 large (~1000-token prompt and generation) and 18 small (~10) requests,
    interleaved so that every FCFS batch of 7 holds one large request."""
    rng = random.Random(seed)
    shapes = []
    for i in range(21):
        if i % 7 == 3:
            shapes.append((rng.randint(970, 1030), rng.randint(970, 1030)))
        else:
            shapes.append((rng.randint(8, 12), rng.randint(8, 12)))
    return create_requests(shapes)


# -- memory ------------------------------------------------------------------------------------
def test_delta_counts_kv_heads() -> None:
    assert kv_bytes_per_token(28, 32, 128, 2) == 458_752 == CHATGLM_6B.delta
    gqa = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896}
    assert delta_from_config(gqa, 2) == 2 * 24 * 2 * 64 * 2

    class Cfg:  # attribute access, kv heads defaulting to attention heads
        num_hidden_layers = 2
        num_attention_heads = 4
        hidden_size = 64

    assert delta_from_config(Cfg(), 4) == 2 * 2 * 4 * 16 * 4


def test_memory_fits_and_activation_term() -> None:
    mem = MemoryModel(delta=100, theta=10_000)
    assert mem.fits(5, 10, 10) and not mem.fits(6, 10, 10)  # 5*20*100 = 10,000
    assert mem.max_batch(10, 10) == 5
    act = MemoryModel(delta=100, theta=10_000, act_per_token=300)
    # prefill peak: 5 * 15 * (100 + 300) = 30,000 > KV at the end 5 * 20 * 100
    assert act.mem(5, 15, 5) == 30_000 and not act.fits(5, 15, 5)
    with pytest.raises(ValueError):
        MemoryModel.for_device(delta=1, device_bytes=10, weight_bytes=20)


# -- WMA ---------------------------------------------------------------------------------------
def test_wma_hand_computation() -> None:
    # B = {p1: L=10, G=5; p2: L=4, G=2}: L(B) = 10, G(B) = 5
    assert wma_gen(10, 5, 10) == 0 and wma_wait(5, 10, 5) == 15  # one step: 5 + 10
    assert wma_gen(4, 2, 10) == 12  # 2 * (10 - 4)
    assert wma_wait(2, 10, 5) == 12 + 13 + 14 + 15
    assert wma([(10, 5), (4, 2)]) == 66
    b = WaitingBatch(requests=create_requests([(10, 5)]), created=0.0)
    assert b.wma == 15 and b.wma_with(4, 2) == 66


def _brute_wma(pairs: list[tuple[int, int]]) -> int:
    L, G = max(p for p, _ in pairs), max(g for _, g in pairs)
    return max(g * (L - p) + sum(x + L for x in range(g, G + 1)) for p, g in pairs)


def test_wma_aggregate_equals_brute_force() -> None:
    rng = random.Random(4)
    for trial in range(300):
        pairs = [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(rng.randint(1, 12))]
        b = WaitingBatch(requests=[], created=0.0)
        for k, r in enumerate(create_requests(pairs, prefix=f"t{trial}-")):  # grown one by one
            assert b.wma_with(r.prompt_tokens, r.gen_estimate) == _brute_wma(pairs[: k + 1])
            b.add(r)
            assert b.wma == _brute_wma(pairs[: k + 1])
        assert b.wma == wma(pairs)
        assert WaitingBatch(requests=list(b.requests), created=0.0).wma == b.wma  # rebuilt from scratch
        new = (rng.randint(1, 400), rng.randint(1, 400))
        assert b.wma_with(*new) == _brute_wma(pairs + [new])
        # cancel one member: the aggregates are rebuilt
        if len(pairs) > 1:
            k = rng.randrange(len(pairs))
            assert b.remove(b.requests[k].id) is not None
            rest = pairs[:k] + pairs[k + 1 :]
            assert b.wma == _brute_wma(rest)


def test_assembler_best_equals_brute_force() -> None:
    rng = random.Random(7)
    mem = MemoryModel(delta=1, theta=6000)
    asm = WmaAssembler(phi=phi_for_tokens(200), memory=mem, max_batch_size=6)
    shapes = [(rng.randint(1, 500), rng.randint(1, 500)) for _ in range(80)]
    for r in create_requests(shapes):
        new = (r.prompt_tokens, r.gen_estimate)
        options = [
            _brute_wma([(x.prompt_tokens, x.gen_estimate) for x in b.requests] + [new])
            for b in asm.batches.values()
            if b.size < 6 and mem.fits(b.size + 1, max(b.max_prompt, new[0]), max(b.max_gen, new[1]))
        ]
        assert asm.best(r)[0] == min(options, default=math.inf)
        asm.place(r, r.arrival)
    assert 1 < len(asm.batches) < 80 and all(b.size <= 6 for b in asm.batches.values())


def test_assembler_picks_least_wma_and_respects_phi_and_memory() -> None:
    asm = WmaAssembler(phi=phi_for_tokens(64), memory=MemoryModel(delta=1, theta=10_000))
    small, large, small2, huge = create_requests([(10, 10), (1000, 1000), (12, 9), (5000, 5000)])
    b_small = asm.place(small, 0.0)
    b_large = asm.place(large, 0.0)
    assert b_large is not b_small  # joining costs ~1.5e6 > Phi
    assert asm.best(small2) == (b_small.wma_with(12, 9), b_small)
    assert asm.place(small2, 0.0) is b_small
    assert math.isinf(asm.best(huge)[0])  # exceeds Theta everywhere
    assert asm.place(huge, 0.0) not in (b_small, b_large)
    assert asm.n_requests == 4 and len(asm.batches) == 3
    # memory bound: Theta = 10,000 holds 5 requests of (1000, 1000)
    tight = WmaAssembler(phi=math.inf, memory=MemoryModel(delta=1, theta=5 * 2000))
    for r in create_requests([(1000, 1000)] * 7, prefix="x"):
        tight.place(r, 0.0)
    assert sorted(b.size for b in tight.batches.values()) == [2, 5]


# -- cost model --------------------------------------------------------------------------------
def test_cost_model_regimes() -> None:
    # decode of one request is dominated by reading the weights each step
    t1 = COST.batch_time(1, 10, 100)
    assert t1 == pytest.approx(99 * CHATGLM_6B.weight_bytes / COST.hw.bandwidth, rel=0.05)
    # KV reads grow with batch size and length; quantized weights shrink the per-step floor
    assert COST.batch_time(8, 1000, 1000) > COST.batch_time(1, 1000, 1000) * 1.2
    q = CostModel(CHATGLM_6B.quantized(4), COST.hw)
    # 4-bit weights take a quarter of the memory but are dequantized per pass: no faster decode
    assert q.model.weight_bytes == pytest.approx(CHATGLM_6B.weight_bytes / 4)
    assert q.batch_time(1, 10, 100) > t1
    assert q.memory_model().theta > COST.memory_model().theta
    # prefill of a long batch is compute-bound
    assert COST.prefill_time(16, 1000) == pytest.approx(2 * CHATGLM_6B.params * 16_000 / COST.hw.flops)
    assert {"V100-32GB", "A100-80GB", "H100-80GB", "cpu-local"} <= set(HARDWARE)
    assert get_hardware("cpu-local").mem_bytes > 0
    m = ModelProfile.from_config(
        {"num_hidden_layers": 28, "num_attention_heads": 32, "hidden_size": 4096,
         "intermediate_size": 16384, "vocab_size": 130528}
    )
    assert m.delta == DELTA and 5e9 < m.params < 8e9


def test_fit_hardware_recovers_effective_figures() -> None:
    true_hw = HardwareProfile("truth", 1.6e11, 2e10, 16e9, mfu=0.25, mbu=0.6, step_overhead_s=0.02,
                              batch_overhead_s=0.1)
    tiny = ModelProfile("tiny", 5e8, layers=24, kv_heads=2, head_dim=64, hidden=896)
    truth = CostModel(tiny, true_hw)
    for noise in (0.0, 0.01):
        rng = random.Random(1)
        samples = []
        for _ in range(60):
            b, L, G = rng.randint(1, 32), rng.randint(1, 600), rng.randint(1, 300)
            samples.append((b, L, G, truth(b, L, G) * rng.uniform(1 - noise, 1 + noise)))
        fitted = fit_hardware(tiny, samples, get_hardware("cpu-local"))
        model = CostModel(tiny, get_hardware("cpu-local")).fitted(samples)
        assert model.hw == fitted
        if noise == 0.0:  # exact data: every figure comes back
            assert fitted.flops == pytest.approx(true_hw.flops, rel=1e-3)
            assert fitted.bandwidth == pytest.approx(true_hw.bandwidth, rel=1e-3)
            assert fitted.step_overhead_s == pytest.approx(0.02, rel=1e-3)
            assert fitted.batch_overhead_s == pytest.approx(0.1, rel=1e-3)
        else:  # noisy: the per-step cost (weights / BW + overhead) is what the data pins down
            assert fitted.flops == pytest.approx(true_hw.flops, rel=0.1)
            assert model.step_time(1, 0) == pytest.approx(truth.step_time(1, 0), rel=0.03)
            errs = [abs(model(b, L, G) - t) / t for b, L, G, t in samples]
            assert max(errs) < 0.05


# -- estimator ---------------------------------------------------------------------------------
def test_estimator_cold_start_then_knn() -> None:
    prior_calls: list[tuple[int, int, int]] = []

    def prior(size: int, L: int, G: int) -> float:
        prior_calls.append((size, L, G))
        return 1.0

    est = BatchTimeEstimator(prior, k=1, min_samples=5)
    assert est.estimate(4, 100, 100) == 1.0 and not est.using_knn
    for i in range(5):
        assert not est.using_knn
        est.log(BatchRecord(4, 100 * (i + 1), 50, 50 + i, seconds=10.0 + i), now=float(i))
    assert est.using_knn and est.n_train == 5 and est.version == 1
    n_prior = len(prior_calls)
    assert est.estimate(4, 300, 52) == pytest.approx(12.0)  # the nearest neighbour's time
    assert len(prior_calls) == n_prior


def test_estimator_selection_rule_and_interval() -> None:
    est = BatchTimeEstimator(lambda s, L, G: 0.0, k=1, min_samples=1, interval_s=120.0)
    est.log(BatchRecord(8, 500, 500, 500, seconds=20.0), now=0.0)  # trains: every query -> 20 s
    assert est.using_knn
    picked = BatchRecord(8, 800, 800, 800, seconds=26.0)  # error 6 s, 23%: selected
    small_rel = BatchRecord(8, 900, 900, 900, seconds=23.0)  # 3 s but 13%: not
    small_abs = BatchRecord(1, 10, 10, 10, seconds=21.5)  # 1.5 s: not
    for r in (picked, small_rel, small_abs):
        est.log(r, now=10.0)
    assert est.n_train == 1 and not est.due(60.0) and est.due(120.0)
    assert est.maybe_update(60.0) == 0  # not yet due
    assert est.maybe_update(130.0) == 1
    assert est.n_train == 2 and est.version == 2
    assert est.estimate(8, 800, 800) == pytest.approx(26.0)
    # the rule uses the TRUE generation length: predicted G is off, but the true one matches
    est.log(BatchRecord(8, 500, 50, 500, seconds=20.5), now=140.0)
    assert est.update(300.0) == 0


def test_estimator_background_retrain_and_persistence(tmp_path) -> None:
    path = tmp_path / "batches.json"
    est = BatchTimeEstimator(COST, min_samples=3, path=path, sync_retrain=False)
    for i in range(4):
        est.log(BatchRecord(2 + i, 100 + 50 * i, 80, 90 + 10 * i, seconds=3.0 + i), now=0.0)
    assert not est.using_knn and est.retrain_pending  # the service retrains off-thread
    assert not path.exists()
    assert est.retrain() and est.using_knn and path.exists()  # retraining persists the set
    before = est.estimate_many([(3, 150, 100), (10, 500, 500)])
    again = BatchTimeEstimator(COST, min_samples=3, path=path)  # loads and trains at construction
    assert again.n_train == 4 and again.estimate_many([(3, 150, 100), (10, 500, 500)]) == before


# -- HRRN --------------------------------------------------------------------------------------
def test_hrrn_order() -> None:
    assert response_ratio(10.0, 5.0) == 3.0
    short = WaitingBatch(requests=create_requests([(10, 10)], start=9.0), created=9.0)  # waits 1 s
    long_ = WaitingBatch(requests=create_requests([(1000, 1000)], start=0.0, prefix="l"), created=0.0)  # 10 s
    tp = {short.id: 0.5, long_.id: 30.0}

    def times(bs):
        return [tp[b.id] for b in bs]

    assert pick_hrrn([long_, short], times, now=10.0) is short  # ratio 3 vs 1.33
    assert pick_hrrn([long_, short], times, now=100.0) is short  # 183 vs 4.3
    tp[short.id] = 60.0  # 1.68 vs 4.3: the long wait wins, nothing starves
    assert pick_hrrn([long_, short], times, now=100.0) is long_


def test_magnus_dispatches_by_hrrn_glp_by_fcfs() -> None:
    shapes = [(1000, 1000), (10, 10)]
    for policy, first in ((MagnusPolicy(memory=large_mem(3)), "r1"), (ABPPolicy(memory=large_mem(3)), "r0")):
        for r in create_requests(shapes):
            policy.on_arrival(r, r.arrival)
        b = policy.next_batch(0, 1.0)
        assert b is not None and b.requests[0].id == first


# -- policies ----------------------------------------------------------------------------------
def test_pilot_vs_mixes_magnus_separates_and_is_faster() -> None:
    vs = simulate(VanillaPolicy(batch_size=7), pilot_requests())
    assert [b.size for b in vs.batches] == [7, 7, 7]
    assert all(sum(r.prompt_tokens > 500 for r in b.requests) == 1 for b in vs.batches)  # mixed
    magnus = simulate(MagnusPolicy(memory=large_mem(3), min_wait=0.05), pilot_requests())
    sizes = sorted(b.size for b in magnus.batches)
    assert sizes == [3, 18]
    for b in magnus.batches:  # every batch is all-small or all-large
        assert len({r.prompt_tokens > 500 for r in b.requests}) == 1
    assert magnus.batches[0].size == 18  # HRRN: the short batch first
    assert magnus.makespan < 0.5 * vs.makespan
    assert magnus.mean_response < 0.2 * vs.mean_response
    # with memory for only two large requests, the third one runs in a batch of its own
    tighter = simulate(MagnusPolicy(memory=large_mem(2), min_wait=0.05), pilot_requests())
    assert sorted(b.size for b in tighter.batches) == [1, 2, 18]


def test_glp_fixed_size_and_abp_memory_bound() -> None:
    shapes = [(10, 10)] * 20
    glp = GLPPolicy(batch_size=8)
    abp = ABPPolicy(memory=MemoryModel(delta=DELTA, theta=12 * 20 * DELTA))
    for p in (glp, abp):
        for r in create_requests(shapes):
            p.on_arrival(r, r.arrival)
    assert sorted(b.size for b in glp.waiting_batches()) == [4, 8, 8]
    assert sorted(b.size for b in abp.waiting_batches()) == [8, 12]
    assert glp.next_batch(0, 1.0).size == 8  # FCFS: the oldest batch


def test_min_wait_and_next_wakeup() -> None:
    p = ABPPolicy(memory=large_mem(3), min_wait=0.5)
    assert p.next_wakeup(0.0) is None
    r0, r1 = create_requests([(10, 10), (12, 11)], start=1.0, gap=0.1)
    p.on_arrival(r0, 1.0)
    assert p.next_wakeup(1.0) == 1.5
    assert p.next_batch(0, 1.05) is None
    p.on_arrival(r1, 1.1)
    assert p.next_wakeup(1.2) == 1.5
    b = p.next_batch(0, 1.5)
    assert b is not None and b.size == 2 and p.waiting() == 0
    # a full GLP batch goes at once
    g = GLPPolicy(batch_size=2, min_wait=10.0)
    for r in create_requests([(10, 10), (10, 10)]):
        g.on_arrival(r, 0.0)
    assert g.next_wakeup(0.0) == 0.0 and g.next_batch(0, 0.0).size == 2
    # without min_wait a lone request is dispatchable as soon as a worker is idle
    m = MagnusPolicy(memory=large_mem(3))
    m.on_arrival(create_requests([(10, 10)])[0], 0.0)
    assert m.next_wakeup(0.0) == 0.0 and m.next_batch(0, 0.0).size == 1


@pytest.mark.parametrize("name", ["vs", "glp", "abp", "magnus"])
def test_oom_split_keeps_arrival_and_lone_request_fails(name: str) -> None:
    policy = make_policy(name, batch_size=4, memory=large_mem(8))
    reqs = create_requests([(100, 100)] * 4)
    for r in reqs:
        policy.on_arrival(r, r.arrival)
    batch = policy.next_batch(0, 1.0)
    assert batch is not None and batch.size == 4
    assert policy.on_batch_oom(batch, 2.0) == []
    assert policy.waiting() == 4
    halves = [policy.next_batch(0, 2.0), policy.next_batch(0, 2.0)]
    assert [h.size for h in halves] == [2, 2]
    assert sorted(r.id for h in halves for r in h.requests) == sorted(r.id for r in reqs)
    assert all(h.waiting_since == min(r.arrival for r in h.requests) < 1.0 for h in halves)
    assert all(h.retries == 1 for h in halves)
    # a half that still does not fit splits again; a lone request fails and nothing else is lost
    assert policy.on_batch_oom(halves[0], 3.0) == []
    lone = policy.next_batch(0, 3.0)
    assert lone.size == 1 and policy.on_batch_oom(lone, 4.0) == lone.requests
    assert policy.waiting() == 1


def test_requeued_half_takes_no_new_members() -> None:
    p = ABPPolicy(memory=large_mem(8), phi=math.inf)
    for r in create_requests([(100, 100)] * 4):
        p.on_arrival(r, r.arrival)
    b = p.next_batch(0, 1.0)
    p.on_batch_oom(b, 1.0)
    p.on_arrival(create_requests([(100, 100)], prefix="n")[0], 1.5)
    assert sorted(x.size for x in p.waiting_batches()) == [1, 2, 2]


@pytest.mark.parametrize("name", ["vs", "vsq", "glp", "abp", "magnus", "ccb"])
def test_cancel(name: str) -> None:
    policy = make_policy(name, batch_size=8, memory=large_mem(4), min_wait=5.0)
    reqs = create_requests([(1000, 1000), (10, 10), (11, 12), (9, 10)])
    for r in reqs:
        policy.on_arrival(r, r.arrival)
    tokens = policy.waiting_tokens()
    assert policy.cancel("r2", 0.1) and not policy.cancel("r2", 0.1) and not policy.cancel("zz", 0.1)
    assert policy.waiting() == 3
    assert policy.waiting_tokens() == tokens - (11 + 4096)
    if isinstance(policy, PredictivePolicy):
        small = next(b for b in policy.assembler.batches.values() if b.max_prompt < 100)
        assert (small.max_prompt, small.max_gen) == (10, 10) and small.wma == wma([(10, 10), (9, 10)])
        assert policy.cancel("r0", 0.1) and len(policy.assembler.batches) == 1  # emptied batch dropped


def test_factory_builds_every_policy() -> None:
    expected = {"vs": VanillaPolicy, "vsq": VSQPolicy, "glp": GLPPolicy, "abp": ABPPolicy,
                "magnus": MagnusPolicy, "ccb": CCBPolicy, "pcb": PredictiveContinuousPolicy}
    assert set(POLICIES) == set(expected)
    for name, cls in expected.items():
        p = make_policy(name)
        assert type(p) is cls and p.name == name
        assert p.needs_prediction == (name in ("glp", "abp", "magnus", "pcb"))
    assert make_policy("vsq").batch_size > make_policy("vs").batch_size
    # one settings dict for every policy; max_wait and min_wait are the same knob
    settings = {"batch_size": 6, "max_wait": 0.2, "phi": 1e5, "memory": large_mem(3), "max_batch_size": 64}
    assert make_policy("vs", **settings).max_wait == 0.2
    glp = make_policy("glp", **settings)
    assert (glp.batch_size, glp.min_wait, glp.phi, glp.max_batch_size) == (6, 0.2, 1e5, 6)
    m = make_policy("magnus", **settings)
    assert (m.max_batch_size, m.min_wait, m.memory.theta) == (64, 0.2, large_mem(3).theta)
    assert make_policy("abp").phi == DEFAULT_PHI
    with pytest.raises(TypeError):
        make_policy("magnus", batch_size=6, strict=True)
    with pytest.raises(TypeError):
        make_policy("vs", bogus=1)
    with pytest.raises(ValueError):
        make_policy("nope")


def test_magnus_feeds_estimator() -> None:
    est = BatchTimeEstimator(COST, min_samples=2)
    p = make_policy("magnus", estimator=est, memory=large_mem(3))
    reqs = create_requests([(100, 50), (2000, 900)])
    for r in reqs:
        p.on_arrival(r, 0.0)
    for t in (1.0, 2.0):
        b = p.next_batch(0, t)
        p.on_batch_done(BatchOutcome(batch=b, true_gen={r.id: 60 for r in b.requests}, duration=t), t)
    assert est.n_train == 2 and est.using_knn


def test_ccb_admission() -> None:
    adm = CCBAdmission(theta=3000 * DELTA, delta=DELTA)
    a, b, c = create_requests([(500, 500), (400, 600), (10, 990)], max_tokens=1000)
    assert adm.admit(a) and adm.admit(b) and not adm.admit(c)  # reserves prompt + max_tokens
    assert adm.release(a.id) and adm.admit(c) and adm.running == 2
    policy = CCBPolicy(memory=MemoryModel(delta=DELTA, theta=2500 * DELTA))
    for r in create_requests([(500, 10), (600, 10), (700, 10)], max_tokens=500):
        policy.on_arrival(r, r.arrival)
    got = [policy.next_batch(0, 1.0), policy.next_batch(0, 1.0), policy.next_batch(0, 1.0)]
    assert [g.size if g else 0 for g in got] == [1, 1, 0]  # the third would overflow the reservation
    assert policy.next_wakeup(1.0) is None  # only a completion can free memory
    policy.on_batch_done(BatchOutcome(batch=got[0], true_gen={"r0": 10}, duration=1.0), 2.0)
    third = policy.next_batch(0, 2.0)
    assert third is not None and third.requests[0].id == "r2"
    assert policy.next_batch(1, 2.0) is None  # queue empty; worker 1 has its own admission
