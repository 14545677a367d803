"""The OpenAI/vLLM sampling extras on both runners (static and iteration-level), real tiny model:
logprobs, logit_bias, penalties, min_tokens, ignore_eos, stop_token_ids, each against a reference
computed another way (transformers' own generate, or a plain full-forward loop)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from scheduler.contract import RowOutput, WorkBatch, WorkItem
from scheduler.memory import delta_from_config
from scheduler.request import SamplingParams
from worker.iteration import IterationRunner
from worker.loader import load_model, load_tokenizer
from worker.runner import BatchRunner

PROMPT = "the quick brown fox jumps over the lazy dog and then"
OTHER = "a second, unrelated prompt of another length"


@pytest.fixture(scope="module")
def parts(tiny_model_dir: str):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    return model, tok, int(delta_from_config(model.config, 4))


def run(parts, mode: str, items: list[WorkItem]) -> dict[str, RowOutput]:
    """Every item's outcome, all in one batch (static) or joining one running set (iteration)."""
    model, tok, delta = parts
    if mode == "static":
        return {r.request_id: r for r in BatchRunner(model, tok, "cpu", delta).run(WorkBatch(1, items)).rows}
    msgs: list[tuple[str, Any]] = []
    runner = IterationRunner(model, tok, "cpu", lambda k, p: msgs.append((k, p)), delta)
    runner.submit(WorkBatch(1, items[:1]))
    runner.step()
    runner.submit(WorkBatch(2, items[1:]))  # joins a running row
    for _ in range(1000):
        if not runner.busy:
            break
        runner.step()
    return {p.rows[0].request_id: p.rows[0] for k, p in msgs if k == "done"}


def item(tok, rid: str, text: str, max_tokens: int, **sampling) -> WorkItem:
    return WorkItem(rid, tok.encode(text), max_tokens, SamplingParams(logprobs=0, **sampling))


def ids_of(row: RowOutput) -> list[int]:
    assert row.logprobs is not None
    return [e.token_id for e in row.logprobs]


def reference(model, prompt_ids: list[int], n: int, freq: float = 0.0, pres: float = 0.0) -> list[int]:
    """Greedy decoding by a full forward pass per token with OpenAI's penalties on the output counts."""
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits = logits - freq * counts - pres * (counts > 0).float()
            t = int(logits.argmax())
            ids.append(t)
            out.append(t)
    return out


MODES = ["static", "iteration"]


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_are_the_models_own_and_top_k_sorted(parts, mode: str) -> None:
    model, tok, _ = parts
    a = WorkItem("a", tok.encode(PROMPT), 6, SamplingParams(logprobs=3))
    b = WorkItem("b", tok.encode(OTHER), 4, SamplingParams())
    rows = run(parts, mode, [a, b])
    assert rows["b"].logprobs is None  # only rows that asked
    got = rows["a"].logprobs
    assert len(got) == rows["a"].output_tokens == 6
    ids = list(a.prompt_ids)
    with torch.inference_mode():
        for e in got:
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            assert e.logprob == pytest.approx(float(ref[e.token_id]), abs=1e-3)
            assert [t for t, _, _ in e.top] == ref.topk(3).indices.tolist()
            assert e.top[0][0] == e.token_id  # greedy: the chosen token is the most likely one
            assert [lp for _, _, lp in e.top] == sorted((lp for _, _, lp in e.top), reverse=True)
            assert e.token == tok.decode([e.token_id])
            ids.append(e.token_id)


@pytest.mark.parametrize("mode", MODES)
def test_repetition_penalty_and_min_tokens_match_transformers_generate(parts, mode: str) -> None:
    model, tok, _ = parts
    eos = tok.eos_token_id
    a = item(tok, "rep", PROMPT, 12, repetition_penalty=1.8)
    # the end token is pushed to the top, so only min_tokens keeps the row going
    b = item(tok, "min", OTHER, 12, min_tokens=5, logit_bias=((eos, 100.0),))
    plain = item(tok, "plain", PROMPT, 12)
    rows = run(parts, mode, [a, b, plain])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([a.prompt_ids]), max_new_tokens=12, do_sample=False,
                             repetition_penalty=1.8, pad_token_id=eos)[0, len(a.prompt_ids):].tolist()
    assert ids_of(rows["rep"]) == ref
    assert ids_of(rows["rep"]) != ids_of(rows["plain"])  # the penalty changed the output
    assert ids_of(rows["min"])[:5] != [eos] * 5 and eos not in ids_of(rows["min"])[:5]
    assert ids_of(rows["min"])[5] == eos and rows["min"].output_tokens == 6
    assert rows["min"].finish_reason == "stop"


@pytest.mark.parametrize("mode", MODES)
def test_frequency_and_presence_penalties_match_a_reference_loop(parts, mode: str) -> None:
    model, tok, _ = parts
    f = item(tok, "f", PROMPT, 10, frequency_penalty=1.5)
    p = item(tok, "p", OTHER, 10, presence_penalty=2.0)
    neg = item(tok, "neg", PROMPT, 10, frequency_penalty=-2.0)
    rows = run(parts, mode, [f, p, neg])
    assert ids_of(rows["f"]) == reference(model, f.prompt_ids, 10, freq=1.5)
    assert ids_of(rows["p"]) == reference(model, p.prompt_ids, 10, pres=2.0)
    assert ids_of(rows["neg"]) == reference(model, neg.prompt_ids, 10, freq=-2.0)
    assert len(set(ids_of(rows["neg"]))) < len(set(ids_of(rows["f"])))  # a negative penalty repeats


@pytest.mark.parametrize("mode", MODES)
def test_logit_bias_ignore_eos_and_stop_token_ids(parts, mode: str) -> None:
    _, tok, _ = parts
    eos = tok.eos_token_id
    target = tok.encode(" banana")[-1]
    bias = item(tok, "bias", PROMPT, 5, logit_bias=((target, 100.0),))
    ends = item(tok, "ends", PROMPT, 5, logit_bias=((eos, 100.0),))
    ignore = item(tok, "ignore", PROMPT, 5, logit_bias=((eos, 100.0),), ignore_eos=True)
    stop_id = item(tok, "stop_id", OTHER, 5, logit_bias=((target, 100.0),), stop_token_ids=(target,))
    plain = item(tok, "plain", OTHER, 5)
    rows = run(parts, mode, [bias, ends, ignore, stop_id, plain])
    assert ids_of(rows["bias"]) == [target] * 5 and rows["bias"].text == " banana" * 5
    assert (rows["ends"].output_tokens, rows["ends"].finish_reason, rows["ends"].text) == (1, "stop", "")
    assert (rows["ignore"].output_tokens, rows["ignore"].finish_reason) == (5, "length")
    assert ids_of(rows["ignore"]) == [eos] * 5
    assert (rows["stop_id"].output_tokens, rows["stop_id"].finish_reason, rows["stop_id"].text) == (1, "stop", "")
    alone = run(parts, "static", [plain])["plain"]
    assert ids_of(rows["plain"]) == ids_of(alone)  # its neighbours' processors leave a row alone


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_with_penalties_reproducible(parts, mode: str) -> None:
    _, tok, _ = parts
    s = dict(temperature=0.9, top_p=0.9, seed=11, frequency_penalty=0.5, repetition_penalty=1.2)
    first = run(parts, mode, [item(tok, "x", PROMPT, 10, **s), item(tok, "y", OTHER, 7)])["x"]
    again = run(parts, mode, [item(tok, "x", PROMPT, 10, **s)])["x"]
    assert ids_of(first) == ids_of(again)


def _reference_nucleus(probs: torch.Tensor, top_p: float, u: float) -> int:
    """The textbook nucleus draw: sort the whole vocabulary, keep the prefix, invert its CDF."""
    vals, order = probs.sort(descending=True)
    keep = (vals.cumsum(0) - vals) < top_p
    keep[0] = True
    cum = (vals * keep).cumsum(0)
    return int(order[min(int(torch.searchsorted(cum, u * cum[-1])), len(cum) - 1)])


@pytest.mark.parametrize(("vocab", "scale"), [(4000, 0.5), (4000, 8.0), (20000, 1.5)])  # flat (full sort), peaked, between
def test_nucleus_fast_path_equals_a_full_sort(vocab: int, scale: float) -> None:
    from worker.sampling import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(16, vocab, generator=g) * scale, dim=-1)
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.3] * 4)
    u = torch.rand(16, generator=g)
    got = _inverse_cdf(probs, top_p, u).tolist()
    assert got == [_reference_nucleus(probs[i], float(top_p[i]), float(u[i])) for i in range(16)]


def test_sampling_without_top_p_follows_the_distribution() -> None:
    from worker.sampling import _inverse_cdf

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(_inverse_cdf(probs, torch.ones(40000), u), minlength=4).float() / 40000
    assert torch.allclose(freq, probs[0], atol=0.01)
