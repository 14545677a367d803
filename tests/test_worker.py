"""The static batch runner on a real (tiny, random) model."""

from __future__ import annotations

import pytest

from worker.loader import load_model, load_tokenizer
from worker.runner import BatchRunner
from worker.types import GenBatch, GenRequest


@pytest.fixture(scope="module")
def runner(tiny_model_dir: str) -> BatchRunner:
    import torch

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    c = model.config
    delta = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    return BatchRunner(model, tok, "cpu", delta)


def ids(runner: BatchRunner, text: str) -> list[int]:
    return runner.tok.encode(text)


def test_batch_equals_single_and_counts_waste(runner: BatchRunner) -> None:
    reqs = [GenRequest("a", ids(runner, "hello there"), 3), GenRequest("b", ids(runner, "a much longer prompt here"), 9)]
    done = runner.run(GenBatch(1, reqs))
    single = {r.id: runner.run(GenBatch(2, [r])).results[0] for r in reqs}
    for res in done.results:
        assert res.text == single[res.id].text  # left padding does not change greedy output
    by = {r.id: r for r in done.results}
    assert by["a"].completion_tokens == 3 and by["b"].completion_tokens == 9
    s = done.stats
    assert (s.size, s.max_gen, s.valid_tokens, s.total_tokens) == (2, 9, 12, 18)  # 6 tokens wasted on "a"
    assert s.max_prompt == max(len(r.prompt_ids) for r in reqs)


def test_streamed_events_concatenate_to_result(runner: BatchRunner) -> None:
    got: dict[str, str] = {}
    done = runner.run(GenBatch(3, [GenRequest("x", ids(runner, "stream me"), 8)]),
                      lambda evs: [got.__setitem__(e.request_id, got.get(e.request_id, "") + e.text) for e in evs])
    assert got["x"] == done.results[0].text


def test_memory_cap_reports_oom_and_runner_recovers(tiny_model_dir: str, runner: BatchRunner) -> None:
    capped = BatchRunner(runner.model, runner.tok, "cpu", runner.delta, mem_cap_bytes=runner.delta * 40)
    big = [GenRequest(str(i), ids(runner, "one two three four five"), 20) for i in range(4)]
    done = capped.run(GenBatch(4, big))
    assert done.error and done.error.startswith("oom") and done.stats.oom and not done.results
    ok = capped.run(GenBatch(5, big[:1]))  # a single request fits: the runner is still healthy
    assert ok.error is None and ok.results[0].completion_tokens == 20
