"""pcb (predictive continuous batching) through the scheduling core, fed fake worker outputs:
order by predicted work, the waiting bound, admission by the high estimate, re-prediction and the
preemption choice, resumption. A real core and a real policy; milliseconds."""

from __future__ import annotations

from predictor.types import Prediction
from scheduler.contract import Preempted, RowProgress
from scheduler.core import SchedulerCore
from scheduler.memory import MemoryModel
from scheduler.pcb import PredictiveContinuousPolicy, remaining_tokens
from scheduler.request import Request, RequestStatus
from tests.test_core import ok_output

DELTA = 1.0


def core_of(theta: float = 1e9, **kw) -> tuple[SchedulerCore, PredictiveContinuousPolicy]:
    p = PredictiveContinuousPolicy(MemoryModel(delta=DELTA, theta=theta), **kw)
    return SchedulerCore(p, [True]), p


def req(rid: str, point: int, high: int | None = None, max_tokens: int = 512, prompt: int = 10,
        arrival: float = 0.0) -> Request:
    return Request(rid, prompt, max_tokens, arrival, prompt_ids=[1] * prompt,
                   prediction=Prediction(point, high if high is not None else point, "test"))


def admitted(core: SchedulerCore, now: float) -> list[str]:
    return [d.batch.requests[0].id for d in core.schedule(now)]


def test_shortest_predicted_first_then_aging_lets_long_ones_in() -> None:
    core, _ = core_of(max_batch_size=1, tpot_s=0.1, starvation_s=1e9)
    for r in (req("long", 400), req("mid", 100), req("short", 10)):
        core.add(r, 0.0)
    assert admitted(core, 0.0) == ["short"]  # equal waits: the least predicted work first
    d = core.running(0)[0]
    core.update_from_output(0, ok_output(d, {"short": 10}), 1.0)
    assert admitted(core, 1.0) == ["mid"]
    late = req("late_short", 10, arrival=100.0)
    core.add(late, 100.0)
    core.update_from_output(0, ok_output(core.running(0)[0], {"mid": 100}), 100.0)
    # "long" waited 100 s, hundreds of tokens at the measured time per token: its ratio is well above
    # the newcomer's 1.0 -- aging admits the long request before the new short one
    assert admitted(core, 100.0) == ["long"]


def test_starving_request_goes_first_and_is_not_overtaken() -> None:
    core, _ = core_of(theta=1000.0, max_batch_size=8, starvation_s=5.0)
    core.add(req("big", 600, max_tokens=600, prompt=100), 0.0)  # needs 700 bytes
    core.add(req("blocker", 600, max_tokens=600, prompt=100), 0.0)
    assert admitted(core, 0.0) == ["big"]  # equal: the earlier one ("big" was added first)
    core.add(req("huge", 800, max_tokens=800, prompt=100, arrival=0.0), 0.0)  # needs 900: does not fit now
    core.add(req("tiny", 5, arrival=5.0), 5.0)
    # "blocker" and "huge" have waited 6 s >= starvation bound: oldest first, and nothing overtakes it
    assert admitted(core, 6.0) == []
    core.update_from_output(0, ok_output(core.running(0)[0], {"big": 600}), 7.0)
    assert admitted(core, 7.0) == ["blocker"]


def test_admission_reserves_the_high_estimate_not_max_tokens() -> None:
    # each request: prompt 10 + high 90 = 100 bytes; max_tokens would be 10 + 512
    core, p = core_of(theta=350.0, max_batch_size=16)
    for i in range(5):
        core.add(req(f"r{i}", 50, high=90), 0.0)
    assert len(admitted(core, 0.0)) == 3  # 3 x 100 <= 350 < 4 x 100
    core_max, _ = core_of(theta=350.0, max_batch_size=16, reserve="max")
    for i in range(5):
        core_max.add(req(f"r{i}", 50, high=90), 0.0)
    assert len(admitted(core_max, 0.0)) == 1  # CCB's rule: 522 bytes each, one runs (alone)


def test_reprediction_follows_progress_and_loops() -> None:
    r = req("x", 100, high=200, max_tokens=512)
    assert remaining_tokens(r) == 100
    r.generated = 150
    assert remaining_tokens(r) == 50  # past the point estimate: toward the high one
    r.generated = 250
    assert remaining_tokens(r) == 262  # past the high estimate: a runaway until max_tokens
    r.generated, r.looping = 20, True
    assert remaining_tokens(r) == 492


def test_outgrown_reservation_preempts_the_most_remaining_work_and_it_resumes() -> None:
    core, p = core_of(theta=300.0, max_batch_size=8, swap_factor=0)
    a, b = req("a", 50, high=90), req("b", 50, high=90)  # 100 bytes each
    for r in (a, b):
        core.add(r, 0.0)
    assert admitted(core, 0.0) == ["a", "b"]
    assert core.update_progress(0, [RowProgress("a", 40, False), RowProgress("b", 40, False)], 1.0) == []
    # "b" loops: it now reserves max_tokens (522 bytes), the worker is over Theta, "b" has the most left
    victims = core.update_progress(0, [RowProgress("a", 48, False), RowProgress("b", 48, True)], 2.0)
    assert [v.id for v in victims] == ["b"]
    up = core.update_preempted(0, [Preempted("b", [7] * 48)], 2.5)
    assert up.requeued == [b] and b.status == RequestStatus.WAITING and b.preemptions == 1
    assert b.arrival == 0.0 and b.resume_ids == [7] * 48  # waiting time kept, its tokens kept
    core.update_from_output(0, ok_output(core.running(0)[0], {"a": 50}), 3.0)
    (d,) = core.schedule(3.0)
    assert d.batch.requests == [b] and d.work().items[0].resume_ids == [7] * 48  # continues, not redone


def test_order_swap_preempts_a_long_running_request_for_a_short_one() -> None:
    core, p = core_of(max_batch_size=1, swap_factor=8.0)
    core.add(req("runaway", 500, max_tokens=512), 0.0)
    assert admitted(core, 0.0) == ["runaway"]
    core.add(req("short", 10), 1.0)
    victims = core.update_progress(0, [RowProgress("runaway", 16, True)], 1.5)
    assert [v.id for v in victims] == ["runaway"]
    core.update_preempted(0, [Preempted("runaway", [1] * 16)], 1.6)
    assert admitted(core, 1.6) == ["short"]
    core.update_from_output(0, ok_output(core.running(0)[0], {"short": 10}), 2.0)
    assert admitted(core, 2.0) == ["runaway"]
    core.add(req("short2", 10), 2.0)
    # preempted once already (max_preemptions=1): it is not moved again
    assert core.update_progress(0, [RowProgress("runaway", 32, True)], 2.5) == []
    assert p.preempted == 1


def test_preempted_request_aborted_meanwhile_is_dropped() -> None:
    core, p = core_of(max_batch_size=4)
    core.add(req("a", 10), 0.0)
    admitted(core, 0.0)
    core.abort("a", 0.5)
    up = core.update_preempted(0, [Preempted("a", [1, 2])], 1.0)
    assert up.requeued == [] and p.waiting() == 0 and p.running == 0
