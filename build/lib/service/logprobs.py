"""Token logprobs in OpenAI's two shapes: chat (``content`` entries) and completions (parallel lists)."""

from __future__ import annotations

from scheduler.contract import TokenLogprob
from service.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    """Chat's ``choice.logprobs``: each token with its ``top_logprobs``."""
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=_bytes(e.token), top_logprobs=[
            TopLogprob(token=t, logprob=lp, bytes=_bytes(t)) for _, t, lp in e.top])
        for e in entries])


def completion_logprobs(entries: list[TokenLogprob], text_offset: int, k: int) -> CompletionLogprobs:
    """Completions' ``choice.logprobs``; ``text_offset`` is where the first token starts in the text.
    ``top_logprobs`` holds the k most likely tokens and the chosen one (as OpenAI's API)."""
    offsets, pos = [], text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    tops: list[dict[str, float] | None] = []
    for e in entries:
        top = {t: lp for _, t, lp in e.top[:k]}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    return CompletionLogprobs(text_offset=offsets, token_logprobs=[e.logprob for e in entries],
                              tokens=[e.token for e in entries], top_logprobs=tops)
