"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from service import limits
from service.errors import APIError
from service.prepare import prepare
from service.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from service.state import Serving, ServingDep, serving
from service.streaming import collect, sse

router = APIRouter()


@router.get("/v1/models")
async def models(sv: ServingDep) -> ModelList:
    info = sv.info
    return ModelList(data=[ModelCard(id=info.name, created=info.created, max_model_len=info.max_model_len)])


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, http: HTTPRequest,
                      sv: ServingDep) -> CompletionResponse | StreamingResponse:
    return await _generate(sv, body, http)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest,
                           sv: ServingDep) -> ChatCompletionResponse | StreamingResponse:
    return await _generate(sv, body, http)


async def _generate(sv: Serving, body: CompletionRequest | ChatCompletionRequest, http: HTTPRequest):
    settings, metrics = sv.state.settings, sv.state.metrics
    timeout_s = settings.request_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
    if body.model != sv.info.name:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves '{sv.info.name}'",
                       param="model", code="model_not_found")
    chat = isinstance(body, ChatCompletionRequest)
    prompts: list[str | None] = [None] if chat else [body.prompt] if isinstance(body.prompt, str) else body.prompt
    limits.admit(sv.engine.policy, settings, metrics, len(prompts))  # cheap check before tokenizing
    reqs = [await prepare(sv, body, p) for p in prompts]
    sv = serving(sv.state)  # draining may have begun meanwhile
    limits.admit(sv.engine.policy, settings, metrics, len(reqs), sum(r.prompt_tokens + r.max_tokens for r in reqs))
    kind = "chat" if chat else "completion"
    streams = [sv.engine.submit(r, kind) for r in reqs]
    rid, model = reqs[0].id, sv.info.name
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(streams, sv.engine, chat, include, model, rid, deadline, timeout_s),
                                 media_type="text/event-stream")
    try:
        finals = [await collect(st, http, sv.engine, deadline, streams, timeout_s) for st in streams]
    finally:
        for st in streams:
            sv.engine.cancel(st.request.id)
    prompt_tokens = sum(r.prompt_tokens for r in reqs)
    completion_tokens = sum(row.output_tokens for _, row in finals)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    if chat:
        return ChatCompletionResponse(id=rid, model=model, usage=usage, choices=[
            ChatChoice(index=i, message=ChatMessageOut(content=text), finish_reason=row.finish_reason)
            for i, (text, row) in enumerate(finals)])
    return CompletionResponse(id=rid, model=model, usage=usage, choices=[
        CompletionChoice(index=i, text=text, finish_reason=row.finish_reason) for i, (text, row) in enumerate(finals)])
