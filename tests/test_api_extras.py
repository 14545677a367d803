"""The OpenAI features users reach for beyond plain text, over a real server (tiny random Llama)
through the official client: logprobs, n > 1, echo, logit_bias, vLLM's extras, prediction headers."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Server

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.bytes == list(e.token.encode())
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_streamed_logprobs_equal_the_whole_response(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    tokens, text = [], ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None:
                tokens += [(e.token, round(e.logprob, 4)) for e in c.logprobs.content]
    assert text == whole.choices[0].message.content
    assert tokens == [(e.token, round(e.logprob, 4)) for e in whole.choices[0].logprobs.content]


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert tok in top and top[tok] == pytest.approx(logprob) and 2 <= len(top) <= 3
    with pytest.raises(openai.BadRequestError):  # OpenAI's limit
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=6)


def test_echo(client: openai.OpenAI, tiny_server: Server) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == prompt + plain.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    bad = httpx.post(tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": "x", "echo": True,
                                                            "logprobs": 1}, timeout=30)
    assert bad.status_code == 400 and "echo" in bad.json()["error"]["message"]


def test_n_choices_seeded_and_usage(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", messages=CHAT, max_tokens=6, temperature=1.0, seed=5, n=3)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # each choice is a sample of its own
    assert [c.message.content for c in client.chat.completions.create(**kw).choices] == texts  # seeded
    one = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 18
    finished = set()
    for chunk in client.chat.completions.create(stream=True, **kw):
        finished |= {c.index for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1, 2}


def test_prompt_list_with_n_orders_choices_by_prompt(client: openai.OpenAI) -> None:
    prompts = ["First prompt here", "Second, quite different prompt"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        alone = client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone  # greedy: the n choices agree


def test_logit_bias_and_vllm_extras(client: openai.OpenAI, tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tid = AutoTokenizer.from_pretrained(tiny_model_dir).encode(" banana")[-1]
    r = client.completions.create(model="tiny", prompt="Fruit:", max_tokens=3, temperature=0,
                                  logit_bias={str(tid): 100})
    assert r.choices[0].text == " banana" * 3
    r = client.completions.create(model="tiny", prompt="Fruit:", max_tokens=3, temperature=0,
                                  logit_bias={str(tid): 100}, extra_body={"stop_token_ids": [tid]})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = client.completions.create(model="tiny", prompt="Fruit:", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True, "min_tokens": 7, "priority": -3,
                                              "repetition_penalty": 1.3},
                                  frequency_penalty=0.5, presence_penalty=0.5)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "length")


def test_prediction_headers(server_factory, tiny_model_dir: str) -> None:
    srv = server_factory(tiny_model_dir, policy="magnus", served_model_name="tiny")
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "n": 2}
    r = httpx.post(srv.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    point = [int(x) for x in r.headers["x-magnus-predicted-tokens"].split(",")]
    high = [int(x) for x in r.headers["x-magnus-predicted-tokens-high"].split(",")]
    assert len(point) == len(high) == 2 and all(h >= p >= 1 for p, h in zip(point, high, strict=True))
    assert [int(x) for x in r.headers["x-magnus-queue-position"].split(",")] == [0, 1]
    with httpx.stream("POST", srv.v1 + "/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        assert "x-magnus-predicted-tokens" in s.headers
        s.read()


def test_headers_off_and_transformers_runner_refuses_what_it_cannot_do(server_factory, tiny_model_dir: str) -> None:
    srv = server_factory(tiny_model_dir, policy="ccb", served_model_name="tiny", prediction_headers=False)
    r = httpx.post(srv.v1 + "/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200 and not any(h.startswith("x-magnus-") for h in r.headers)
    r = httpx.post(srv.v1 + "/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 3,
                                                       "logprobs": True}, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "logprobs" and "--continuous-runner iteration" in err["message"]
