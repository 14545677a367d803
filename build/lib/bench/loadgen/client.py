"""The official ``openai`` client pointed at a magnus server."""

from __future__ import annotations

import openai


def api_base(base_url: str) -> str:
    """The OpenAI API root of a server: ``http://host:port`` and ``http://host:port/v1`` both work."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def make_client(base_url: str, timeout: float = 600.0, api_key: str = "magnus") -> openai.AsyncOpenAI:
    """An async client without retries (a benchmark counts failures instead of hiding them)."""
    return openai.AsyncOpenAI(base_url=api_base(base_url), api_key=api_key, timeout=timeout, max_retries=0)


async def resolve_model(client: openai.AsyncOpenAI, model: str | None) -> str:
    """``model`` if given, else the first model the server lists, else ``"default"``."""
    if model:
        return model
    try:
        page = await client.models.list()
    except openai.OpenAIError:
        return "default"
    return page.data[0].id if page.data else "default"
