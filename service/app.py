"""The FastAPI application: loads the model and the engine in the background, mounts the routers."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from scheduler.batch import continue_batch_ids_after
from service import auth, errors, learners, limits
from service.engine import Engine
from service.metrics import Metrics
from service.model import load_model_info, worker_configs
from service.requestlog import RequestLog
from service.routers import openai, ops, tokenize
from service.settings import Settings
from service.state import AppState

log = logging.getLogger(__name__)


async def _load(state: AppState) -> None:
    """Model, request log, scheduler and learners, workers; failures are reported by /health."""
    settings = state.settings
    try:
        state.info = await asyncio.to_thread(load_model_info, settings)
        state.metrics.set_model_name(state.info.name)  # the vllm:* series' model_name label
        state.request_log = RequestLog(settings.db_path)
        continue_batch_ids_after(state.request_log.last_batch_id())  # a restart appends, never overwrites
        built = state.learners = await asyncio.to_thread(learners.build, settings, state.info)
        observe = built.observe if built.predictor is not None else None
        configs, factory, rw = worker_configs(settings, state.info), None, None
        if settings.workers == "ray":
            from service.cluster import ray_workers

            rw = await asyncio.to_thread(ray_workers, settings, state.info, configs[0])
            configs, factory = rw.configs(), rw.factory()
        engine = Engine(built.policy, configs, state.request_log, state.metrics, state.info.name, observe=observe,
                        handle_factory=factory, worker_theta=built.worker_theta)
        if built.predictor is not None:
            built.predictor.busy = lambda: engine.pending > 0  # retrain while the workers are idle
            if built.predictor.can_repredict and built.policy.continuous:
                engine.core.repredict = built.repredict
        await engine.start()
        state.metrics.bind_learners(built.predictor.stats if built.predictor is not None else None, built.estimator)
        built.start(settings.estimator_interval_s)
        state.engine = engine
        if rw is not None and (not settings.ray_max_workers or settings.ray_max_workers > engine.num_workers):
            from service.cluster import grow

            state.background.append(asyncio.create_task(grow(engine, rw, settings)))
        log.info("serving %s with policy %s", state.info.name, built.policy.name)
    except Exception as exc:  # noqa: BLE001 - reported through /health and the log
        log.exception("start-up failed")
        state.error = f"{type(exc).__name__}: {exc}"


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the model loads in the background (``/health`` is 503 until it is ready)."""
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load(state))
        yield
        task.cancel()
        for t in state.background:
            t.cancel()
        if state.engine is not None:
            await state.engine.stop()
        if state.learners is not None:
            await asyncio.to_thread(state.learners.stop)
        if state.request_log is not None:
            state.request_log.close()
        state.cpu.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="magnus-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving with predictive batching")
    app.state.magnus = state
    errors.install(app)
    app.add_middleware(limits.BodySizeLimit, max_bytes=settings.max_request_bytes, metrics=state.metrics)
    guard = auth.dependencies(settings.api_keys, state.metrics)  # empty without --api-key
    app.include_router(ops.router, dependencies=guard if settings.auth_health_metrics else [])
    app.include_router(openai.router, dependencies=guard)
    app.include_router(tokenize.router, dependencies=guard)
    return app
