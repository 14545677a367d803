"""The scheduling core's contract, fed fake worker outputs: statuses, OOM split, failures, aborts,
worker death, continuous workers. A real core and real policies from tiny configs; milliseconds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from predictor.types import Prediction
from scheduler.builder import PolicySettings, build_scheduler
from scheduler.contract import BatchOutput, BatchStats, Outcome, RowOutput
from scheduler.core import Dispatch, SchedulerCore
from scheduler.costmodel import CHATGLM_6B, HARDWARE
from scheduler.factory import make_policy
from scheduler.memory import MemoryModel
from scheduler.request import Failure, FailureCode, Request, RequestStatus


# -- factory helpers ---------------------------------------------------------------------------------
def create_core(policy: str = "vs", workers: int = 1, **params: object) -> SchedulerCore:
    """A core on ``policy`` (built by the factory from ``params``) with ``workers`` workers of the
    policy's own kind."""
    p = make_policy(policy, **params)
    return SchedulerCore(p, [p.continuous] * workers)


def create_requests(n: int, prompt: int = 10, max_tokens: int = 16, predicted: int | None = None,
                    prefix: str = "r") -> list[Request]:
    pred = None if predicted is None else Prediction(predicted, predicted, "test")
    return [Request(f"{prefix}{i}", prompt, max_tokens, arrival=0.0, prompt_ids=[1] * prompt, prediction=pred)
            for i in range(n)]


def ok_output(d: Dispatch, tokens: dict[str, int] | None = None) -> BatchOutput:
    """What a worker answers for a batch that ran: each row ``tokens[id]`` long (default max_tokens)."""
    rows = []
    for r in d.batch.requests:
        n = (tokens or {}).get(r.id, r.max_tokens)
        rows.append(RowOutput(r.id, "x" * n, n, "length" if n >= r.max_tokens else "stop", None))
    stats = BatchStats(d.batch.id, d.batch.size, d.batch.max_prompt, max(r.output_tokens for r in rows), 0.1, 0.4,
                       sum(r.output_tokens for r in rows), d.batch.size * max(r.output_tokens for r in rows))
    return BatchOutput(d.batch.id, Outcome.OK, rows, stats)


def failed_output(d: Dispatch, outcome: Outcome) -> BatchOutput:
    return BatchOutput(d.batch.id, outcome, [], None, "simulated failure")


def add_all(core: SchedulerCore, reqs: Sequence[Request], now: float = 0.0) -> None:
    for r in reqs:
        core.add(r, now)


# -- tests --------------------------------------------------------------------------------------------
def test_status_order_and_finished() -> None:
    assert RequestStatus.WAITING < RequestStatus.RUNNING < RequestStatus.FINISHED_STOPPED
    assert not RequestStatus.RUNNING.finished
    assert all(s.finished for s in RequestStatus if s > RequestStatus.RUNNING)


def test_dispatch_carries_what_a_worker_needs_and_outputs_finish_requests() -> None:
    core = create_core("vs", batch_size=4, max_wait=0.0)
    reqs = create_requests(3)
    add_all(core, reqs)
    (d,) = core.schedule(0.0)
    work = d.work()
    assert [w.request_id for w in work.items] == ["r0", "r1", "r2"] and work.batch_id == d.batch.id
    assert work.items[0].prompt_ids == [1] * 10 and work.items[0].max_tokens == 16
    assert all(r.status == RequestStatus.RUNNING and r.dispatched_at == 0.0 for r in reqs)
    assert core.schedule(0.1) == [] and core.next_wakeup(0.1) is None  # the only static worker is busy
    up = core.update_from_output(0, ok_output(d, {"r0": 3}), 2.0)
    assert [r.id for r in up.finished] == ["r0", "r1", "r2"] and up.dispatch is d
    assert reqs[0].status == RequestStatus.FINISHED_STOPPED and reqs[0].output_tokens == 3
    assert reqs[1].status == RequestStatus.FINISHED_LENGTH and reqs[1].finished_at == 2.0
    assert core.num_unfinished == 0
    assert core.update_from_output(0, ok_output(d), 3.0).dispatch is None  # a repeated output is ignored


def test_a_finished_request_keeps_its_first_generated_tokens() -> None:
    # what the predictor's continual learning fits the re-predictor on (RowOutput.head_ids)
    core = create_core("vs", batch_size=2, max_wait=0.0)
    reqs = create_requests(2)
    add_all(core, reqs)
    (d,) = core.schedule(0.0)
    out = ok_output(d, {"r0": 3})
    out.rows[0].head_ids = [5, 6, 7]
    core.update_from_output(0, out, 1.0)
    assert reqs[0].head_ids == [5, 6, 7] and reqs[1].head_ids == []


def test_oom_splits_in_halves_and_a_lone_request_fails() -> None:
    core = create_core("vs", batch_size=4, max_wait=0.0)
    reqs = create_requests(4)
    add_all(core, reqs)
    (d,) = core.schedule(0.0)
    up = core.update_from_output(0, failed_output(d, Outcome.OOM), 1.0)
    assert up.finished == [] and [r.id for r in up.requeued] == ["r0", "r1", "r2", "r3"]
    assert all(r.status == RequestStatus.WAITING for r in reqs)
    halves = []
    for _ in range(2):
        (h,) = core.schedule(1.0)
        halves.append(h)
        core.update_from_output(0, failed_output(h, Outcome.OOM) if h.batch.size > 1 else ok_output(h), 1.5)
    assert [h.batch.size for h in halves] == [2, 2]
    (lone,) = core.schedule(2.0)
    assert lone.batch.size == 1
    up = core.update_from_output(0, failed_output(lone, Outcome.OOM), 2.5)
    (r,) = up.finished
    assert r.status == RequestStatus.FINISHED_ERROR and r.failure.code is FailureCode.INSUFFICIENT_MEMORY
    assert "prompt 10 tokens" in r.failure.message


def test_generation_error_fails_the_batch() -> None:
    core = create_core("vs", batch_size=2, max_wait=0.0)
    add_all(core, create_requests(2))
    (d,) = core.schedule(0.0)
    up = core.update_from_output(0, failed_output(d, Outcome.ERROR), 1.0)
    assert [r.failure.code for r in up.finished] == [FailureCode.GENERATION_FAILED] * 2


def test_abort_waiting_and_running() -> None:
    core = create_core("vs", batch_size=2, max_wait=0.0)
    reqs = create_requests(4)
    add_all(core, reqs)
    (d,) = core.schedule(0.0)
    assert core.abort("r3", 0.1) == RequestStatus.WAITING and core.num_waiting == 1
    assert reqs[3].status == RequestStatus.FINISHED_ABORTED
    assert core.abort("r0", 0.2, Failure(FailureCode.TIMEOUT, "too slow")) == RequestStatus.RUNNING
    assert reqs[0].status == RequestStatus.FINISHED_ERROR and core.abort("r0", 0.3) is None
    up = core.update_from_output(0, ok_output(d), 1.0)
    assert [r.id for r in up.finished] == ["r1"]  # the aborted row's output is dropped
    assert core.abort_waiting(1.0, Failure(FailureCode.SHUTTING_DOWN, "bye")) == [reqs[2]]
    assert core.num_unfinished == 0


def test_worker_death_requeues_once_then_fails() -> None:
    core = create_core("vs", batch_size=2, max_wait=0.0)
    reqs = create_requests(2)
    add_all(core, reqs)
    (d,) = core.schedule(0.0)
    up = core.worker_died(0, 1.0)
    assert up.requeued == reqs and all(r.status == RequestStatus.WAITING for r in reqs)
    assert core.schedule(1.0) == []  # not ready until restarted
    core.set_ready(0, True)
    (again,) = core.schedule(2.0)
    assert again.batch.id == d.batch.id and reqs[0].dispatched_at == 0.0  # first dispatch time kept
    up = core.worker_died(0, 3.0)
    assert [r.failure.code for r in up.finished] == [FailureCode.WORKER_FAILED] * 2


def test_continuous_worker_takes_requests_while_running() -> None:
    theta = 100 * CHATGLM_6B.delta  # room for the reservations of 3 requests of 10 + 20 tokens
    core = create_core("ccb", workers=1, memory=MemoryModel(CHATGLM_6B.delta, theta))
    reqs = create_requests(5, max_tokens=20)
    add_all(core, reqs[:2])
    first = core.schedule(0.0)
    add_all(core, reqs[2:], now=0.5)
    second = core.schedule(0.5)
    assert [d.batch.size for d in first + second] == [1, 1, 1]  # the fourth does not fit yet
    assert core.next_wakeup(0.5) is None  # only a completion frees memory
    core.update_from_output(0, ok_output(first[0]), 1.0)
    (joined,) = core.schedule(1.0)
    assert joined.batch.requests[0].id == "r3"


def test_builder_reads_needs_from_the_policy_class() -> None:
    hw = HARDWARE["V100-32GB"]
    magnus = build_scheduler(PolicySettings("magnus", max_wait=0.05), CHATGLM_6B, hw)
    assert magnus.estimator is not None and magnus.policy.min_wait == 0.05  # max_wait maps to min_wait
    vsq = build_scheduler(PolicySettings("vsq"), CHATGLM_6B, hw)
    vs = build_scheduler(PolicySettings("vs"), CHATGLM_6B, hw)
    assert vsq.cost.model.weight_bits == 4 and vsq.memory.theta > vs.memory.theta and vs.estimator is None
    ccb = build_scheduler(PolicySettings("ccb", max_batch_size=7), CHATGLM_6B, hw)
    assert ccb.policy.continuous and ccb.policy.max_running == 7
    with pytest.raises(ValueError):
        build_scheduler(PolicySettings("nope"), CHATGLM_6B, hw)


def test_predictive_policy_gets_its_prediction_from_the_request() -> None:
    core = create_core("glp", workers=2, batch_size=8, min_wait=0.0)
    short = create_requests(3, predicted=5, prefix="s")
    long_ = create_requests(1, prompt=10, max_tokens=4000, predicted=3000, prefix="l")
    add_all(core, short + long_)
    batches = sorted((d.batch for d in core.schedule(0.0)), key=lambda b: b.size)
    assert [[r.id for r in b.requests] for b in batches] == [["l0"], ["s0", "s1", "s2"]]  # not batched together
