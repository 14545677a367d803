"""Request priority (vLLM's: lower is served earlier) in every policy, through the pure core fed
fake worker outputs. For each policy, requests arriving in one order with mixed priorities must be
dispatched best priority first and, within a priority, as the policy dispatches those requests
alone with all priorities equal. Milliseconds on a CPU."""

from __future__ import annotations

import pytest

from predictor.types import Prediction
from scheduler.contract import Outcome, Preempted, RowProgress
from scheduler.core import SchedulerCore
from scheduler.memory import MemoryModel
from scheduler.pcb import PredictiveContinuousPolicy
from scheduler.request import Request, RequestStatus
from scheduler.waitqueue import PriorityQueue
from scheduler.wma import WmaAssembler
from tests.test_core import create_core, failed_output, ok_output

T = 10.0  # every dispatch and completion happens at this time: the orders depend on nothing else

# (prompt, max_tokens, predicted, priority), arriving 0.1 s apart in this order; the first arrival
# has the worst priority, short and long predicted lengths are mixed in every priority
SPECS = [
    (10, 4000, 3000, 2),
    (10, 512, 5, 0),
    (200, 4000, 2900, 1),
    (10, 512, 6, 2),
    (200, 4000, 3100, 0),
    (10, 512, 390, 1),
    (10, 512, 4, 0),
    (200, 512, 5, 2),
    (10, 4000, 3050, 0),
    (10, 512, 6, 1),
    (50, 512, 300, 2),
    (50, 512, 320, 0),
]

# the parameters under which each policy dispatches a few requests at a time
POLICIES = {
    "vs": dict(batch_size=2, max_wait=0.0),
    "vsq": dict(batch_size=3, max_wait=0.0),
    "glp": dict(batch_size=2, min_wait=0.0),
    "abp": dict(min_wait=0.0),
    "magnus": dict(min_wait=0.0),
    "ccb": dict(max_batch_size=1),
    "pcb": dict(max_batch_size=1, starvation_s=1e9),
}

FILL_ACROSS = {"vs", "vsq"}  # fixed batch size from one FCFS queue: batches are filled across priorities


def make_requests(specs: list[tuple[int, int, int, int]], ids: list[str] | None = None,
                  slots: list[int] | None = None) -> list[Request]:
    """Requests of ``(prompt, max_tokens, predicted, priority)``; the k-th arrives at ``0.1 * slots[k]``
    (default: k) and is named ``ids[k]`` (default: ``r<slot>``)."""
    slots = slots if slots is not None else list(range(len(specs)))
    ids = ids or [f"r{i}" for i in slots]
    return [Request(rid, p, m, arrival=0.1 * i, prompt_ids=[1] * p, prediction=Prediction(g, g, "test"),
                    priority=prio)
            for rid, i, (p, m, g, prio) in zip(ids, slots, specs, strict=True)]


def dispatch_order(policy: str, reqs: list[Request]) -> list[list[str]]:
    """The batches (their request ids) one worker runs, in dispatch order: every request arrives
    first, then each batch is dispatched and completes at ``T``."""
    core = create_core(policy, **POLICIES[policy])
    for r in reqs:
        core.add(r, r.arrival)
    order: list[list[str]] = []
    while dispatches := core.schedule(T):
        for d in dispatches:
            order.append([r.id for r in d.batch.requests])
            core.update_from_output(d.worker, ok_output(d), T)
    assert core.num_unfinished == 0
    return order


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_best_priority_first_then_the_policys_own_order(policy: str) -> None:
    mixed = dispatch_order(policy, make_requests(SPECS))
    # expected: the priorities best first; each one's requests as the policy dispatches them alone,
    # with their priority set to 0 and the same arrival times
    expected: list[list[str]] = []
    for prio in sorted({s[3] for s in SPECS}):
        slots = [i for i, s in enumerate(SPECS) if s[3] == prio]
        expected += dispatch_order(policy, make_requests([SPECS[i][:3] + (0,) for i in slots], slots=slots))
    flat = [rid for batch in mixed for rid in batch]
    assert [SPECS[int(rid[1:])][3] for rid in flat] == sorted(s[3] for s in SPECS)
    if policy in FILL_ACROSS:  # a batch takes the best requests: it may straddle two priorities
        assert flat == [rid for batch in expected for rid in batch]
        size = POLICIES[policy]["batch_size"]
        assert all(len(b) == size for b in mixed[:-1]) and 0 < len(mixed[-1]) <= size
    else:  # a waiting batch holds one priority
        assert mixed == expected
    # the check has teeth: ignoring priority (all 0) dispatches in another order
    ignored = dispatch_order(policy, make_requests([s[:3] + (0,) for s in SPECS]))
    assert ignored != expected


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_all_zero_priorities_change_nothing(policy: str) -> None:
    """Priority 0 everywhere and priority 7 everywhere give the very same batches."""
    zero = dispatch_order(policy, make_requests([s[:3] + (0,) for s in SPECS]))
    same = dispatch_order(policy, make_requests([s[:3] + (7,) for s in SPECS]))
    assert zero == same


def test_priority_queue_orders_by_priority_then_arrival() -> None:
    q = PriorityQueue()
    reqs = make_requests([(10, 16, 5, p) for p in (3, 1, 3, 0, 1)])
    for r in reqs:
        q.append(r)
    assert [r.id for r in q] == ["r3", "r1", "r4", "r0", "r2"] and len(q) == 5
    assert q.head() is reqs[3] and q.oldest_arrival() == 0.0
    assert q.remove("r3") is reqs[3] and q.remove("r3") is None
    q.appendleft(reqs[3])  # a requeued request: the front of its own priority
    assert q.popleft() is reqs[3] and q.popleft() is reqs[1] and [r.id for r in q] == ["r4", "r0", "r2"]


def test_vs_partial_batch_waits_on_its_oldest_request_of_any_priority() -> None:
    core = create_core("vs", batch_size=4, max_wait=1.0)
    old, new = make_requests([(10, 16, 5, 5), (10, 16, 5, 0)], slots=[0, 9])
    core.add(old, 0.0)
    core.add(new, 0.9)
    assert core.schedule(0.95) == [] and core.next_wakeup(0.95) == 1.0  # the old request's wait counts
    (d,) = core.schedule(1.0)
    assert [r.id for r in d.batch.requests] == ["r9", "r0"]  # best priority first within the batch


def test_vs_requeued_oom_halves_go_first_whatever_their_priority() -> None:
    core = create_core("vs", batch_size=2, max_wait=0.0)
    low = make_requests([(10, 16, 5, 9), (10, 16, 5, 9)], ids=["l0", "l1"])
    for r in low:
        core.add(r, 0.0)
    (d,) = core.schedule(0.0)
    core.add(make_requests([(10, 16, 5, 0)], ids=["h0"], slots=[5])[0], 0.5)
    core.update_from_output(0, failed_output(d, Outcome.OOM), 1.0)
    assert [r.id for r in core.schedule(1.0)[0].batch.requests] == ["l0"]


def test_ccb_head_of_line_is_the_best_priority_request() -> None:
    core = create_core("ccb", memory=MemoryModel(delta=1.0, theta=100.0))
    small, tiny, big = make_requests([(10, 20, 5, 0), (5, 5, 5, 3), (10, 80, 5, 0)], ids=["small", "tiny", "big"])
    core.add(small, 0.0)
    assert [d.batch.requests[0].id for d in core.schedule(0.0)] == ["small"]  # 30 of 100 reserved
    core.add(tiny, 0.1)  # needs 10: would fit
    core.add(big, 0.2)  # needs 90: does not fit beside "small"
    assert core.schedule(0.3) == []  # the best-priority head waits, and the worse one does not overtake it
    core.update_from_output(0, ok_output(core.running(0)[0]), 1.0)
    assert [d.batch.requests[0].id for d in core.schedule(1.0)] == ["big", "tiny"]


def test_wma_assembler_keeps_priorities_in_separate_batches() -> None:
    asm = WmaAssembler()
    a, b, c = make_requests([(10, 16, 5, 0), (10, 16, 5, 1), (10, 16, 5, 0)])
    ba, bb, bc = asm.place(a, 0.0), asm.place(b, 0.0), asm.place(c, 0.0)
    assert bc is ba and bb is not ba and (ba.priority, bb.priority) == (0, 1)


@pytest.mark.parametrize("policy", ["glp", "magnus"])
def test_predictive_requeued_half_keeps_its_priority(policy: str) -> None:
    core = create_core(policy, **POLICIES[policy])
    low = make_requests([(10, 16, 5, 4)] * 4, ids=["l0", "l1", "l2", "l3"], slots=[0, 0, 1, 1])
    for r in low[:2]:
        core.add(r, 0.0)
    (d,) = core.schedule(0.0)
    for r in low[2:]:
        core.add(r, 0.1)
    high = make_requests([(10, 16, 5, 1)], ids=["h0"], slots=[2])[0]
    core.add(high, 0.2)
    core.update_from_output(0, failed_output(d, Outcome.OOM), 1.0)
    batches = core.policy.waiting_batches()
    assert sorted(b.requests[0].priority for b in batches) == [1, 4, 4, 4]
    (d,) = core.schedule(1.0)
    assert [r.id for r in d.batch.requests] == ["h0"]  # the better priority goes before the older halves


def test_predictive_ready_worse_priority_goes_while_the_better_one_gathers() -> None:
    core = create_core("glp", batch_size=4, min_wait=1.0)
    worse, better = make_requests([(10, 16, 5, 2), (10, 16, 5, 0)], ids=["w", "b"], slots=[0, 5])
    core.add(worse, 0.0)
    core.add(better, 0.5)
    assert core.next_wakeup(0.6) == 1.0
    assert [r.id for r in core.schedule(1.0)[0].batch.requests] == ["w"]  # "b" still gathers companions


def _pcb(max_batch_size: int = 1, theta: float = 1e9, **kw) -> tuple[SchedulerCore, PredictiveContinuousPolicy]:
    p = PredictiveContinuousPolicy(MemoryModel(delta=1.0, theta=theta), max_batch_size=max_batch_size, **kw)
    return SchedulerCore(p, [True]), p


def _pcb_req(rid: str, point: int, priority: int, max_tokens: int = 512) -> Request:
    return Request(rid, 10, max_tokens, 0.0, prompt_ids=[1] * 10, prediction=Prediction(point, point, "test"),
                   priority=priority)


def test_pcb_swap_never_preempts_for_a_worse_priority_request() -> None:
    core, p = _pcb(swap_factor=8.0)
    core.add(_pcb_req("runaway", 500, priority=0), 0.0)
    core.schedule(0.0)
    core.add(_pcb_req("short", 10, priority=1), 1.0)
    assert core.update_progress(0, [RowProgress("runaway", 16, True)], 1.5) == []  # same priority would swap
    core.add(_pcb_req("short0", 10, priority=0), 2.0)
    assert [v.id for v in core.update_progress(0, [RowProgress("runaway", 20, True)], 2.5)] == ["runaway"]
    core.update_preempted(0, [Preempted("runaway", [1] * 20)], 2.6)
    assert [d.batch.requests[0].id for d in core.schedule(2.6)] == ["short0"]
    assert p.preempted == 1


def test_pcb_swap_lets_a_better_priority_request_displace_a_worse_running_one() -> None:
    core, _ = _pcb(max_batch_size=2, swap_factor=8.0)
    core.add(_pcb_req("long0", 500, priority=0), 0.0)
    core.add(_pcb_req("long5", 400, priority=5), 0.0)
    assert len(core.schedule(0.0)) == 2
    core.add(_pcb_req("short", 10, priority=0), 1.0)
    progress = [RowProgress("long0", 16, False), RowProgress("long5", 16, False)]
    # both are past the swap threshold; the worse priority is moved, though the other has more left
    assert [v.id for v in core.update_progress(0, progress, 1.5)] == ["long5"]


def test_pcb_memory_preemption_takes_the_worst_priority_first() -> None:
    core, _ = _pcb(max_batch_size=8, theta=250.0, swap_factor=0)
    a, b = _pcb_req("a", 50, priority=3), _pcb_req("b", 50, priority=0, max_tokens=150)
    for r in (a, b):
        r.prediction = Prediction(50, 90, "test")  # each reserves 10 + 90
        core.add(r, 0.0)
    assert len(core.schedule(0.0)) == 2
    # "b" loops: it reserves 10 + 150 and the worker is over Theta; "b" has the most remaining work,
    # "a" the worse priority: "a" goes, and "b" then fits
    victims = core.update_progress(0, [RowProgress("a", 48, False), RowProgress("b", 48, True)], 1.0)
    assert [v.id for v in victims] == ["a"] and b.status == RequestStatus.RUNNING
