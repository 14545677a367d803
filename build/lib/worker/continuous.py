"""CCB execution: iteration-level batching on transformers' own continuous batching manager.

Requests join the running set between decode steps and leave it as each one ends; admission
(memory reserved for prompt + max_tokens) is decided by the scheduler's CCB policy before a
request is sent here. Gaps versus the static runner: decoding is greedy for every request
(transformers' manager takes one generation config; per-request temperature/top_p/seed are
not applied), and there is no OOM split (the policy's conservative reservation prevents it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from scheduler.contract import BatchOutput, BatchStats, Outcome, WorkBatch
from worker.text import RequestText, eos_ids_of

log = logging.getLogger(__name__)


class ContinuousRunner:
    """Feeds requests to a ContinuousBatchingManager and reports each one as a batch of one."""

    def __init__(self, model, tokenizer, send: Callable[[str, Any], None]) -> None:
        from transformers import GenerationConfig

        self.tok = tokenizer
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.send = send
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        cfg = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=sorted(self.eos_ids), pad_token_id=pad)
        self.mgr = model.init_continuous_batching(generation_config=cfg)
        self.mgr.start()
        self._rows: dict[str, tuple[int, RequestText, float]] = {}  # id -> (batch id, text, start wall)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="magnus-ccb", daemon=True)
        self._thread.start()

    def submit(self, batch: WorkBatch) -> None:
        for r in batch.items:
            if r.sampling.temperature > 0:
                log.debug("CCB decodes greedily; temperature %.2f of %s not applied", r.sampling.temperature, r.request_id)
            with self._lock:
                self._rows[r.request_id] = (batch.batch_id, RequestText(r, self.tok, self.eos_ids), time.time())
            self.mgr.add_request(r.prompt_ids, request_id=r.request_id, max_new_tokens=r.max_tokens, streaming=True)

    def _pump(self) -> None:
        while not self._stop.is_set():
            out = self.mgr.get_result(timeout=0.1)
            if out is None:
                continue
            with self._lock:
                entry = self._rows.get(out.request_id)
            if entry is None:
                continue  # finished earlier (stop string) or unknown
            batch_id, row, start = entry
            now = time.time()
            for tok in out.generated_tokens[len(row.ids):]:  # outputs carry all tokens so far
                row.append(int(tok), now)
            ev = row.flush()
            if ev is not None:
                self.send("tokens", [ev])
            if row.done and not out.is_finished():
                self.mgr.cancel_request(out.request_id)  # a stop string ended it early
            if row.done or out.is_finished():
                self._finish(batch_id, row, start, out.error)

    def _finish(self, batch_id: int, row: RequestText, start: float, error: str | None) -> None:
        with self._lock:
            if self._rows.pop(row.req.request_id, None) is None:
                return  # already reported (a cancel and the last token crossed)
        end = time.time()
        res = row.result()
        n = len(row.ids)
        stats = BatchStats(batch_id=batch_id, size=1, max_prompt=len(row.req.prompt_ids), max_gen=n, prefill_s=0.0,
                           decode_s=end - start, valid_tokens=n, total_tokens=n, start_time=start, end_time=end)
        outcome = Outcome.ERROR if error else Outcome.OK
        self.send("done", BatchOutput(batch_id=batch_id, outcome=outcome, rows=[] if error else [res], stats=stats,
                                       error=error))

    def cancel(self, request_id: str) -> None:
        """The client went away: stop decoding it and report it done (its reservation is freed)."""
        with self._lock:
            entry = self._rows.get(request_id)
        if entry is None:
            return
        self.mgr.cancel_request(request_id)
        batch_id, row, start = entry
        self._finish(batch_id, row, start, None)

    def stop(self) -> None:
        self._stop.set()
        self.mgr.stop(block=True)
