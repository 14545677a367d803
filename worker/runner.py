"""Static batch execution: left-pad to the longest prompt, prefill, decode until every request
ended. With early exit (the default) each row is reported and leaves the batch the step it ends."""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Callable

import torch

from scheduler.contract import BatchOutput, BatchStats, Outcome, RowOutput, TokenEvent, WorkBatch
from worker.kvcache import grow_in_place
from worker.sampling import sample
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
        early_exit: bool = True,
        kv_headroom: int = 64,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device)
        self.delta = kv_bytes_per_token
        self.mem_cap = mem_cap_bytes
        self.oom_every = oom_every  # fault injection: every Nth batch of size > 1 runs out of memory
        self._batches = 0
        self.step_delay_s = step_delay_s  # fault injection: a slower device, for timing-free tests
        # early exit: a row leaves the batch the step it ends (its cache rows dropped); else the
        # paper's literal static batch: every row is computed until the longest one ends
        self.early_exit = early_exit
        self.kv_headroom = kv_headroom  # spare cache columns per layer (worker.kvcache); 0: transformers' cat
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

    def run(
        self,
        batch: WorkBatch,
        emit: Callable[[list[TokenEvent]], None] | None = None,
        on_rows: Callable[[list[RowOutput]], None] | None = None,
        cancelled: Callable[[], set[str]] | None = None,
    ) -> BatchOutput:
        """Run one batch to the end. Out-of-memory is caught and reported as an OOM outcome.

        ``emit``: new text of rows as it is decoded. With early exit, ``on_rows`` gets each row the
        step it ends and the row leaves the batch; ``cancelled()`` names rows to drop now (they
        leave the same way, without an output). The returned output holds every row that was not
        cancelled (early ones again), so the learners see the whole batch."""
        start = time.time()
        size = len(batch.items)
        max_prompt = max(len(r.prompt_ids) for r in batch.items)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._batches += 1
        try:
            if self.oom_every and size > 1 and self._batches % self.oom_every == 0:
                raise InjectedOOM(f"injected OOM on batch {batch.batch_id} (every {self.oom_every})")
            return self._run(batch, emit, on_rows, cancelled, start)
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
    def _run(self, batch: WorkBatch, emit, on_rows, cancelled, start: float) -> BatchOutput:
        reqs = batch.items
        size = len(reqs)
        max_prompt = max(len(r.prompt_ids) for r in reqs)
        steps_allowed = max(r.max_tokens for r in reqs)
        self._check_cap(size, max_prompt + 1)
        input_ids = torch.full((size, max_prompt), self.pad_id, dtype=torch.long)
        # the attention mask of every step, allocated once (decode steps use a growing view of it)
        full_mask = torch.zeros((size, max_prompt + steps_allowed), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            input_ids[i, max_prompt - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            full_mask[i, max_prompt - n :] = 1
        input_ids, full_mask = input_ids.to(self.device), full_mask.to(self.device)
        mask = full_mask[:, :max_prompt]
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
        cache = grow_in_place(out.past_key_values, self.kv_headroom)
        logits = out.logits[:, -1, :]
        prefill_s = time.perf_counter() - t0
        del out

        live = list(range(size))  # rows of ``reqs`` still in the tensors, in tensor order
        dropped: set[int] = set()  # cancelled rows: no output
        steps = row_steps = 0
        t1 = time.perf_counter()
        while True:
            next_ids, lps = sample(logits, [rows[i] for i in live], [generators[i] for i in live])
            steps += 1
            row_steps += len(live)
            now = time.time()
            events: list[TokenEvent] = []
            for j, i in enumerate(live):
                rows[i].append(int(next_ids[j]), now, lps[j])
                ev = rows[i].flush()
                if ev is not None:
                    events.append(ev)
            if emit is not None and events:
                emit(events)
            gone = {i for i in live if rows[i].done}
            if self.early_exit:
                if on_rows is not None and gone:
                    on_rows([rows[i].result() for i in live if i in gone])
                if cancelled is not None:
                    ids = cancelled()
                    new = {i for i in live if reqs[i].request_id in ids and i not in gone}
                    dropped |= new
                    gone |= new
            if len(gone) == len(live) or steps >= steps_allowed:
                break
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if self.early_exit and gone:  # finished and cancelled rows leave the batch
                keep = [j for j, i in enumerate(live) if i not in gone]
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                full_mask, positions, next_ids = full_mask[index], positions[index], next_ids[keep]
                live = [live[j] for j in keep]
            n = len(live)
            self._check_cap(n, max_prompt + steps + 1)
            mask = full_mask[:, :max_prompt + steps]  # prompt + the tokens fed so far, this one included
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_ids.view(n, 1).to(self.device),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
        decode_s = time.perf_counter() - t1
        del cache

        results: list[RowOutput] = [row.result() for i, row in enumerate(rows) if i not in dropped]
        stats = BatchStats(
            batch_id=batch.batch_id, size=size, max_prompt=max_prompt,
            max_gen=max(len(r.ids) for r in rows), prefill_s=prefill_s, decode_s=decode_s,
            valid_tokens=sum(len(r.ids) for r in rows), total_tokens=row_steps,
            peak_mem_bytes=self._peak(), start_time=start, end_time=time.time(),
        )
        return BatchOutput(batch_id=batch.batch_id, outcome=Outcome.OK, rows=results, stats=stats)
