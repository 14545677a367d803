"""Schemas of vLLM's /tokenize and /detokenize (the HTTP edge: pydantic only here)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from service.protocol import ChatMessage

StrictInt = Annotated[int, Strict()]


class TokenizeRequest(BaseModel):
    """POST /tokenize: a completion prompt (``prompt``) or a chat (``messages``), as vLLM's
    TokenizeCompletionRequest and TokenizeChatRequest (one body with either field)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Annotated[str, Strict()] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(
        None, description="prompt: the tokenizer's special tokens (e.g. BOS) are added (default true); "
                          "messages: added on top of the chat template's (default: as a chat completion)")
    add_generation_prompt: bool | None = Field(
        None, description="messages: the chat template's assistant prefix is appended (default true, "
                          "false with continue_final_message)")
    continue_final_message: bool = Field(False, description="messages: the last message is left open")
    return_token_strs: bool = Field(False, description="also return each token's string")

    @model_validator(mode="after")
    def _one_kind(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        texts = [self.prompt] if self.prompt is not None else [m.text() for m in self.messages or ()]
        for t in texts:  # JSON may carry lone surrogates (\ud800): no tokenizer takes them
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"the text is not valid Unicode: {exc.reason} at {exc.start}") from None
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str
