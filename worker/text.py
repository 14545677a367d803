"""Per-request output text: incremental detokenization, stop strings, what may be streamed."""

from __future__ import annotations

import time

from scheduler.contract import HEAD_IDS, RowOutput, TokenEvent, TokenLogprob, WorkItem


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every token id that ends a generation (generation config and tokenizer)."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class RequestText:
    """Tracks one request's generated tokens and text while it decodes."""

    def __init__(self, req: WorkItem, tokenizer, eos_ids: set[int]) -> None:
        self.req = req
        self.tok = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string
        self.sent = 0  # chars of ``text`` already streamed
        self.done = False
        self.finish_reason = "length"
        self.first_token_time: float | None = None
        self._prefix = 0  # ids[_prefix:_read] were decoded into the text's last piece (decoding context)
        self._read = 0  # ids before this are in ``text``
        self.stop = req.sampling.stop
        self.max_stop = max((len(s) for s in self.stop), default=0)
        sp = req.sampling
        self.end_ids = set() if sp.ignore_eos else set(eos_ids)  # tokens that end the row
        self.end_ids |= set(sp.stop_token_ids)
        # one entry per id (None for tokens replayed after a preemption: they were reported then)
        self.logprobs: list[TokenLogprob | None] | None = [] if sp.logprobs is not None else None
        self._events_tokens = 0  # ids[:_events_tokens] were covered by an event already
        self.sampler_state: object | None = None  # the sampler's per-row state (penalty counts)

    def append(self, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """Add one generated token; sets ``done`` on an end token (EOS unless ``ignore_eos``, or one
        of ``stop_token_ids``), a stop string or max_tokens.

        Detokenization is incremental (constant work per token): only the tokens since the last
        emitted boundary are decoded, with the previous boundary's tokens as context so that
        tokenizers that merge across tokens (leading spaces, multi-byte characters) decode as a
        whole-sequence decode would."""
        if self.done:
            return
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = now
        if token in self.end_ids:
            self.done, self.finish_reason = True, "stop"
            return
        prefix = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        tail = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(tail) > len(prefix) and not tail.endswith("\ufffd"):  # else a character is still incomplete
            new_text = self.text + tail[len(prefix):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop:
                search_from = max(0, len(self.text) - self.max_stop)
                hits = [i for s in self.stop if (i := new_text.find(s, search_from)) >= 0]
                if hits:
                    self.text = new_text[: min(hits)]
                    self.done, self.finish_reason = True, "stop"
                    return
            self.text = new_text
        if len(self.ids) >= self.req.max_tokens:
            self.done, self.finish_reason = True, "length"

    def flush(self) -> TokenEvent | None:
        """New text that can be streamed (a possible stop-string prefix is held back)."""
        limit = len(self.text)
        if self.stop and not self.done:
            limit = max(self.sent, len(self.text) - self.max_stop + 1)
        if limit <= self.sent:
            return None
        first = self._events_tokens
        ev = TokenEvent(request_id=self.req.request_id, text=self.text[self.sent : limit], time=time.time(),
                        offset=self.sent, tokens=len(self.ids) - first, token_offset=first,
                        logprobs=None if self.logprobs is None else self.logprobs[first:])
        self.sent = limit
        self._events_tokens = len(self.ids)
        return ev

    def result(self) -> RowOutput:
        if not self.done:
            self.done, self.finish_reason = True, "length"
        return RowOutput(request_id=self.req.request_id, text=self.text, output_tokens=len(self.ids),
                         finish_reason=self.finish_reason, first_token_time=self.first_token_time,
                         logprobs=None if self.logprobs is None else list(self.logprobs),
                         head_ids=list(self.ids[:HEAD_IDS]))
