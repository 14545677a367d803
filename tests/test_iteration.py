"""The iteration-level runner (pcb's worker) on a real tiny model: joins, leaves, preemption, OOM."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.contract import CHECKPOINTS, BatchOutput, Outcome, Preempted, RowProgress, WorkBatch, WorkItem
from scheduler.memory import delta_from_config
from scheduler.request import SamplingParams
from worker.iteration import IterationRunner
from worker.loader import load_model, load_tokenizer
from worker.loops import is_looping
from worker.runner import BatchRunner


class Sink:
    """Collects what the runner sends."""

    def __init__(self) -> None:
        self.msgs: list[tuple[str, Any]] = []

    def __call__(self, kind: str, payload: Any) -> None:
        self.msgs.append((kind, payload))

    def done(self) -> dict[str, BatchOutput]:
        out = {}
        for kind, p in self.msgs:
            if kind == "done":
                out[p.rows[0].request_id if p.rows else str(p.batch_id)] = p
        return out

    def streamed(self) -> dict[str, str]:
        got: dict[str, str] = {}
        for kind, p in self.msgs:
            if kind == "tokens":
                for e in p:
                    assert e.offset == len(got.get(e.request_id, ""))  # contiguous, no splice
                    got[e.request_id] = got.get(e.request_id, "") + e.text
        return got

    def of(self, kind: str) -> list[Any]:
        return [p for k, p in self.msgs if k == kind]


@pytest.fixture(scope="module")
def parts(tiny_model_dir: str):
    import torch

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    return model, tok, int(delta_from_config(model.config, 4))


def make(parts, sink: Sink, **kw) -> IterationRunner:
    model, tok, delta = parts
    return IterationRunner(model, tok, "cpu", sink, delta, **kw)


def item(tok, rid: str, text: str, max_tokens: int, **sampling) -> WorkItem:
    return WorkItem(rid, tok.encode(text), max_tokens, SamplingParams(**sampling))


def alone(parts, it: WorkItem) -> str:
    model, tok, delta = parts
    return BatchRunner(model, tok, "cpu", delta).run(WorkBatch(99, [it])).rows[0].text


def run_until_idle(r: IterationRunner, limit: int = 1000) -> None:
    for _ in range(limit):
        if not r.busy:
            return
        r.step()
    raise AssertionError("runner did not finish")


def test_joins_mid_run_and_short_rows_finish_first(parts) -> None:
    tok = parts[1]
    sink = Sink()
    r = make(parts, sink)
    long_ = item(tok, "long", "the story of a long prompt begins here and goes on", 30)
    r.submit(WorkBatch(1, [long_]))
    for _ in range(5):
        r.step()
    short = item(tok, "short", "hi", 4)
    sampled = item(tok, "sampled", "a sampled row", 12, temperature=0.8, seed=7)
    r.submit(WorkBatch(2, [short]))
    r.submit(WorkBatch(3, [sampled]))
    r.step()
    assert len(r.rows) == 3 and r.cache.layers[0].keys.shape[0] == 3  # joined between steps
    run_until_idle(r)
    done = sink.done()
    order = [p.rows[0].request_id for k, p in sink.msgs if k == "done"]
    assert order.index("short") < order.index("long")  # completion order, not wall time
    for it in (long_, short, sampled):  # joining a running set changes nothing in a row's output
        assert done[it.request_id].rows[0].text == alone(parts, it)
        assert sink.streamed()[it.request_id] == done[it.request_id].rows[0].text
    assert done["long"].rows[0].output_tokens == 30 and done["short"].rows[0].output_tokens == 4


def test_rows_leave_and_padding_is_trimmed(parts) -> None:
    tok = parts[1]
    sink = Sink()
    r = make(parts, sink)
    r.submit(WorkBatch(1, [item(tok, "a", "a very long prompt with many many words in it to pad", 3),
                           item(tok, "b", "short", 10)]))
    widths = []
    while r.busy:
        r.step()
        if r.rows:
            widths.append((len(r.rows), r.mask.shape[1], r.cache.layers[0].keys.shape[2]))
    assert widths[0][0] == 2 and widths[-1][0] == 1  # "a" left after its 3 tokens
    n, cols, kv = widths[-1]
    # prompt + the 8 tokens fed back before its 9th was sampled; the long prompt's columns went with "a"
    assert cols == kv == len(tok.encode("short")) + 8


def test_cancel_and_preempt_resume_reproduce_the_text(parts) -> None:
    tok = parts[1]
    sink = Sink()
    r = make(parts, sink)
    keep = item(tok, "keep", "tell me about the sea", 24, temperature=0.9, seed=3)
    gone = item(tok, "gone", "tell me about the sky", 24)
    r.submit(WorkBatch(1, [keep, gone]))
    for _ in range(6):
        r.step()
    r.cancel("gone")
    assert [row.item.request_id for row in r.rows] == ["keep"]
    r.preempt("keep")
    pre: Preempted = sink.of("preempted")[0][0]
    assert pre.request_id == "keep" and len(pre.generated_ids) == 7 and not r.busy
    resumed = WorkItem(keep.request_id, keep.prompt_ids, keep.max_tokens, keep.sampling, pre.generated_ids)
    r.submit(WorkBatch(2, [resumed]))
    run_until_idle(r)
    outs = [p for k, p in sink.msgs if k == "done"]
    assert outs[0].rows[0].request_id == "gone" and outs[0].rows[0].output_tokens == 7  # stopped at the cancel
    final = outs[-1].rows[0]
    assert final.output_tokens == 24 and final.text == alone(parts, keep)  # seeded sampling continues exactly
    assert sink.streamed()["keep"] == final.text  # no text sent twice


def test_out_of_memory_hands_rows_back(parts) -> None:
    tok = parts[1]
    model, _, delta = parts
    sink = Sink()
    r = make(parts, sink, mem_cap_bytes=delta * 40)
    r.submit(WorkBatch(1, [item(tok, str(i), "one two three four five", 30) for i in range(3)]))
    run_until_idle(r)
    back = sink.of("preempted")[0]
    assert {p.request_id for p in back} == {"0", "1", "2"} and all(p.oom for p in back)
    sink.msgs.clear()
    r.submit(WorkBatch(2, [item(tok, "alone", "one two three four five six seven eight", 60)]))
    run_until_idle(r)
    (out,) = sink.of("done")
    assert out.outcome is Outcome.OOM  # alone and still too large: an OOM batch of one


def test_progress_reports_and_loop_detector(parts) -> None:
    tok = parts[1]
    sink = Sink()
    r = make(parts, sink, progress_every=4)
    r.submit(WorkBatch(1, [item(tok, "p", "count", 20)]))
    run_until_idle(r)
    reports: list[list[RowProgress]] = sink.of("progress")
    assert [rep[0].generated for rep in reports] == [5, 9, 13, 17]
    assert is_looping([1, 2, 3] * 30) and is_looping([7] * 60)
    assert not is_looping(list(range(200))) and not is_looping([1, 2, 3] * 10)  # too short to call
    assert not is_looping([1, 2, 3] * 30 + [4])  # the cycle broke


def test_head_states_are_what_the_probe_computes_offline(parts, tiny_model_dir: str) -> None:
    """The states a worker reports at the checkpoints (joins mid-run, a preempted row resumed) are
    the probe's ``head_state_means`` of the same prompt and tokens: what the re-predictor trains on."""
    import numpy as np

    from predictor.probe import PromptProbe

    probe = PromptProbe(tiny_model_dir, "tiny", layer=1)
    sink = Sink()
    r = make(parts, sink, progress_every=4, state_layer=1)
    pairs = [("Correct the grammar.", "He go to school."),
             ("Translate into French.", "The cat sits on the mat and looks at the garden.")]
    items = [WorkItem(str(i), probe.prompt_ids(a, u), 40, SamplingParams()) for i, (a, u) in enumerate(pairs)]
    r.submit(WorkBatch(1, [items[0]]))
    for _ in range(5):
        r.step()
    r.submit(WorkBatch(2, [items[1]]))  # joins mid-run: its state row follows its cache row
    for _ in range(15):
        r.step()
    r.preempt("0")  # resumed below: its resumed tokens' states come from the prefill
    pre: Preempted = sink.of("preempted")[0][0]
    r.submit(WorkBatch(3, [WorkItem("0", items[0].prompt_ids, 40, SamplingParams(), pre.generated_ids)]))
    run_until_idle(r)
    heads = {o.rows[0].request_id: o.rows[0].head_ids for o in sink.of("done")}
    assert all(len(h) == 40 for h in heads.values())
    _, H = probe.encode_with_heads([a for a, _ in pairs], [u for _, u in pairs], [heads["0"], heads["1"]])
    for i in (0, 1):
        got = [np.array(p.state) for rep in sink.of("progress") for p in rep if p.request_id == str(i) and p.state]
        assert len(got) >= 3  # checkpoints 8..32, each sent once (one may fall between a preemption and a report)
        ks = []
        for g in got:
            c = int(np.nanargmin([np.abs(g - h).max() if not np.isnan(h).any() else np.inf for h in H[i]]))
            np.testing.assert_allclose(g, H[i, c], rtol=1e-3, atol=1e-4)
            ks.append(CHECKPOINTS[c])
        assert ks == sorted(set(ks)) and set(ks) <= {8, 16, 24, 32}
    with pytest.raises(ValueError, match="state_layer"):
        make(parts, Sink(), state_layer=3)
