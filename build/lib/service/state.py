"""What the running app holds (set up by ``service.app``) and the typed dependencies routes use."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service import limits
from service.engine import Engine
from service.errors import APIError
from service.learners import Learners
from service.metrics import Metrics
from service.model import ModelInfo
from service.requestlog import RequestLog
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    info: ModelInfo | None = None
    engine: Engine | None = None
    request_log: RequestLog | None = None
    learners: Learners | None = None
    error: str | None = None  # why start-up failed
    draining: bool = False  # set on SIGTERM (service/shutdown.py): new requests get 503
    cpu: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="magnus-cpu"))
    background: list[asyncio.Task] = field(default_factory=list)  # cancelled at shutdown (e.g. Ray worker growth)


@dataclass
class Serving:
    """A ready engine and its model (what a generation route needs)."""

    state: AppState
    engine: Engine
    info: ModelInfo


def get_state(request: Request) -> AppState:
    return request.app.state.magnus


def serving(state: AppState) -> Serving:
    """The engine, or 503 while loading or draining."""
    if state.draining:
        state.metrics.rejected.labels("shutting_down").inc()
        raise limits.shutting_down(state.settings)
    if state.engine is None or state.info is None:
        raise APIError(503, state.error or "model is loading", code="not_ready")
    return Serving(state, state.engine, state.info)


def get_serving(request: Request) -> Serving:
    return serving(get_state(request))


StateDep = Annotated[AppState, Depends(get_state)]
ServingDep = Annotated[Serving, Depends(get_serving)]
