"""Graceful shutdown: the first SIGTERM/SIGINT drains the app, then uvicorn exits normally.

Draining: new requests and ``/health`` get 503 at once; waiting requests keep being served for
up to ``shutdown_timeout_s``, then the ones still waiting get 503 (code ``shutting_down``);
running batches always finish. Then uvicorn closes the connections and runs the app's shutdown,
which stops the workers, persists the learners and flushes the request log. A second signal
skips the rest of the drain (still with that shutdown); a third exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


async def drain(state: Any, timeout_s: float, poll_s: float = 0.05) -> None:
    """Drain ``state`` (the app's ``AppState``): see the module docstring."""
    from service.limits import shutting_down

    state.draining = True
    eng = state.engine
    if eng is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    log.info("draining: %d requests pending, serving the waiting ones for up to %.0f s", eng.pending, timeout_s)
    while eng.pending and eng.policy.waiting() and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    rejected = eng.reject_waiting(shutting_down(state.settings))
    if rejected:
        log.warning("draining: rejected %d waiting requests with 503", rejected)
    while eng.pending:  # running batches finish; a second signal cuts this short
        await asyncio.sleep(poll_s)
    log.info("drained")


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose first exit signal runs ``drain`` before shutting down."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signals = 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1 and self._loop is not None and self.started:
            log.info("received %s: draining before shutdown", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
        elif self._signals <= 2:
            self.should_exit = True
        else:
            self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        async def run() -> None:
            try:
                await self._drain()
            except Exception:  # noqa: BLE001 - shut down anyway
                log.exception("drain failed")
            finally:
                self.should_exit = True

        self._drain_task = asyncio.create_task(run())
