"""Backpressure and limits at the HTTP edge: request body size (413), waiting-queue admission
(429 with Retry-After), per-request deadline (504) and shutdown (503) errors."""

from __future__ import annotations

import json
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.policy import Policy
from service.errors import APIError
from service.metrics import Metrics
from service.settings import Settings


def retry_headers(seconds: float) -> dict[str, str]:
    """Retry-After (whole seconds, as HTTP wants) and retry-after-ms (read first by the openai client)."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(int(seconds * 1000))}


def admit(policy: Policy, settings: Settings, metrics: Metrics, requests: int, tokens: int | None = None) -> None:
    """Raise 429 if ``requests`` more waiting requests (with ``tokens`` prompt+max tokens, when
    known) would pass ``max_waiting_requests`` / ``max_waiting_tokens``."""
    reason = None
    if settings.max_waiting_requests and policy.waiting() + requests > settings.max_waiting_requests:
        reason, what = "queue_full", f"{policy.waiting()} requests are waiting (limit {settings.max_waiting_requests})"
    elif tokens is not None and settings.max_waiting_tokens and (
            policy.waiting_tokens() + tokens > settings.max_waiting_tokens):
        reason = "waiting_tokens"
        what = (f"{policy.waiting_tokens()} tokens are waiting and this request adds {tokens} "
                f"(limit {settings.max_waiting_tokens})")
    if reason is None:
        return
    metrics.rejected.labels(reason).inc()
    raise APIError(429, f"The server is overloaded: {what}. Retry after {settings.retry_after_s:g} s.",
                   code="server_overloaded", type_="rate_limit_error", headers=retry_headers(settings.retry_after_s))


def shutting_down(settings: Settings) -> APIError:
    """The error for requests refused (or dropped from the queue) while the server drains."""
    return APIError(503, "The server is shutting down; retry on another instance or later.",
                    code="shutting_down", type_="service_unavailable", headers=retry_headers(settings.retry_after_s))


def timed_out(seconds: float) -> APIError:
    """The error of a request past ``request_timeout_s`` (it is cancelled in the engine)."""
    return APIError(504, f"The request did not finish within the server's request timeout of {seconds:g} s "
                    "and was cancelled.", code="request_timeout", type_="timeout_error")


class BodySizeLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413 before the app reads it.

    Checks Content-Length when given, and otherwise buffers the (chunked) body up to the limit,
    then hands it to the app in one piece."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False  # the server rejects a malformed Content-Length itself
            if too_big:
                await self._reject(send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # disconnected while sending: nothing to answer
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(send)
                return
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels("body_too_large").inc()
        err = APIError(413, f"Request body too large: the limit is {self.max_bytes} bytes.", code="request_too_large")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
