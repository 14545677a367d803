"""The FastAPI application: OpenAI-compatible routes over the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import auth, errors, limits, policies
from service.engine import Engine, RequestState, Submission
from service.errors import APIError
from service.metrics import Metrics
from service.model import ModelInfo, load_model_info, worker_configs
from service.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    chat_body,
    completion_body,
)
from service.requestlog import RequestLog
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    info: ModelInfo | None = None
    engine: Engine | None = None
    request_log: RequestLog | None = None
    learners: policies.Learners | None = None
    error: str | None = None
    draining: bool = False  # set on SIGTERM (service/shutdown.py): new requests get 503


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the model loads in the background (``/health`` is 503 until it is ready)."""
    state = AppState(settings=settings, metrics=Metrics())
    cpu = ThreadPoolExecutor(max_workers=4, thread_name_prefix="magnus-cpu")

    async def _load() -> None:
        try:
            state.info = await asyncio.to_thread(load_model_info, settings)
            state.request_log = RequestLog(settings.db_path)
            learners = state.learners = await asyncio.to_thread(policies.build, settings, state.info)
            policy = learners.policy
            observe = None
            if learners.predictor is not None:
                state.info.predict = partial(policies.predict, learners)
                observe = partial(policies.observe, learners)
            engine = Engine(policy, worker_configs(settings, state.info), state.request_log, state.metrics,
                            state.info.name, observe=observe)
            await engine.start()
            state.metrics.bind_learners(
                learners.predictor.stats if learners.predictor is not None else None, learners.estimator)
            learners.start(settings.estimator_interval_s)
            state.engine = engine
            log.info("serving %s with policy %s", state.info.name, policy.name)
        except Exception as exc:  # noqa: BLE001 - reported through /health and the log
            log.exception("start-up failed")
            state.error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_load())
        yield
        task.cancel()
        if state.engine is not None:
            await state.engine.stop()
        if state.learners is not None:
            await asyncio.to_thread(state.learners.stop)
        if state.request_log is not None:
            state.request_log.close()
        cpu.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="magnus-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM serving with predictive batching")
    app.state.magnus = state
    errors.install(app)
    app.add_middleware(limits.BodySizeLimit, max_bytes=settings.max_request_bytes, metrics=state.metrics)
    guard = auth.dependencies(settings.api_keys, state.metrics)  # empty without --api-key
    ops_guard = guard if settings.auth_health_metrics else []

    def engine() -> tuple[Engine, ModelInfo]:
        if state.draining:
            state.metrics.rejected.labels("shutting_down").inc()
            raise limits.shutting_down(settings)
        if state.engine is None or state.info is None:
            raise APIError(503, state.error or "model is loading", code="not_ready")
        return state.engine, state.info

    def check_model(name: str, info: ModelInfo) -> None:
        if name != info.name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{info.name}'",
                           param="model", code="model_not_found")

    @app.get("/health", dependencies=ops_guard)
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining", "detail": "shutting down"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "error" if state.error else "loading", "detail": state.error},
                                status_code=503)
        workers = [{"pid": w.get("pid"), "device": w.get("device")} for w in state.engine.worker_info()]
        return JSONResponse({"status": "ok", "model": state.info.name if state.info else None,
                             "workers": workers, "pending": state.engine.pending})

    @app.get("/metrics", dependencies=ops_guard)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict[str, Any]:
        eng, info = engine()
        return {"object": "list", "data": [{
            "id": info.name, "object": "model", "created": info.created, "owned_by": "magnus",
            "max_model_len": info.max_model_len,
        }]}

    async def prepare(kind: str, body: CompletionRequest | ChatCompletionRequest, info: ModelInfo,
                      prompt: str | None = None) -> Submission:
        loop = asyncio.get_running_loop()
        if kind == "chat":
            assert isinstance(body, ChatCompletionRequest)
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
            app_text = "\n".join(m["content"] for m in msgs if m["role"] == "system")
            user_text = "\n".join(m["content"] for m in msgs if m["role"] == "user")
            prompt_ids, input_tokens = await loop.run_in_executor(cpu, info.encode_chat, msgs, user_text)
        else:
            assert isinstance(body, CompletionRequest) and prompt is not None
            app_text = body.instruction or ""
            user_text = prompt
            full = f"{app_text}\n\n{prompt}" if app_text else prompt
            prompt_ids, input_tokens = await loop.run_in_executor(cpu, info.encode_text, full, user_text)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt" if kind == "completion" else "messages")
        room = info.max_model_len - len(prompt_ids)
        if body.max_tokens is None:
            max_tokens = min(state.settings.default_max_tokens, room)
        else:
            max_tokens = body.max_tokens
        if len(prompt_ids) + max_tokens > info.max_model_len or max_tokens < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )
        sub = Submission(
            id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", kind=kind, prompt_ids=prompt_ids,
            app_text=app_text, user_text=user_text, input_tokens=input_tokens, max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=list(body.stop or []),
        )
        if state.info and state.info.predict is not None and eng_needs_prediction():
            pred = await loop.run_in_executor(cpu, state.info.predict, sub)
            sub.predicted_tokens, sub.predicted_high, sub.predicted_source = pred
            state.metrics.predictions.labels(sub.predicted_source).inc()
        return sub

    def eng_needs_prediction() -> bool:
        return state.engine is not None and state.engine.policy.needs_prediction

    def expire(states: list[RequestState], eng: Engine) -> APIError:
        """Cancel ``states`` in the engine with the timeout error (each gets it as its final event)."""
        err = limits.timed_out(settings.request_timeout_s)
        for st in states:
            eng.cancel(st.sub.id, err)
        return err

    async def wait_done(st: RequestState, request: Request, eng: Engine, deadline: float | None,
                        group: list[RequestState]) -> tuple[str, Any]:
        """The request's final event; cancels it if the client disconnects first, and the whole
        ``group`` (one HTTP request's prompts) at ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        text: list[str] = []
        next_check = loop.time() + 1.0  # checked by the clock: token events may flow without a pause
        expired = False
        while True:
            now = loop.time()
            if now >= next_check:
                next_check = now + 1.0
                if await request.is_disconnected():
                    eng.cancel(st.sub.id)
                    raise APIError(499, "client disconnected")
            if deadline is not None and now >= deadline and not expired:
                expired = True
                expire(group, eng)  # the error arrives as this state's next event
            timeout = next_check - now
            if deadline is not None and not expired:
                timeout = min(timeout, deadline - now)
            try:
                kind, payload = await asyncio.wait_for(st.events.get(), timeout=max(timeout, 0.001))
            except TimeoutError:
                continue
            if kind == "text":
                text.append(payload)
            else:
                return kind, ("".join(text), payload)

    async def stream(states: list[RequestState], eng: Engine, chat: bool, include_usage: bool,
                     model: str, rid: str, deadline: float | None) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, st: RequestState) -> None:
            while True:
                ev = await st.events.get()
                await merged.put((i, ev))
                if ev[0] != "text":
                    return

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(states)]
        open_ = len(states)
        usage = [0, 0]
        try:
            if chat:
                yield _sse(chat_body(rid, model, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}], None, chunk=True))
            while open_:
                try:
                    left = None if deadline is None else max(0.0, deadline - loop.time())
                    i, (kind, payload) = await asyncio.wait_for(merged.get(), timeout=left)
                except TimeoutError:
                    yield expire(states, eng).sse()
                    break
                if kind == "text":
                    choice = ({"index": i, "delta": {"content": payload}, "finish_reason": None} if chat
                              else {"index": i, "text": payload, "logprobs": None, "finish_reason": None})
                elif kind == "done":
                    open_ -= 1
                    usage[0] += len(states[i].sub.prompt_ids)
                    usage[1] += payload.completion_tokens
                    choice = ({"index": i, "delta": {}, "finish_reason": payload.finish_reason} if chat
                              else {"index": i, "text": "", "logprobs": None, "finish_reason": payload.finish_reason})
                else:
                    yield payload.sse()
                    for st in states:
                        eng.cancel(st.sub.id)
                    break
                body = chat_body(rid, model, [choice], None, True) if chat else completion_body(rid, model, [choice], None)
                yield _sse(body)
            else:
                if include_usage:
                    u = Usage(prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=sum(usage))
                    yield _sse(chat_body(rid, model, [], u, True) if chat else completion_body(rid, model, [], u))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for st in states:
                eng.cancel(st.sub.id)  # no-op for finished requests; drops abandoned ones

    async def run(request: Request, kind: str, body: CompletionRequest | ChatCompletionRequest):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout_s if settings.request_timeout_s else None
        eng, info = engine()
        check_model(body.model, info)
        prompts = [None] if kind == "chat" else [body.prompt] if isinstance(body.prompt, str) else body.prompt
        limits.admit(eng.policy, settings, state.metrics, len(prompts))  # cheap check before tokenizing
        if kind == "chat":
            subs = [await prepare(kind, body, info)]
        else:
            assert isinstance(body, CompletionRequest)
            subs = [await prepare(kind, body, info, p) for p in prompts]
        eng, info = engine()  # draining may have begun meanwhile
        limits.admit(eng.policy, settings, state.metrics, len(subs), sum(len(s.prompt_ids) + s.max_tokens for s in subs))
        states = [eng.submit(s) for s in subs]
        rid = subs[0].id
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(states, eng, kind == "chat", include, info.name, rid, deadline),
                                     media_type="text/event-stream")
        try:
            finals = [await wait_done(st, request, eng, deadline, states) for st in states]
        finally:
            for st in states:
                eng.cancel(st.sub.id)
        choices = []
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        for i, ((kind_, (text, payload)), st) in enumerate(zip(finals, states, strict=True)):
            if kind_ == "error":
                raise payload
            usage.prompt_tokens += len(st.sub.prompt_ids)
            usage.completion_tokens += payload.completion_tokens
            if kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": payload.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": payload.finish_reason, "logprobs": None})
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return chat_body(rid, info.name, choices, usage, chunk=False) if kind == "chat" else completion_body(
            rid, info.name, choices, usage)

    @app.post("/v1/completions", dependencies=guard)
    async def completions(body: CompletionRequest, request: Request):
        return await run(request, "completion", body)

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await run(request, "chat", body)

    return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
