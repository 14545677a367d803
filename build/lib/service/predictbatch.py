"""Length predictions batched across arrivals: requests that arrive while a prediction runs are
predicted together in the next call (one embedding batch), off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from predictor.types import Prediction
from scheduler.request import Request


class PredictionBatcher:
    """No added wait: a lone arrival is predicted at once; arrivals during a call form the next batch
    (at most ``max_batch``). A failed call fails the requests of that batch only."""

    def __init__(self, predict: Callable[[list[Request]], list[Prediction]], executor: Executor | None,
                 max_batch: int = 64) -> None:
        self._predict = predict
        self._executor = executor
        self.max_batch = max_batch
        self._pending: list[tuple[Request, asyncio.Future[Prediction]]] = []
        self._task: asyncio.Task[None] | None = None
        self.calls = 0  # prediction calls made (requests / calls = the mean batch)

    async def predict(self, req: Request) -> Prediction:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Prediction] = loop.create_future()
        self._pending.append((req, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            batch = [(r, f) for r, f in batch if not f.done()]  # a client that left is not predicted
            if not batch:
                continue
            self.calls += 1
            try:
                preds = await loop.run_in_executor(self._executor, self._predict, [r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - delivered to the requests of this batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), p in zip(batch, preds, strict=True):
                if not f.done():
                    f.set_result(p)
