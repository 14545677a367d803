"""The static batch runner on a real (tiny, random) model."""

from __future__ import annotations

import pytest

from scheduler.contract import Outcome, WorkBatch, WorkItem
from scheduler.memory import delta_from_config
from scheduler.request import SamplingParams
from worker.loader import load_model, load_tokenizer
from worker.runner import BatchRunner


@pytest.fixture(scope="module")
def runner(tiny_model_dir: str) -> BatchRunner:
    import torch

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    return BatchRunner(model, tok, "cpu", int(delta_from_config(model.config, 4)))


def ids(runner: BatchRunner, text: str) -> list[int]:
    return runner.tok.encode(text)


def item(rid: str, prompt_ids: list[int], max_tokens: int) -> WorkItem:
    return WorkItem(rid, prompt_ids, max_tokens, SamplingParams())


def test_batch_equals_single_and_counts_waste(runner: BatchRunner) -> None:
    reqs = [item("a", ids(runner, "hello there"), 3), item("b", ids(runner, "a much longer prompt here"), 9)]
    done = runner.run(WorkBatch(1, reqs))
    single = {r.request_id: runner.run(WorkBatch(2, [r])).rows[0] for r in reqs}
    for res in done.rows:
        assert res.text == single[res.request_id].text  # left padding does not change greedy output
    by = {r.request_id: r for r in done.rows}
    assert by["a"].output_tokens == 3 and by["b"].output_tokens == 9
    s = done.stats
    assert (s.size, s.max_gen, s.valid_tokens, s.total_tokens) == (2, 9, 12, 12)  # "a" left after its 3 tokens
    assert s.max_prompt == max(len(r.prompt_ids) for r in reqs)


def test_streamed_events_concatenate_to_result(runner: BatchRunner) -> None:
    got: dict[str, str] = {}
    done = runner.run(WorkBatch(3, [item("x", ids(runner, "stream me"), 8)]),
                      lambda evs: [got.__setitem__(e.request_id, got.get(e.request_id, "") + e.text) for e in evs])
    assert got["x"] == done.rows[0].text


def test_memory_cap_reports_oom_and_runner_recovers(tiny_model_dir: str, runner: BatchRunner) -> None:
    capped = BatchRunner(runner.model, runner.tok, "cpu", runner.delta, mem_cap_bytes=runner.delta * 40)
    big = [item(str(i), ids(runner, "one two three four five"), 20) for i in range(4)]
    done = capped.run(WorkBatch(4, big))
    assert done.outcome is Outcome.OOM and done.stats.oom and not done.rows
    ok = capped.run(WorkBatch(5, big[:1]))  # a single request fits: the runner is still healthy
    assert ok.outcome is Outcome.OK and ok.rows[0].output_tokens == 20


def batch_sizes(runner: BatchRunner) -> tuple[list[int], object]:
    """Record the batch dimension of every forward pass of the runner's model."""
    sizes: list[int] = []
    handle = runner.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return sizes, handle


def test_early_exit_returns_rows_in_completion_order_and_shrinks_the_batch(runner: BatchRunner) -> None:
    reqs = [item("long", ids(runner, "a much longer prompt here"), 9), item("short", ids(runner, "hi"), 3)]
    reported: list[tuple[str, int]] = []
    sizes, handle = batch_sizes(runner)
    try:
        done = runner.run(WorkBatch(6, reqs), on_rows=lambda rows: reported.extend((r.request_id, r.output_tokens)
                                                                                for r in rows))
    finally:
        handle.remove()
    assert reported == [("short", 3), ("long", 9)]  # each the step it ends, short first
    assert sizes[0] == 2 and sizes[1:3] == [2, 2] and set(sizes[3:]) == {1}  # the short row left after 3 tokens
    assert done.stats.total_tokens == 3 + 9 and done.stats.valid_tokens == 12  # no post-end tokens computed
    assert {r.request_id for r in done.rows} == {"long", "short"}  # the learners still see every row


def test_literal_mode_keeps_every_row(runner: BatchRunner) -> None:
    literal = BatchRunner(runner.model, runner.tok, "cpu", runner.delta, early_exit=False)
    reported: list[str] = []
    sizes, handle = batch_sizes(runner)
    try:
        done = literal.run(WorkBatch(7, [item("long", ids(runner, "one two three"), 9), item("short", ids(runner, "hi"), 3)]),
                           on_rows=lambda rows: reported.extend(r.request_id for r in rows))
    finally:
        handle.remove()
    assert reported == [] and set(sizes) == {2} and done.stats.total_tokens == 2 * 9


def test_cancelled_row_stops_being_computed(runner: BatchRunner) -> None:
    calls = {"n": 0}

    def cancelled() -> set[str]:
        calls["n"] += 1
        return {"gone"} if calls["n"] >= 2 else set()

    sizes, handle = batch_sizes(runner)
    try:
        done = runner.run(WorkBatch(8, [item("gone", ids(runner, "cancel me"), 20), item("kept", ids(runner, "keep"), 6)]),
                          cancelled=cancelled)
    finally:
        handle.remove()
    assert [r.request_id for r in done.rows] == ["kept"] and done.rows[0].output_tokens == 6
    assert sizes[:3] == [2, 2, 1] and done.stats.total_tokens == 2 + 6


def test_sampled_rows_reproducible_by_seed(runner: BatchRunner) -> None:
    def sampled(seed: int) -> str:
        it = WorkItem("s", ids(runner, "tell me"), 12, SamplingParams(temperature=1.0, top_p=0.9, seed=seed))
        return runner.run(WorkBatch(9, [it, item("g", ids(runner, "other"), 4)])).rows[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in (1, 2, 3)}) > 1  # the seed matters


def test_incremental_detokenization_equals_a_whole_decode(runner: BatchRunner) -> None:
    import random

    from worker.text import RequestText

    tok = runner.tok
    rng = random.Random(0)
    samples = [tok.encode(t, add_special_tokens=False) for t in (
        "Привет, как дела?", "这是一个测试，用于检查增量解码。", "def f(x):\n    return x  + 1", "  spaces 🎉🎉 done.")]
    samples += [[rng.randrange(len(tok)) for _ in range(60)] for _ in range(20)]
    for ids in samples:
        ids = [i for i in ids if i not in runner.eos_ids]
        row = RequestText(item("x", [1], 10_000), tok, runner.eos_ids)
        for i in ids:
            row.append(i, 0.0)
        whole = tok.decode(ids, skip_special_tokens=True)
        assert row.text in (whole, whole.rstrip("\ufffd"))  # a trailing incomplete character is held back
