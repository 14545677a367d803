"""Clients nobody here wrote, each from PyPI, against a real server on the tiny model (issue 15):
the official openai SDK (sync, async, streaming, retries on 429), LiteLLM, LangChain and the
GuideLLM load tester in its synthetic mode.

The server is greedy at temperature 0 and reproducible with a seed, so every client must get
exactly the openai SDK's answer for the same request."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from service.launcher import Server, start_server
from tests.test_production import TINY, metric, wait_until

CHAT = [{"role": "user", "content": "Tell me a story"}]
SAMPLED = {"temperature": 1.0, "top_p": 0.9, "seed": 7}  # random-looking text, the same every time
MAX = 12


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0, timeout=120)


def sdk_chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX, **kw)


def check_usage(usage: Any, max_tokens: int = MAX) -> None:
    # a random model rarely emits EOS: every answer runs to max_tokens
    assert usage.completion_tokens == max_tokens
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# ---- the openai SDK ------------------------------------------------------------------------------
def test_openai_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "prompt": "x y z", "max_tokens": MAX, "temperature": 0}
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage == full.usage
    check_usage(full.usage)


def test_async_openai_concurrent_matches_one_at_a_time(client: openai.OpenAI, tiny_server: Server) -> None:
    prompts = [f"request number {i} says" for i in range(12)]

    async def one(c: openai.AsyncOpenAI, i: int) -> str:
        kw = {"model": "tiny", "max_tokens": 8, "temperature": 0}
        if i % 2:
            r = await c.completions.create(prompt=prompts[i], **kw)
            return r.choices[0].text
        text = ""
        async for ch in await c.chat.completions.create(messages=[{"role": "user", "content": prompts[i]}],
                                                        stream=True, **kw):
            text += (ch.choices[0].delta.content or "") if ch.choices else ""
        return text

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=tiny_server.v1, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(len(prompts))))

    def alone(i: int) -> str:
        kw = {"model": "tiny", "max_tokens": 8, "temperature": 0}
        if i % 2:
            return client.completions.create(prompt=prompts[i], **kw).choices[0].text
        msgs = [{"role": "user", "content": prompts[i]}]
        return client.chat.completions.create(messages=msgs, **kw).choices[0].message.content

    together = asyncio.run(asyncio.wait_for(run(), 120))
    assert together == [alone(i) for i in range(len(prompts))] and all(together)


# ---- the openai SDK against a full queue: 429, RateLimitError, built-in retries ------------------
HOLD = 30  # tokens of each request that keeps the server busy (step_delay_s: ~1.5 s)


@pytest.fixture(scope="module")
def busy_server(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One request at a time and at most one waiting: a third request gets 429."""
    srv = start_server(tmp_path_factory.mktemp("busy"), tiny_model_dir, policy="vs", batch_size=1, max_wait=0,
                       max_waiting_requests=1, step_delay_s=0.05, retry_after_s=0.25, **TINY)
    yield srv
    srv.stop()


@contextmanager
def queue_full(srv: Server) -> Iterator[None]:
    """One slow request running and one waiting while the block runs; both must then succeed."""
    c = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=120)
    with ThreadPoolExecutor(2) as pool:
        def hold(i: int) -> Any:
            return pool.submit(c.completions.create, model="tiny", prompt=f"hold {i}", max_tokens=HOLD)

        running = hold(0)
        wait_until(lambda: metric(srv, "magnus_running_requests") == 1, 30, "the first request to run")
        waiting = hold(1)
        wait_until(lambda: metric(srv, "magnus_waiting_requests") == 1, 30, "the second request to wait")
        yield
        assert [f.result().usage.completion_tokens for f in (running, waiting)] == [HOLD, HOLD]


def test_full_queue_raises_rate_limit_error_without_retries(busy_server: Server) -> None:
    c = openai.OpenAI(base_url=busy_server.v1, api_key="x", max_retries=0)
    rejected = metric(busy_server, "magnus_rejected_requests_total", reason="queue_full")

    async def async_chat() -> None:
        async with openai.AsyncOpenAI(base_url=busy_server.v1, api_key="x", max_retries=0) as ac:
            await ac.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)

    with queue_full(busy_server):
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="one too many", max_tokens=4)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True)
        with pytest.raises(openai.RateLimitError):
            asyncio.run(async_chat())
    assert e.value.status_code == 429 and e.value.code == "server_overloaded"
    assert e.value.response.headers["retry-after"] == "1" and e.value.response.headers["retry-after-ms"] == "250"
    assert metric(busy_server, "magnus_rejected_requests_total", reason="queue_full") == rejected + 3


def test_sdk_retries_get_through_once_the_queue_drains(busy_server: Server) -> None:
    c = openai.OpenAI(base_url=busy_server.v1, api_key="x", max_retries=40, timeout=120)
    rejected = metric(busy_server, "magnus_rejected_requests_total", reason="queue_full")
    with queue_full(busy_server), ThreadPoolExecutor(2) as pool:
        plain = pool.submit(c.completions.with_raw_response.create, model="tiny", prompt="patient", max_tokens=4)
        streamed = pool.submit(c.chat.completions.with_raw_response.create, model="tiny", messages=CHAT,
                               max_tokens=4, stream=True, stream_options={"include_usage": True})
        plain_raw, stream_raw = plain.result(), streamed.result()
    check_usage(plain_raw.parse().usage, 4)
    chunks = list(stream_raw.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check_usage(chunks[-1].usage, 4)
    # each was told 429 (Retry-After) at least once, waited, and got through; every 429 was a retry
    assert plain_raw.retries_taken >= 1 and stream_raw.retries_taken >= 1
    retried = metric(busy_server, "magnus_rejected_requests_total", reason="queue_full") - rejected
    assert retried == plain_raw.retries_taken + stream_raw.retries_taken


# ---- LiteLLM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
    import litellm

    return litellm


def test_litellm_matches_the_openai_sdk(litellm: Any, client: openai.OpenAI, tiny_server: Server) -> None:
    kw = {"model": "openai/tiny", "api_base": tiny_server.v1, "api_key": "x", "messages": CHAT, "max_tokens": MAX}
    for extra in ({"temperature": 0}, SAMPLED):
        ours, theirs = sdk_chat(client, **extra), litellm.completion(**kw, **extra)
        assert isinstance(theirs.choices[0].message.content, str) and theirs.choices[0].message.content
        assert theirs.choices[0].message.content == ours.choices[0].message.content
        assert theirs.choices[0].finish_reason == ours.choices[0].finish_reason == "length"
        check_usage(theirs.usage)
        assert theirs.usage.prompt_tokens == ours.usage.prompt_tokens

    chunks = list(litellm.completion(**kw, **SAMPLED, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        sdk_chat(client, **SAMPLED).choices[0].message.content
    check_usage(chunks[-1].usage)

    text = litellm.text_completion(model="openai/tiny", api_base=tiny_server.v1, api_key="x", prompt="x y z",
                                   max_tokens=MAX, temperature=0)
    assert text.choices[0].text == client.completions.create(
        model="tiny", prompt="x y z", max_tokens=MAX, temperature=0).choices[0].text

    async def together() -> list:
        return await asyncio.gather(*(litellm.acompletion(**kw, **SAMPLED) for _ in range(4)))

    answers = asyncio.run(asyncio.wait_for(together(), 120))
    assert {a.choices[0].message.content for a in answers} == {sdk_chat(client, **SAMPLED).choices[0].message.content}


# ---- LangChain ------------------------------------------------------------------------------------
def test_langchain_matches_the_openai_sdk(client: openai.OpenAI, tiny_server: Server) -> None:
    from langchain_openai import ChatOpenAI, OpenAI

    ours = sdk_chat(client, **SAMPLED)
    chat = ChatOpenAI(base_url=tiny_server.v1, api_key="x", model="tiny", max_tokens=MAX, max_retries=0, **SAMPLED)
    msg = chat.invoke(CHAT[0]["content"])
    assert isinstance(msg.content, str) and msg.content == ours.choices[0].message.content
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.usage_metadata["output_tokens"] == MAX
    assert msg.usage_metadata["input_tokens"] == ours.usage.prompt_tokens
    assert msg.usage_metadata["total_tokens"] == ours.usage.total_tokens

    chunks = list(chat.stream(CHAT[0]["content"], stream_usage=True))
    joined = chunks[0]
    for ch in chunks[1:]:
        joined += ch
    assert joined.content == ours.choices[0].message.content
    assert joined.usage_metadata["output_tokens"] == MAX and joined.response_metadata["finish_reason"] == "length"

    greedy = ChatOpenAI(base_url=tiny_server.v1, api_key="x", model="tiny", max_tokens=MAX, temperature=0,
                        max_retries=0)
    answers = greedy.batch([CHAT[0]["content"]] * 4)  # concurrent, from a thread pool
    assert {a.content for a in answers} == {sdk_chat(client, temperature=0).choices[0].message.content}

    llm = OpenAI(base_url=tiny_server.v1, api_key="x", model="tiny", max_tokens=MAX, temperature=0, max_retries=0)
    assert llm.invoke("x y z") == client.completions.create(
        model="tiny", prompt="x y z", max_tokens=MAX, temperature=0).choices[0].text


# ---- GuideLLM, synthetic data ---------------------------------------------------------------------
def test_guidellm_synthetic_benchmark(tiny_server: Server, tiny_model_dir: str, tmp_path: Path) -> None:
    # completions, not GuideLLM's default chat: the prompt is then exactly its synthetic text
    n, prompt_tokens, output_tokens = 8, 32, 8
    before = metric(tiny_server, "magnus_generation_tokens_total")
    out = tmp_path / "benchmarks.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={tiny_server.base_url},model=tiny,request_format=/v1/completions",
           "--profile", "kind=concurrent,streams=4", "--constraint", f"kind=max_requests,count={n}",
           "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_model_dir}",
           "--output", f"kind=json,path={out}", "--disable-console"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    (bench,) = json.loads(out.read_text())["benchmarks"]
    m = bench["metrics"]
    assert m["request_totals"] == {"successful": n, "errored": 0, "incomplete": 0, "total": n}
    assert len(bench["requests"]["successful"]) == n and not bench["requests"]["errored"]
    assert all(isinstance(r["output"], str) and r["output"] for r in bench["requests"]["successful"])
    # GuideLLM asks for ignore_eos and exactly output_tokens; the server's usage must agree
    got = m["output_token_count"]["successful"]
    assert (got["min"], got["max"], got["count"]) == (output_tokens, output_tokens, n)
    prompt = m["prompt_token_count"]["successful"]  # GuideLLM made each prompt of this many tokens
    assert (prompt["min"], prompt["max"]) == (prompt_tokens, prompt_tokens)
    assert metric(tiny_server, "magnus_generation_tokens_total") - before == n * output_tokens
