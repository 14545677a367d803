"""Static batch execution: left-pad to the longest prompt, prefill, decode until every request ended."""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable

import torch

from scheduler.contract import BatchOutput, BatchStats, Outcome, RowOutput, TokenEvent, WorkBatch
from worker.text import RequestText, eos_ids_of


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
        step_delay_s: float = 0.0,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device)
        self.delta = kv_bytes_per_token
        self.mem_cap = mem_cap_bytes
        self.oom_every = oom_every  # fault injection: every Nth batch of size > 1 runs out of memory
        self._batches = 0
        self.step_delay_s = step_delay_s  # fault injection: a slower device, for timing-free tests
        self.eos_ids = eos_ids_of(model, tokenizer)
        # prefill needs the last position's logits only: B x L x vocab would dwarf the KV cache
        params = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    def _check_cap(self, size: int, length: int) -> None:
        need = size * length * self.delta
        if self.mem_cap is not None and need > self.mem_cap:
            raise InjectedOOM(
                f"KV cache of {size} x {length} tokens needs {need} bytes > cap {self.mem_cap}"
            )

    def run(self, batch: WorkBatch, emit: Callable[[list[TokenEvent]], None] | None = None) -> BatchOutput:
        """Run one batch to the end. Out-of-memory is caught and reported as ``error='oom'``."""
        start = time.time()
        size = len(batch.items)
        max_prompt = max(len(r.prompt_ids) for r in batch.items)
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
            return BatchOutput(batch_id=batch.batch_id, outcome=Outcome.OOM, rows=[], stats=stats, error=f"oom: {exc}")

    def _peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    @torch.inference_mode()
    def _run(self, batch: WorkBatch, emit, start: float) -> BatchOutput:
        reqs = batch.items
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
        rows = [RequestText(r, self.tok, self.eos_ids) for r in reqs]
        generators: list[torch.Generator | None] = []
        for r in reqs:
            g = None
            if r.sampling.temperature > 0:
                g = torch.Generator(device="cpu")
                g.manual_seed(r.sampling.seed if r.sampling.seed is not None else torch.seed())
            generators.append(g)

        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self._last_logits_only)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        prefill_s = time.perf_counter() - t0
        del out

        steps = 0
        t1 = time.perf_counter()
        while True:
            next_ids = self._sample(logits, rows, generators)
            steps += 1
            now = time.time()
            events: list[TokenEvent] = []
            for i, row in enumerate(rows):
                if row.done:
                    continue
                row.append(int(next_ids[i]), now)
                ev = row.flush()
                if ev is not None:
                    events.append(ev)
            if emit is not None and events:
                emit(events)
            if all(row.done for row in rows) or steps >= steps_allowed:
                break
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
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

        results: list[RowOutput] = [row.result() for row in rows]
        stats = BatchStats(
            batch_id=batch.batch_id, size=size, max_prompt=max_prompt,
            max_gen=max(len(r.ids) for r in rows), prefill_s=prefill_s, decode_s=decode_s,
            valid_tokens=sum(len(r.ids) for r in rows), total_tokens=size * steps,
            peak_mem_bytes=self._peak(), start_time=start, end_time=time.time(),
        )
        return BatchOutput(batch_id=batch.batch_id, outcome=Outcome.OK, rows=results, stats=stats)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[RequestText], generators: list[torch.Generator | None]) -> torch.Tensor:
        """Greedy for temperature 0, else temperature + nucleus sampling with the row's generator."""
        next_ids = logits.argmax(dim=-1).cpu()
        for i, row in enumerate(rows):
            g = generators[i]
            if row.done or g is None:
                continue
            probs = torch.softmax(logits[i].float() / row.req.sampling.temperature, dim=-1).cpu()
            if row.req.sampling.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                cum = sorted_p.cumsum(0)
                keep = cum - sorted_p < row.req.sampling.top_p
                keep[0] = True  # the top token always (a top_p below float32's range would keep none)
                sorted_p = sorted_p * keep
                probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
            next_ids[i] = torch.multinomial(probs, 1, generator=g)[0]
        return next_ids
