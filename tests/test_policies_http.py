"""Every policy is selectable end to end through the HTTP API (tiny model)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import openai
import pytest


@pytest.mark.parametrize("policy", ["vs", "vsq", "ccb", "pcb", "glp", "abp", "magnus"])
def test_policy_serves_requests(server_factory, tiny_model_dir: str, policy: str) -> None:
    srv = server_factory(tiny_model_dir, policy=policy, served_model_name="tiny", batch_size=4, max_wait=0.05)

    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=srv.v1, api_key="x", max_retries=0)
        return await asyncio.gather(*[
            c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Translate."},
                                                              {"role": "user", "content": "word " * (1 + 5 * i)}],
                                      max_tokens=3 + i, temperature=0)
            for i in range(6)
        ])

    res = asyncio.run(main())
    assert [r.usage.completion_tokens for r in res] == [3 + i for i in range(6)]
    deadline = time.time() + 10
    rows: list = []
    while time.time() < deadline and len(rows) < 6:
        with sqlite3.connect(srv.db_path) as db:
            rows = db.execute("SELECT b.policy, r.predicted_tokens FROM requests r JOIN batches b ON r.batch_id = b.id"
                              " WHERE r.status = 'ok'").fetchall()
        time.sleep(0.2)
    assert len(rows) == 6 and {p for p, _ in rows} == {policy}
    if policy in ("pcb", "glp", "abp", "magnus"):  # predictive policies carry a predicted length per request
        assert all(pred is not None and pred >= 1 for _, pred in rows)
    else:
        assert all(pred is None for _, pred in rows)
