"""Static batches that let go, through a real server: a short request of a batch completes (its
response and its log record) before a long one of the same batch; in the paper's literal mode
both complete when the batch ends."""

from __future__ import annotations

import asyncio
import sqlite3

import openai
import pytest

STEP_S = 0.02  # fault-injection step delay: a long row of 80 tokens takes >= 1.6 s longer than a short one


async def _pair(base: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    order: list[str] = []

    async def one(name: str, max_tokens: int) -> None:
        stream = await client.completions.create(model="tiny", prompt=f"{name} request", max_tokens=max_tokens,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                order.append(name)

    await asyncio.gather(one("long", 80), one("short", 2))
    await client.close()
    return order


def _finishes(db: str) -> dict[str, tuple[int, float]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT max_tokens, batch_id, finish FROM requests WHERE status = 'ok'").fetchall()
    return {"long" if m == 80 else "short": (b, f) for m, b, f in rows}


@pytest.mark.parametrize("mode", ["early", "literal"])
def test_short_request_returns_before_the_long_one_of_its_batch(server_factory, tiny_model_dir: str, mode: str) -> None:
    srv = server_factory(tiny_model_dir, policy="vs", served_model_name="tiny", batch_size=2, max_wait=5.0,
                         step_delay_s=STEP_S, batch_exit=mode)
    order = asyncio.run(_pair(srv.v1))
    srv.stop()
    got = _finishes(str(srv.db_path))
    assert got["short"][0] == got["long"][0]  # one batch
    gap = got["long"][1] - got["short"][1]
    if mode == "early":
        assert order == ["short", "long"] and gap > 40 * STEP_S
    else:
        assert abs(gap) < 40 * STEP_S  # both wait for the batch's end


def test_a_timed_out_row_leaves_and_the_queue_moves_on(server_factory, tiny_model_dir: str) -> None:
    """A 1000-token request holds the only worker; at its 3 s timeout its row leaves the batch, so a
    request queued behind it is served before its own deadline (the literal mode would time it out:
    tests/test_production.py::test_timeout_and_cancel_while_waiting)."""
    srv = server_factory(tiny_model_dir, policy="vs", served_model_name="tiny", batch_size=1, max_wait=0.0,
                         request_timeout_s=3, step_delay_s=STEP_S)

    async def scenario() -> tuple[openai.APIStatusError | None, str]:
        client = openai.AsyncOpenAI(base_url=srv.v1, api_key="unused", max_retries=0)
        long = asyncio.create_task(client.completions.create(model="tiny", prompt="long", max_tokens=1000,
                                                             temperature=0))
        await asyncio.sleep(0.5)
        short = await client.completions.create(model="tiny", prompt="short", max_tokens=3, temperature=0)
        try:
            await long
            err = None
        except openai.APIStatusError as exc:
            err = exc
        await client.close()
        return err, short.choices[0].finish_reason

    err, finish = asyncio.run(scenario())
    assert err is not None and err.status_code == 504 and finish in ("stop", "length")
    srv.stop()
    with sqlite3.connect(srv.db_path) as db:
        long_steps = db.execute("SELECT total_tokens FROM batches WHERE size = 1 ORDER BY id LIMIT 1").fetchone()[0]
    assert long_steps < 1000  # the timed-out row stopped being computed
