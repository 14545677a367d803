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
    assert (s.size, s.max_gen, s.valid_tokens, s.total_tokens) == (2, 9, 12, 18)  # 6 tokens wasted on "a"
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
