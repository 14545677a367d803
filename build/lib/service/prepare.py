"""From a validated HTTP body to the core's ``Request``: application and user texts, prompt
tokens (in a thread), the context-length check, sampling settings and the length prediction."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from scheduler.request import Request, SamplingParams
from service.errors import APIError
from service.model import worker_mode
from service.predictbatch import PredictionBatcher
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.state import Serving


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, vocab: int,
                    runner: str) -> SamplingParams:
    """The core's sampling settings of a validated body; 400 for what the served model or worker cannot do."""
    def token_id(t: int | str, param: str) -> int:
        i = int(t)
        if not 0 <= i < vocab:
            raise APIError(400, f"token id {i} is outside the vocabulary (0..{vocab - 1})", param=param)
        return i

    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
                       param="min_tokens")
    logprobs = None
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs:
            logprobs = body.top_logprobs or 0
    else:
        logprobs = body.logprobs
    sp = SamplingParams(
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=tuple(body.stop or ()),
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple((token_id(k, "logit_bias"), v) for k, v in (body.logit_bias or {}).items()),
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(token_id(t, "stop_token_ids") for t in body.stop_token_ids or ()),
        logprobs=logprobs,
    )
    if runner == "transformers":
        # transformers' continuous-batching manager takes one generation config for every request
        asked = [name for name, on in (
            ("logprobs", logprobs is not None), ("logit_bias", bool(sp.logit_bias)),
            ("presence_penalty", bool(sp.presence_penalty)), ("frequency_penalty", bool(sp.frequency_penalty)),
            ("repetition_penalty", sp.repetition_penalty != 1.0), ("min_tokens", bool(sp.min_tokens)),
            ("ignore_eos", sp.ignore_eos), ("stop_token_ids", bool(sp.stop_token_ids))) if on]
        if asked:
            raise APIError(400, f"{asked[0]} is not supported on transformers' continuous-batching runner "
                                "(start the server with --continuous-runner iteration)", param=asked[0])
    return sp


async def _encode(loop, cpu, param: str, fn, *args) -> tuple[list[int], int]:
    """Tokenize in the CPU executor; text the tokenizer cannot take (a lone surrogate) is a 400."""
    try:
        return await loop.run_in_executor(cpu, fn, *args)
    except (TypeError, UnicodeError) as exc:
        raise APIError(400, f"the text cannot be tokenized ({type(exc).__name__}: {exc})", param=param) from exc


async def prepare(sv: Serving, body: CompletionRequest | ChatCompletionRequest, prompt: str | None = None) -> Request:
    """The request for ``body`` (for a completion: one of its prompts), predicted if the policy wants it."""
    loop = asyncio.get_running_loop()
    info, cpu = sv.info, sv.state.cpu
    if isinstance(body, ChatCompletionRequest):
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        app_text = "\n".join(m["content"] for m in msgs if m["role"] == "system")
        user_text = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        prefix, param = "chatcmpl", "messages"
        prompt_ids, input_tokens = await _encode(loop, cpu, param, info.encode_chat, msgs, user_text)
    else:
        assert prompt is not None
        app_text, user_text = body.instruction or "", prompt
        full = f"{app_text}\n\n{prompt}" if app_text else prompt
        prefix, param = "cmpl", "prompt"
        prompt_ids, input_tokens = await _encode(loop, cpu, param, info.encode_text, full, user_text)
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=param)
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = min(sv.state.settings.default_max_tokens, info.max_model_len - len(prompt_ids))
    if len(prompt_ids) + max_tokens > info.max_model_len or max_tokens < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {info.max_model_len} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded",
        )
    req = Request(
        id=f"{prefix}-{uuid.uuid4().hex}", prompt_tokens=len(prompt_ids), max_tokens=max_tokens, arrival=0.0,
        prompt_ids=prompt_ids, app_text=app_text, user_text=user_text, input_tokens=input_tokens,
        sampling=sampling_params(body, max_tokens, info.vocab_size,
                                 worker_mode(sv.engine.policy.runner, sv.state.settings.continuous_runner)), priority=body.priority,
    )
    learners = sv.state.learners
    if learners is not None and learners.predictor is not None and sv.engine.policy.needs_prediction:
        if learners.batcher is None:
            learners.batcher = PredictionBatcher(learners.predict, cpu)
        req.prediction = await learners.batcher.predict(req)
        scale = sv.state.settings.prediction_scale
        if scale != 1.0:  # injected error: the scheduler (and the health metrics) see the scaled one
            p = req.prediction
            req.prediction = dataclasses.replace(p, tokens=max(1, round(p.tokens * scale)),
                                                 high=max(1, round(p.tokens * scale), round(p.high * scale)))
        sv.state.metrics.predictions.labels(req.prediction.source).inc()
    return req
