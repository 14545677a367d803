"""The OpenAI-compatible API over a real server (tiny random Llama), through the official client."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import openai
import pytest

from tests.conftest import Server


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0)


def test_models_and_health(tiny_server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_server.base_url + "/health").json()["status"] == "ok"
    assert httpx.get(tiny_server.base_url + "/docs").status_code == 200


def test_chat_completion_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=7, temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 7
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_is_deterministic_and_max_tokens_honoured(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    # a random model rarely emits EOS: it must stop at exactly its own max_tokens
    assert a.usage.completion_tokens == 12 and a.choices[0].finish_reason == "length"


def test_seeded_sampling_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="abc", max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_stream_chat_matches_non_stream(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_stream_completion_ends_with_done(tiny_server: Server) -> None:
    with httpx.stream("POST", tiny_server.v1 + "/completions", json={
        "model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True,
    }, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(x.startswith("data: ") for x in lines)


def test_stop_string(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="x y z", max_tokens=16, temperature=0).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    r = client.completions.create(model="tiny", prompt="x y z", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.find(stop)]


def test_multiple_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 6


BAD = [
    # (body changes, expected status, expected param)
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -5}, 400, "max_tokens"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"temperature": -0.1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"n": 65}, 400, "n"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"min_tokens": 5}, 400, "min_tokens"),
    ({"top_logprobs": 2}, 400, None),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.role"),
    ({"messages": "hello"}, 400, "messages"),
    ({"model": "gpt-9"}, 404, "model"),
    ({"max_tokens": 5000}, 400, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": None}, 400, "model"),
]


@pytest.mark.parametrize(("change", "status", "param"), BAD)
def test_bad_input_table(tiny_server: Server, change: dict, status: int, param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(change)
    r = httpx.post(tiny_server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_lone_surrogate_is_a_clear_400(tiny_server: Server) -> None:
    raw = b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'
    r = httpx.post(tiny_server.v1 + "/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_context_error_names_both_counts(tiny_server: Server) -> None:
    r = httpx.post(tiny_server.v1 + "/completions", json={"model": "tiny", "prompt": "word " * 50, "max_tokens": 1000})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "1024" in msg and "1000" in msg and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"model": "tiny"}', b""])
def test_malformed_bodies(tiny_server: Server, raw: bytes) -> None:
    r = httpx.post(tiny_server.v1 + "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_bad_request_does_not_disturb_others(tiny_server: Server) -> None:
    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=tiny_server.v1, api_key="x", max_retries=0)
        good = [c.completions.create(model="tiny", prompt=f"p{i}", max_tokens=4, temperature=0) for i in range(6)]
        bad = [c.completions.create(model="tiny", prompt="p", max_tokens=-1) for _ in range(3)]
        return await asyncio.gather(*good, *bad, return_exceptions=True)

    res = asyncio.run(main())
    assert all(r.usage.completion_tokens == 4 for r in res[:6])
    assert all(isinstance(r, openai.BadRequestError) for r in res[6:])


def test_concurrent_requests_are_batched_and_logged(tiny_server: Server) -> None:
    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=tiny_server.v1, api_key="x", max_retries=0)
        return await asyncio.gather(*[
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=5,
                                      temperature=0)
            for i in range(32)
        ])

    res = asyncio.run(main())
    assert len(res) == 32 and all(r.usage.completion_tokens == 5 for r in res)
    metrics = httpx.get(tiny_server.base_url + "/metrics").text
    assert 'magnus_requests_total{status="ok"}' in metrics
    assert "magnus_batch_size_bucket" in metrics and "magnus_time_to_first_token_seconds" in metrics
    ids = {r.id for r in res}
    deadline = time.time() + 10
    while time.time() < deadline:  # the log is written off the request path
        with sqlite3.connect(tiny_server.db_path) as db:
            rows = db.execute(
                f"SELECT id, batch_id, completion_tokens, status FROM requests WHERE id IN ({','.join('?' * 32)})",
                list(ids)).fetchall()
        if len(rows) == 32:
            break
        time.sleep(0.2)
    assert len(rows) == 32 and all(r[3] == "ok" and r[2] == 5 for r in rows)
    batch_ids = {r[1] for r in rows}
    with sqlite3.connect(tiny_server.db_path) as db:
        sizes = [s for (s,) in db.execute(
            f"SELECT size FROM batches WHERE id IN ({','.join('?' * len(batch_ids))})", list(batch_ids))]
    assert max(sizes) == 4  # batch_size=4 for this server: batching happened, capped at the setting
    assert sum(sizes) == 32
