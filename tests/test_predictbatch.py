"""Predictions batched across arrivals: arrivals during a call form the next call; failures stay in their batch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from predictor.types import Prediction
from scheduler.request import Request
from service.predictbatch import PredictionBatcher


def _req(i: int) -> Request:
    return Request(f"r{i}", prompt_tokens=5, max_tokens=50 + i, arrival=0.0)


def test_arrivals_during_a_call_are_predicted_together() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def predict(reqs: list[Request]) -> list[Prediction]:
        sizes.append(len(reqs))
        if len(sizes) == 1:
            gate.wait(5)  # the first call is slow: the next arrivals queue up meanwhile
        return [Prediction(r.max_tokens, r.max_tokens + 1, "mixture") for r in reqs]

    async def run() -> list[Prediction]:
        b = PredictionBatcher(predict, ThreadPoolExecutor(2))
        first = asyncio.create_task(b.predict(_req(0)))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(b.predict(_req(i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        out = [await first] + [await t for t in rest]
        assert b.calls == 2
        return out

    preds = asyncio.run(run())
    assert sizes == [1, 5]
    assert [p.tokens for p in preds] == [50, 51, 52, 53, 54, 55]  # each request gets its own answer


def test_a_failed_call_fails_only_its_batch() -> None:
    def predict(reqs: list[Request]) -> list[Prediction]:
        if any(r.id == "r1" for r in reqs):
            raise RuntimeError("embedder broke")
        return [Prediction(7, 9, "mixture") for _ in reqs]

    async def run() -> None:
        b = PredictionBatcher(predict, None)
        with pytest.raises(RuntimeError, match="embedder broke"):
            await b.predict(_req(1))
        assert (await b.predict(_req(2))).tokens == 7

    asyncio.run(run())
