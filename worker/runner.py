"""Static batch execution: left-pad to the longest prompt, prefill, decode until every request ended."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.types import BatchDone, BatchStats, GenBatch, GenRequest, GenResult, TokenEvent


class InjectedOOM(MemoryError):
    """Raised when the configured memory cap (fault injection) is exceeded."""


def is_oom(exc: BaseException) -> bool:
    """True for real device/host allocation failures and injected ones."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg
    )


@dataclass
class _RowState:
    req: GenRequest
    ids: list[int]
    text: str = ""  # decoded text so far, stop strings cut
    sent: int = 0  # chars of ``text`` already streamed
    done: bool = False
    finish_reason: str = "length"
    first_token_time: float | None = None
    generator: torch.Generator | None = None


class BatchRunner:
    """Runs static batches on one loaded model. Not thread-safe: one batch at a time."""

    def __init__(
        self,
        model,
        tokenizer,
        device: str,
        kv_bytes_per_token: int,
        mem_cap_bytes: int | None = None,
        oom_every: int = 0,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device)
        self.delta = kv_bytes_per_token
        self.mem_cap = mem_cap_bytes
        self.oom_every = oom_every  # fault injection: every Nth batch of size > 1 runs out of memory
        self._batches = 0
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))

    def _check_cap(self, size: int, length: int) -> None:
        need = size * length * self.delta
        if self.mem_cap is not None and need > self.mem_cap:
            raise InjectedOOM(
                f"KV cache of {size} x {length} tokens needs {need} bytes > cap {self.mem_cap}"
            )

    def run(self, batch: GenBatch, emit: Callable[[list[TokenEvent]], None] | None = None) -> BatchDone:
        """Run one batch to the end. Out-of-memory is caught and reported as ``error='oom'``."""
        start = time.time()
        size = len(batch.requests)
        max_prompt = max(len(r.prompt_ids) for r in batch.requests)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._batches += 1
        try:
            if self.oom_every and size > 1 and self._batches % self.oom_every == 0:
                raise InjectedOOM(f"injected OOM on batch {batch.batch_id} (every {self.oom_every})")
            return self._run(batch, emit, start)
        except Exception as exc:  # noqa: BLE001 - classify, then re-raise anything that is not OOM
            if not is_oom(exc):
                raise
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            stats = BatchStats(
                batch_id=batch.batch_id, size=size, max_prompt=max_prompt, max_gen=0, prefill_s=0.0,
                decode_s=0.0, valid_tokens=0, total_tokens=0, peak_mem_bytes=self._peak(), oom=True,
                start_time=start, end_time=time.time(),
            )
            return BatchDone(results=[], stats=stats, error=f"oom: {exc}")

    def _peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    @torch.inference_mode()
    def _run(self, batch: GenBatch, emit, start: float) -> BatchDone:
        reqs = batch.requests
        size = len(reqs)
        max_prompt = max(len(r.prompt_ids) for r in reqs)
        steps_allowed = max(r.max_tokens for r in reqs)
        self._check_cap(size, max_prompt + 1)
        input_ids = torch.full((size, max_prompt), self.pad_id, dtype=torch.long)
        mask = torch.zeros((size, max_prompt), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            input_ids[i, max_prompt - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, max_prompt - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_RowState(req=r, ids=[]) for r in reqs]
        for row in rows:
            if row.req.temperature > 0:
                g = torch.Generator(device="cpu")
                g.manual_seed(row.req.seed if row.req.seed is not None else torch.seed())
                row.generator = g
        max_stop = max((len(s) for r in reqs for s in r.stop), default=0)

        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        prefill_s = time.perf_counter() - t0
        del out

        steps = 0
        t1 = time.perf_counter()
        while True:
            next_ids = self._sample(logits, rows)
            steps += 1
            now = time.time()
            events: list[TokenEvent] = []
            for i, row in enumerate(rows):
                if row.done:
                    continue
                self._append(row, int(next_ids[i]), now, max_stop)
                if row.first_token_time is None:
                    row.first_token_time = now
                ev = self._flush(row, max_stop)
                if ev is not None:
                    events.append(ev)
            if emit is not None and events:
                emit(events)
            if all(row.done for row in rows) or steps >= steps_allowed:
                break
            self._check_cap(size, max_prompt + steps + 1)
            mask = torch.cat([mask, mask.new_ones((size, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_ids.view(size, 1).to(self.device),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
        decode_s = time.perf_counter() - t1
        del cache

        results = []
        for row in rows:
            if not row.done:
                row.done = True
                row.finish_reason = "length"
            results.append(
                GenResult(
                    id=row.req.id, text=row.text, completion_tokens=len(row.ids),
                    finish_reason=row.finish_reason, first_token_time=row.first_token_time,
                )
            )
        stats = BatchStats(
            batch_id=batch.batch_id, size=size, max_prompt=max_prompt,
            max_gen=max(len(r.ids) for r in rows), prefill_s=prefill_s, decode_s=decode_s,
            valid_tokens=sum(len(r.ids) for r in rows), total_tokens=size * steps,
            peak_mem_bytes=self._peak(), start_time=start, end_time=time.time(),
        )
        return BatchDone(results=results, stats=stats)

    def _sample(self, logits: torch.Tensor, rows: list[_RowState]) -> torch.Tensor:
        """Greedy for temperature 0, else temperature + nucleus sampling with the row's generator."""
        next_ids = logits.argmax(dim=-1).cpu()
        for i, row in enumerate(rows):
            if row.done or row.generator is None:
                continue
            probs = torch.softmax(logits[i].float() / row.req.temperature, dim=-1).cpu()
            if row.req.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                cum = sorted_p.cumsum(0)
                keep = cum - sorted_p < row.req.top_p  # always keeps the top token
                sorted_p = sorted_p * keep
                probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
            next_ids[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return next_ids

    def _append(self, row: _RowState, token: int, now: float, max_stop: int) -> None:
        row.ids.append(token)
        if token in self.eos_ids:
            row.done, row.finish_reason = True, "stop"
            return
        new_text = self.tok.decode([t for t in row.ids if t not in self.eos_ids], skip_special_tokens=True)
        if new_text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        if row.req.stop:
            search_from = max(0, len(row.text) - max_stop)
            hits = [i for s in row.req.stop if (i := new_text.find(s, search_from)) >= 0]
            if hits:
                row.text = new_text[: min(hits)]
                row.done, row.finish_reason = True, "stop"
                return
        row.text = new_text
        if len(row.ids) >= row.req.max_tokens:
            row.done, row.finish_reason = True, "length"

    @staticmethod
    def _flush(row: _RowState, max_stop: int) -> TokenEvent | None:
        # Hold back a possible stop-string prefix until it is decided.
        limit = len(row.text) if row.done or not row.req.stop else max(row.sent, len(row.text) - max_stop + 1)
        if limit <= row.sent:
            return None
        ev = TokenEvent(request_id=row.req.id, text=row.text[row.sent : limit], time=time.time())
        row.sent = limit
        return ev
