"""Delivering a request's events: collected into one response, or streamed as server-sent events.

Both watch the client (a disconnect cancels the request in the engine) and the request deadline
(past it the request is cancelled with a 504 error, which arrives as its next event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request as HTTPRequest

from scheduler.contract import RowOutput, TokenLogprob
from service import limits
from service.engine import Delta, Engine, Stream
from service.errors import APIError
from service.logprobs import chat_logprobs, completion_logprobs
from service.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Usage,
)

_DISCONNECT_CHECK_S = 1.0  # checked by the clock: token events may flow without a pause


def expire(streams: list[Stream], eng: Engine, timeout_s: float) -> APIError:
    """Cancel ``streams`` with the timeout error (each gets it as its final event)."""
    err = limits.timed_out(timeout_s)
    for st in streams:
        eng.cancel(st.request.id, err)
    return err


async def collect(st: Stream, http: HTTPRequest, eng: Engine, deadline: float | None, group: list[Stream],
                  timeout_s: float) -> tuple[str, RowOutput, list[TokenLogprob]]:
    """The request's whole text, outcome and logprobs (empty unless asked); raises its APIError.
    The text is the final run's (a retried batch's own, never spliced onto an earlier run's).
    Cancels it if the client disconnects first, and the whole ``group`` (one HTTP request's
    prompts) at ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    lps: list[TokenLogprob] = []
    next_check = loop.time() + _DISCONNECT_CHECK_S
    expired = False
    while True:
        now = loop.time()
        if now >= next_check:
            next_check = now + _DISCONNECT_CHECK_S
            if await http.is_disconnected():
                eng.cancel(st.request.id)
                raise APIError(499, "client disconnected")
        if deadline is not None and now >= deadline and not expired:
            expired = True
            expire(group, eng, timeout_s)
        timeout = next_check - now
        if deadline is not None and not expired:
            timeout = min(timeout, deadline - now)
        try:
            ev = await asyncio.wait_for(st.events.get(), timeout=max(timeout, 0.001))
        except TimeoutError:
            continue
        if isinstance(ev, Delta):
            lps.extend(ev.logprobs or ())
        elif isinstance(ev, APIError):
            raise ev
        else:
            if ev.logprobs is not None and all(e is not None for e in ev.logprobs):
                lps = list(ev.logprobs)  # the final run's (a resumed row's replayed tokens are None)
            return ev.text, ev, lps


def _sse(body: ChatCompletionChunk | CompletionResponse) -> str:
    return f"data: {body.model_dump_json()}\n\n"


@dataclass
class Shape:
    """How one HTTP request's streams become choices."""

    chat: bool
    model: str
    rid: str
    include_usage: bool = False
    n: int = 1  # choices per prompt: streams[i] is prompt i // n (its prompt tokens count once)
    echo: list[str] | None = None  # completions: each choice's prompt, sent before its text
    logprobs: int | None = None  # None: no logprobs; else the k most likely tokens per token


async def sse(streams: list[Stream], eng: Engine, shape: Shape, deadline: float | None,
              timeout_s: float) -> AsyncIterator[str]:
    """The requests' events as OpenAI chunks (choice ``i`` is ``streams[i]``), ending with ``[DONE]``."""
    loop = asyncio.get_running_loop()
    merged: asyncio.Queue = asyncio.Queue()
    chat, rid, model = shape.chat, shape.rid, shape.model
    token_pos = [len(e) for e in shape.echo] if shape.echo else [0] * len(streams)

    async def pump(i: int, st: Stream) -> None:
        while True:
            ev = await st.events.get()
            await merged.put((i, ev))
            if not isinstance(ev, Delta):
                return

    def chunk(i: int, text: str | None, finish: str | None, lps: list[TokenLogprob] | None = None) -> str:
        want = shape.logprobs is not None and lps is not None
        if chat:
            delta = {} if text is None else {"content": text}
            return _sse(ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(
                index=i, delta=delta, finish_reason=finish, logprobs=chat_logprobs(lps) if want else None)]))
        lp = None
        if want:
            lp = completion_logprobs(lps, token_pos[i], shape.logprobs)
            token_pos[i] += sum(len(e.token) for e in lps)
        return _sse(CompletionResponse(id=rid, model=model, choices=[
            CompletionChoice(index=i, text=text or "", finish_reason=finish, logprobs=lp)]))

    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
    open_ = len(streams)
    usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    try:
        for i in range(len(streams)):
            if chat:
                yield _sse(ChatCompletionChunk(id=rid, model=model, choices=[
                    ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})]))
            elif shape.echo and shape.echo[i]:
                yield chunk(i, shape.echo[i], None)
        while open_:
            try:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                i, ev = await asyncio.wait_for(merged.get(), timeout=left)
            except TimeoutError:
                yield expire(streams, eng, timeout_s).sse()
                break
            if isinstance(ev, Delta):
                yield chunk(i, ev.text, None, ev.logprobs)
            elif isinstance(ev, APIError):
                yield ev.sse()
                for st in streams:
                    eng.cancel(st.request.id)
                break
            else:
                open_ -= 1
                if i % shape.n == 0:
                    usage.prompt_tokens += streams[i].request.prompt_tokens
                usage.completion_tokens += ev.output_tokens
                yield chunk(i, None, ev.finish_reason)
        else:
            if shape.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield _sse(ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage) if chat
                           else CompletionResponse(id=rid, model=model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for st in streams:
            eng.cancel(st.request.id)  # no-op for finished requests; drops abandoned ones
