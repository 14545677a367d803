"""The in-place growing KV cache (worker.kvcache) computes what transformers' concatenating cache does."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from scheduler.contract import WorkBatch, WorkItem
from scheduler.memory import delta_from_config
from scheduler.request import SamplingParams
from worker.iteration import IterationRunner
from worker.kvcache import GrowableLayer, grow_in_place
from worker.loader import load_model, load_tokenizer
from worker.runner import BatchRunner


@pytest.fixture(scope="module")
def parts(tiny_model_dir: str):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    return model, tok, int(delta_from_config(model.config, 4))


def _decode(model, headroom: int, steps: int = 12) -> tuple[list[torch.Tensor], object]:
    """Prefill 3 left-padded rows, decode ``steps`` greedy steps, dropping row 1 halfway."""
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 9))
    mask = torch.ones((3, 9), dtype=torch.long)
    mask[0, :4] = 0
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = grow_in_place(out.past_key_values, headroom)
        pos, logits = mask.sum(-1), [out.logits[:, -1]]
        for step in range(steps):
            if step == steps // 2:
                keep = torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                mask, pos, logits[-1] = mask[keep], pos[keep], logits[-1][keep]
            nxt = logits[-1].argmax(-1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
            out = model(input_ids=nxt.view(-1, 1), attention_mask=mask, position_ids=pos.view(-1, 1),
                        past_key_values=cache, use_cache=True)
            cache, pos = out.past_key_values, pos + 1
            logits.append(out.logits[:, -1])
    return logits, cache


@pytest.mark.parametrize("headroom", [1, 4, 64])
def test_growing_in_place_equals_concatenation(parts, headroom: int) -> None:
    model = parts[0]
    want, plain = _decode(model, 0)
    got, grown = _decode(model, headroom)
    assert all(type(layer) is DynamicLayer for layer in plain.layers)
    assert all(isinstance(layer, GrowableLayer) for layer in grown.layers)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(plain.layers, grown.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys)
        assert b._kbuf.shape[2] >= b.keys.shape[2]  # the filled part is a view of the buffer


def test_a_step_writes_in_place_until_the_room_runs_out() -> None:
    layer = GrowableLayer(headroom=3)
    layer.update(torch.ones(2, 1, 5, 4), torch.ones(2, 1, 5, 4))
    buf = layer._kbuf
    assert buf.shape[2] == 5 + 3  # the first states start a buffer with ``headroom`` spare columns
    start = buf.data_ptr()
    for i in range(layer._kbuf.shape[2] - 5):
        k, _ = layer.update(torch.full((2, 1, 1, 4), float(i)), torch.zeros(2, 1, 1, 4))
        assert layer._kbuf.data_ptr() == start and k.data_ptr() == start  # no copy
    layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    assert layer._kbuf.data_ptr() != start and layer.keys.shape[2] == layer._len  # reallocated once full
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]  # replaced from outside (a trim)
    n = layer.keys.shape[2]
    k, _ = layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    assert k.shape[2] == n + 1 and torch.equal(k[:, :, :n], layer.keys[:, :, :n])


def _item(tok, rid: str, text: str, max_tokens: int, **sampling) -> WorkItem:
    return WorkItem(rid, tok.encode(text), max_tokens, SamplingParams(**sampling))


def test_runners_answer_the_same_with_either_cache(parts) -> None:
    model, tok, delta = parts
    items = [_item(tok, "a", "a long prompt that goes on and on about many things", 20),
             _item(tok, "b", "short", 7), _item(tok, "c", "sampled words here", 15, temperature=0.9, seed=3)]

    def iteration(headroom: int) -> dict[str, str]:
        sent: list = []
        r = IterationRunner(model, tok, "cpu", lambda k, p: sent.append((k, p)), delta, kv_headroom=headroom)
        r.submit(WorkBatch(1, items[:1]))
        for step in range(40):
            if step in (3, 6):  # joiners merge into the running cache (external replacement)
                r.submit(WorkBatch(step, [items[step // 3]]))
            r.step()
        assert not r.busy
        return {p.rows[0].request_id: p.rows[0].text for k, p in sent if k == "done"}

    def static(headroom: int) -> dict[str, str]:
        out = BatchRunner(model, tok, "cpu", delta, kv_headroom=headroom).run(WorkBatch(1, items))
        return {row.request_id: row.text for row in out.rows}

    assert iteration(2) == iteration(0) and len(iteration(2)) == 3
    assert static(2) == static(0) and len(static(2)) == 3
