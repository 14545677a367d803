"""vLLM's tokenizer routes: POST /tokenize and POST /detokenize, with the served model's tokenizer.

A chat is tokenized exactly as a chat completion feeds it to the model (``ModelInfo.chat_ids``), a
prompt as a completion does (the tokenizer's special tokens added unless ``add_special_tokens`` is
false). Tokenizing runs in the server's CPU executor, as for generation requests."""

from __future__ import annotations

import asyncio
import functools

from fastapi import APIRouter
from jinja2 import TemplateError

from service.errors import APIError
from service.protocol_tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.state import Serving, ServingDep

router = APIRouter()


def _check_model(model: str | None, sv: Serving) -> None:
    if model is not None and model != sv.info.name:
        raise APIError(404, f"model '{model}' does not exist; this server serves '{sv.info.name}'",
                       param="model", code="model_not_found")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, sv: ServingDep) -> TokenizeResponse:
    _check_model(body.model, sv)
    info = sv.info
    loop = asyncio.get_running_loop()
    if body.messages is not None:
        # the same messages as a chat completion's (service.prepare): "developer" is a system message
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        add_generation_prompt = (not body.continue_final_message if body.add_generation_prompt is None
                                 else body.add_generation_prompt)
        work = functools.partial(info.chat_ids, msgs, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 add_special_tokens=body.add_special_tokens)
        try:
            ids = await loop.run_in_executor(sv.state.cpu, work)
        except (TemplateError, ValueError) as exc:  # the chat template refused the conversation
            raise APIError(400, f"the chat template cannot render these messages: {exc}",
                           param="messages") from exc
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await loop.run_in_executor(
            sv.state.cpu, functools.partial(info.tokenizer.encode, body.prompt, add_special_tokens=add))
    strs = info.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, sv: ServingDep) -> DetokenizeResponse:
    _check_model(body.model, sv)
    tok = sv.info.tokenizer
    n = len(tok)
    bad = next((t for t in body.tokens if not 0 <= t < n), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{n - 1})", param="tokens",
                       code="invalid_value")
    text = await asyncio.get_running_loop().run_in_executor(sv.state.cpu, tok.decode, body.tokens)
    return DetokenizeResponse(prompt=text)
