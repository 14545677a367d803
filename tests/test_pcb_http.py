"""pcb end to end (tiny model): a worker that runs out of memory hands its rows back, they resume
from their tokens, every request is answered and no stream repeats or skips text."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai

from service.launcher import start_server
from tests.test_production import TINY, aclient, metric


def test_out_of_memory_preempts_and_every_request_is_answered(tiny_model_dir: str, tmp_path: Path) -> None:
    # Delta is 512 B (2 layers x 2 KV heads x 16 x fp32 x K,V): the cap holds ~2 rows of (prompt + 40 tokens)
    srv = start_server(tmp_path, tiny_model_dir, policy="pcb", max_batch_size=8, mem_cap_bytes=512 * 100,
                       **TINY)
    n = 8
    try:
        async def one(c: openai.AsyncOpenAI, i: int, stream: bool) -> tuple[str, int]:
            kw = {"model": "tiny", "prompt": f"the request number {i} says", "max_tokens": 40, "temperature": 0}
            if not stream:
                r = await c.completions.create(**kw)
                return r.choices[0].text, r.usage.completion_tokens
            text, usage = "", 0
            async for ch in await c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                text += ch.choices[0].text if ch.choices else ""
                usage = ch.usage.completion_tokens if ch.usage else usage
            return text, usage

        async def run() -> tuple[list, list]:
            c = aclient(srv)
            try:
                together = await asyncio.gather(*(one(c, i, i % 2 == 0) for i in range(n)), return_exceptions=True)
                alone = [await one(c, i, False) for i in range(n)]  # one at a time: no memory pressure
                return together, alone
            finally:
                await c.close()

        together, alone = asyncio.run(asyncio.wait_for(run(), 240))
        errors = [r for r in together if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert together == alone  # resumed rows continue exactly; streams neither repeat nor skip
        assert metric(srv, "magnus_preemptions_total") >= 2
    finally:
        srv.stop()


def test_wrong_predictions_injected_every_request_answered(tiny_model_dir: str, tmp_path: Path) -> None:
    # predictions scaled by 0.1: each request reserves ~4 of its 40 tokens, so pcb admits all 8 and
    # must preempt as they outgrow their reservations; the worker's own cap equals the budget
    budget = 512 * 150
    srv = start_server(tmp_path, tiny_model_dir, policy="pcb", max_batch_size=8, kv_budget_bytes=budget,
                       mem_cap_bytes=budget, prediction_scale=0.1, **TINY)
    try:
        async def run() -> tuple[list, list]:
            c = aclient(srv)
            try:
                async def one(i: int) -> str:
                    r = await c.completions.create(model="tiny", prompt=f"the request number {i} says",
                                                   max_tokens=40, temperature=0)
                    return r.choices[0].text
                together = await asyncio.gather(*(one(i) for i in range(8)), return_exceptions=True)
                alone = [await one(i) for i in range(8)]
                return together, alone
            finally:
                await c.close()

        together, alone = asyncio.run(asyncio.wait_for(run(), 240))
        errors = [r for r in together if isinstance(r, BaseException)]
        assert not errors, errors[:3]  # no out-of-memory (or any) error reaches a client
        assert together == alone
        assert metric(srv, "magnus_preemptions_total") >= 2
    finally:
        srv.stop()
