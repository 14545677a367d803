"""Workers that differ (a cluster's): each kind's batch times are learned apart, each worker admits
within its own Theta. The real core and policies, fed fake worker outputs."""

from __future__ import annotations

from pathlib import Path

from scheduler.core import SchedulerCore
from scheduler.estimator import BatchTimeEstimator
from scheduler.factory import make_policy
from scheduler.memory import MemoryModel
from tests.test_core import add_all, create_requests, ok_output

DELTA = 1000.0  # bytes per KV token


def test_each_worker_kind_learns_its_own_batch_times(tmp_path: Path) -> None:
    est = BatchTimeEstimator(min_samples=3, k=1, path=tmp_path / "estimator.json", source={"model": "m"})
    est.kind = "cpu"
    policy = make_policy("magnus", estimator=est, max_batch_size=1)
    core = SchedulerCore(policy, [False, False])
    policy.set_worker(0, "cpu")
    policy.set_worker(1, "H200")
    slow = est.for_kind("H200")
    assert est.for_kind("cpu") is est and est.for_kind(None) is est and slow is not est
    assert slow.path == tmp_path / "estimator.H200.json" and slow.source == {"model": "m", "kind": "H200"}
    now = 0.0
    for i in range(8):  # worker 0's batches take 1 s, worker 1's take 5 s
        add_all(core, create_requests(2, prefix=f"b{i}-", predicted=8), now)
        for d in core.schedule(now):
            core.update_from_output(d.worker, ok_output(d), now + (1.0 if d.worker == 0 else 5.0))
        now += 10.0
    for e in est.all():
        e.update(now)
        e.retrain()
    assert est.n_train >= 3 and slow.n_train >= 3  # each learned from its own batches only
    assert est.estimate(1, 10, 16) < 2.0 < 4.0 < slow.estimate(1, 10, 16)
    policy.next_batch(1, now)  # HRRN asks the estimator of the asking worker's kind
    assert policy._asking == "H200"
    add_all(core, create_requests(1, prefix="c", predicted=8), now)
    b = next(iter(policy.assembler.batches.values()))
    policy._asking = "H200"
    (t_slow,) = policy.processing_times([b])
    policy._asking = "cpu"
    (t_fast,) = policy.processing_times([b])
    assert t_fast < 2.0 < 4.0 < t_slow


def test_continuous_policies_admit_within_each_workers_theta() -> None:
    for name in ("ccb", "pcb"):
        policy = make_policy(name, memory=MemoryModel(delta=DELTA, theta=DELTA * 1000), max_batch_size=64)
        core = SchedulerCore(policy, [True, True])
        policy.set_worker(0, "small", theta=DELTA * 60)  # room for 2 requests of 10 + 16 tokens
        add_all(core, create_requests(8, prompt=10, max_tokens=16, predicted=16))
        per_worker: dict[int, int] = {}
        for d in core.schedule(0.0):
            per_worker[d.worker] = per_worker.get(d.worker, 0) + d.batch.size
        assert per_worker[0] == 2, (name, per_worker)
        assert per_worker[1] == 6, (name, per_worker)


def test_static_batches_are_assembled_under_the_smallest_theta() -> None:
    policy = make_policy("abp", memory=MemoryModel(delta=DELTA, theta=DELTA * 10_000), max_batch_size=64)
    policy.set_worker(0, "big", theta=DELTA * 10_000)
    policy.set_worker(1, "small", theta=DELTA * 100)
    assert policy.memory.theta == DELTA * 100
    policy.set_worker(2, "bigger", theta=DELTA * 50_000)
    assert policy.memory.theta == DELTA * 100  # the smallest one binds
