"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Response
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from scheduler.request import Request
from service import limits
from service.engine import Stream
from service.errors import APIError
from service.logprobs import chat_logprobs, completion_logprobs
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
from service.streaming import Shape, collect, sse

router = APIRouter()


@router.get("/v1/models")
async def models(sv: ServingDep) -> ModelList:
    info = sv.info
    return ModelList(data=[ModelCard(id=info.name, created=info.created, max_model_len=info.max_model_len)])


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, http: HTTPRequest, response: Response,
                      sv: ServingDep) -> CompletionResponse | StreamingResponse:
    return await _generate(sv, body, http, response)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest, response: Response,
                           sv: ServingDep) -> ChatCompletionResponse | StreamingResponse:
    return await _generate(sv, body, http, response)


def _choice(base: Request, j: int) -> Request:
    """Choice ``j`` (> 0) of ``n`` for the same prompt: its own id and, when seeded, the next seed."""
    sp = base.sampling
    seed = None if sp.seed is None else (sp.seed + j + 2**63) % 2**64 - 2**63  # int64, wrapping
    return dataclasses.replace(base, id=f"{base.id}-{j}", sampling=dataclasses.replace(sp, seed=seed),
                               resume_ids=[], head_ids=[])


def _prediction_headers(streams: list[Stream]) -> dict[str, str]:
    """The admission-time view of each choice: predicted length (point, high) and queue position."""
    preds = [st.request.prediction for st in streams]
    headers = {"x-magnus-queue-position": ",".join(str(st.queue_position) for st in streams)}
    if all(p is not None for p in preds):
        headers["x-magnus-predicted-tokens"] = ",".join(str(p.tokens) for p in preds)
        headers["x-magnus-predicted-tokens-high"] = ",".join(str(p.high) for p in preds)
    return headers


async def _generate(sv: Serving, body: CompletionRequest | ChatCompletionRequest, http: HTTPRequest,
                    response: Response):
    settings, metrics = sv.state.settings, sv.state.metrics
    timeout_s = settings.request_timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
    if body.model != sv.info.name:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves '{sv.info.name}'",
                       param="model", code="model_not_found")
    chat = isinstance(body, ChatCompletionRequest)
    prompts: list[str | None] = [None] if chat else [body.prompt] if isinstance(body.prompt, str) else body.prompt
    n = body.n
    limits.admit(sv.engine.policy, settings, metrics, len(prompts) * n)  # cheap check before tokenizing
    reqs: list[Request] = []
    for p in prompts:
        base = await prepare(sv, body, p)
        reqs += [base] + [_choice(base, j) for j in range(1, n)]
    sv = serving(sv.state)  # draining may have begun meanwhile
    limits.admit(sv.engine.policy, settings, metrics, len(reqs), sum(r.prompt_tokens + r.max_tokens for r in reqs))
    kind = "chat" if chat else "completion"
    streams = [sv.engine.submit(r, kind, body.stream) for r in reqs]
    rid, model = reqs[0].id, sv.info.name
    echo = [p for p in prompts for _ in range(n)] if not chat and body.echo else None
    k = body.top_logprobs if not chat else (body.top_logprobs or 0) if body.logprobs else None
    headers = _prediction_headers(streams) if settings.prediction_headers else {}
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        shape = Shape(chat=chat, model=model, rid=rid, include_usage=include, n=n, echo=echo, logprobs=k)
        return StreamingResponse(sse(streams, sv.engine, shape, deadline, timeout_s),
                                 media_type="text/event-stream", headers=headers)
    try:
        finals = [await collect(st, http, sv.engine, deadline, streams, timeout_s) for st in streams]
    finally:
        for st in streams:
            sv.engine.cancel(st.request.id)
    response.headers.update(headers)
    prompt_tokens = sum(r.prompt_tokens for r in reqs[::n])  # a prompt counts once, whatever its n
    completion_tokens = sum(row.output_tokens for _, row, _ in finals)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    if chat:
        return ChatCompletionResponse(id=rid, model=model, usage=usage, choices=[
            ChatChoice(index=i, message=ChatMessageOut(content=text), finish_reason=row.finish_reason,
                       logprobs=chat_logprobs(lps) if k is not None else None)
            for i, (text, row, lps) in enumerate(finals)])
    choices = []
    for i, (text, row, lps) in enumerate(finals):
        prefix = echo[i] if echo else ""
        choices.append(CompletionChoice(
            index=i, text=prefix + text, finish_reason=row.finish_reason,
            logprobs=completion_logprobs(lps, len(prefix), k) if k is not None else None))
    return CompletionResponse(id=rid, model=model, usage=usage, choices=choices)
