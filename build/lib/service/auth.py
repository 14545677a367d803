"""Optional API keys: ``Authorization: Bearer KEY`` checked against ``settings.api_keys``.

With no keys configured nothing is checked (the default, bound to 127.0.0.1). Like vLLM, the
keys guard the ``/v1`` routes; ``/health`` and ``/metrics`` only when ``auth_health_metrics``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError
from service.metrics import Metrics

_bearer = HTTPBearer(auto_error=False, scheme_name="APIKey", description="an API key given to `magnus serve --api-key`")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def _masked(key: str) -> str:
    return f"{key[:3]}***{key[-2:]}" if len(key) > 8 else "***"


def api_key_checker(keys: list[str], metrics: Metrics) -> Callable[[Credentials], Awaitable[None]]:
    """A FastAPI dependency that raises 401 (OpenAI error shape) unless the bearer token is a key."""
    accepted = [k.encode() for k in keys]

    async def check_api_key(credentials: Credentials) -> None:
        if credentials is None:
            metrics.rejected.labels("unauthorized").inc()
            raise _unauthorized(
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                "(i.e. Authorization: Bearer YOUR_KEY).", "missing_api_key")
        given = credentials.credentials.encode()
        ok = False
        for key in accepted:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(given, key)
        if not ok:
            metrics.rejected.labels("unauthorized").inc()
            raise _unauthorized(f"Incorrect API key provided: {_masked(credentials.credentials)}.", "invalid_api_key")

    return check_api_key


def dependencies(keys: list[str], metrics: Metrics) -> list:
    """``dependencies=`` for a guarded route: empty when no key is configured."""
    return [Depends(api_key_checker(keys, metrics))] if keys else []
