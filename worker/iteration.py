"""Iteration-level execution on the model directly: requests join and leave between decode steps.

Why not transformers' continuous batching manager (the CCB runner, ``worker/continuous.py``): it
takes one generation config for every request (no per-request temperature, top_p or seed), it
has no way to hand a running request back to the scheduler with its tokens (preemption), and on
this CPU it decodes at about a third of the static runner's speed. This runner keeps the static
runner's hot path (one left-padded cache growing in place, ``worker.kvcache``, vectorised seeded sampling, incremental
detokenization) and adds:

* **join**: requests that arrive are prefilled together (prompt plus, for a resumed request, the
  tokens it had) and their cache rows are merged into the running cache, left-padded to a common
  length (the attention mask hides the padding; positions are per row);
* **leave**: a row that ends (end token, stop string, ``max_tokens``), is cancelled or preempted is
  dropped from the cache the same step; columns that became padding for every row are trimmed;
* **progress**: every ``progress_every`` steps, each row's length and a repetition-loop flag go to
  the scheduler (re-prediction while decoding); ``preempt`` hands a row back with its tokens;
* **head states** (``state_layer``, for the probe predictor's re-predictor): a hook on that decoder
  layer keeps each row's running sum of its output at the row's positions from the prompt's last
  token on; at each re-prediction checkpoint (``predictor.types.CHECKPOINTS``) the mean goes along
  with the next progress report, as ``predictor.probe.head_state_means`` computes it offline. No
  extra forward: the states are those the step computed anyway;
* **out of memory**: every row is handed back (preempted, ``oom``) so the scheduler readmits
  fewer; a row alone that does not fit is reported as an OOM batch of one (it fails).

Each request is reported as a batch of one (its ``WorkBatch`` id), as the CCB runner does.
"""

from __future__ import annotations

import gc
import inspect
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from scheduler.contract import (
    CHECKPOINTS,
    HEAD_IDS,
    BatchOutput,
    BatchStats,
    Outcome,
    Preempted,
    RowOutput,
    RowProgress,
    TokenEvent,
    WorkBatch,
    WorkItem,
)
from worker.kvcache import grow_in_place
from worker.loops import is_looping
from worker.runner import InjectedOOM, is_oom
from worker.sampling import sample
from worker.text import RequestText, eos_ids_of


@dataclass
class _Row:
    """A request on the runner: its text so far, its sampler, where it came from."""

    batch_id: int
    item: WorkItem
    text: RequestText
    gen: torch.Generator | None
    start: float  # wall clock of its admission here
    prefill_s: float = 0.0
    looping: bool = False
    state: list[float] | None = None  # head state of a checkpoint reached since the last report (state_layer set)

    @property
    def resumed(self) -> int:
        return len(self.item.resume_ids)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class IterationRunner:
    """Runs a changing set of requests, one decode step at a time. Not thread-safe."""

    def __init__(
        self,
        model,
        tokenizer,
        device: str,
        send: Callable[[str, Any], None],
        kv_bytes_per_token: int,
        mem_cap_bytes: int | None = None,
        step_delay_s: float = 0.0,
        progress_every: int = 8,
        kv_headroom: int = 64,
        state_layer: int | None = None,
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.device = torch.device(device)
        self.send = send
        self.delta = kv_bytes_per_token
        self.mem_cap = mem_cap_bytes  # fault injection: KV cache cap below the real memory
        self.step_delay_s = step_delay_s
        self.progress_every = progress_every
        self.kv_headroom = kv_headroom  # spare cache columns per layer (worker.kvcache); 0: transformers' cat
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        params = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.pending: list[_Row] = []  # admitted, not yet prefilled
        self.rows: list[_Row] = []  # in the cache, in tensor order
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cache length): 1 where a row has a token
        self.pos: torch.Tensor | None = None  # (rows,): position of the token each row feeds next
        self.next_ids: torch.Tensor | None = None  # (rows,): the token each row feeds next
        self.steps = 0
        self._pending_on_error: list[_Row] = []  # joiners being prefilled (handed back if that fails)
        self.state_sum: torch.Tensor | None = None  # (rows, hidden): sum of each row's head states
        self._captured: torch.Tensor | None = None  # the hooked layer's output of the last forward
        if state_layer is not None:
            layers = getattr(getattr(model, "model", None), "layers", None)
            if not isinstance(layers, torch.nn.ModuleList) or not 1 <= state_layer <= len(layers):
                raise ValueError(f"state_layer {state_layer}: the model has no such decoder layer")
            layers[state_layer - 1].register_forward_hook(self._capture)
        self.state_layer = state_layer

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    # -- commands ----------------------------------------------------------------------------------
    def submit(self, batch: WorkBatch) -> None:
        """Requests that join at the next step (a resumed one continues from its ``resume_ids``)."""
        now = time.time()
        for item in batch.items:
            text = RequestText(item, self.tok, self.eos_ids)
            for t in item.resume_ids:  # replay: text and stop-string state as they were
                text.append(t, now)
            text.flush()  # what was already streamed is not sent again
            gen = None
            if item.sampling.temperature > 0:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(item.sampling.seed if item.sampling.seed is not None else torch.seed())
                if item.resume_ids:
                    torch.rand(len(item.resume_ids), generator=gen)  # one draw per token, as if never stopped
            self.pending.append(_Row(batch.batch_id, item, text, gen, now))

    def cancel(self, request_id: str) -> None:
        """The client went away: the row leaves now and is reported done (its reservation freed)."""
        self._remove(request_id, lambda row: self._report_done(row))

    def preempt(self, request_id: str, oom: bool = False) -> None:
        """Hand a row back to the scheduler with the tokens it has (it resumes from them later)."""
        self._remove(request_id, lambda row: self.send("preempted", [Preempted(request_id, list(row.text.ids), oom)]))

    def _remove(self, request_id: str, report: Callable[[_Row], None]) -> None:
        for i, row in enumerate(self.pending):
            if row.item.request_id == request_id:
                del self.pending[i]
                report(row)
                return
        for i, row in enumerate(self.rows):
            if row.item.request_id == request_id:
                self._drop({i})
                report(row)
                return

    # -- one iteration -----------------------------------------------------------------------------
    def step(self) -> None:
        """Prefill the joiners (if any), then one decode step of every row."""
        try:
            with torch.inference_mode():
                if self.pending:
                    self._join()
                if self.rows:
                    self._decode()
        except Exception as exc:  # noqa: BLE001 - classified below; the runner survives either way
            self._recover(exc)
        if self.step_delay_s and self.rows:
            time.sleep(self.step_delay_s)

    def _check_cap(self, rows: int, length: int) -> None:
        need = rows * length * self.delta
        if self.mem_cap is not None and need > self.mem_cap:
            raise InjectedOOM(f"KV cache of {rows} x {length} tokens needs {need} bytes > cap {self.mem_cap}")

    def _join(self) -> None:
        new, self.pending = self.pending, []
        self._pending_on_error = new
        seqs = [r.item.prompt_ids + r.item.resume_ids for r in new]
        length = max(len(s) for s in seqs)
        cur = self.mask.shape[1] if self.mask is not None else 0
        self._check_cap(len(self.rows) + len(new), max(length, cur) + 1)
        ids = torch.full((len(new), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, **self._last_logits_only)
        prefill_s = time.perf_counter() - t0
        next_ids, lps = sample(out.logits[:, -1, :], [r.text for r in new], [r.gen for r in new])
        pos = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache = grow_in_place(out.past_key_values, self.kv_headroom)
            self.mask, self.pos, self.next_ids = mask, pos, next_ids
        else:
            total = max(self.mask.shape[1], length)
            for a, b in zip(self.cache.layers, out.past_key_values.layers, strict=True):
                a.keys = torch.cat([_pad_left(a.keys, total, 2), _pad_left(b.keys, total, 2)], dim=0)
                a.values = torch.cat([_pad_left(a.values, total, 2), _pad_left(b.values, total, 2)], dim=0)
            self.mask = torch.cat([_pad_left(self.mask, total, 1), _pad_left(mask, total, 1)], dim=0)
            self.pos = torch.cat([self.pos, pos])
            self.next_ids = torch.cat([self.next_ids, next_ids])
        if self.state_layer is not None:  # from the prompt's last token on (a resumed row's tokens too)
            assert self._captured is not None
            sums = torch.stack([self._captured[i, length - r.resumed - 1:].float().sum(0) for i, r in enumerate(new)])
            self.state_sum = sums if self.state_sum is None else torch.cat([self.state_sum, sums])
            self._captured = None  # the prefill's states of every position: not kept
        for r in new:
            r.prefill_s = prefill_s
        self.rows.extend(new)
        self._pending_on_error = []
        self._after_tokens(self.rows[-len(new):], next_ids, lps, offset=len(self.rows) - len(new))

    def _decode(self) -> None:
        n = len(self.rows)
        self._check_cap(n, self.mask.shape[1] + 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((n, 1))], dim=1)
        out = self.model(input_ids=self.next_ids.view(n, 1).to(self.device), attention_mask=self.mask,
                         position_ids=self.pos.view(n, 1), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        if self.state_sum is not None:
            assert self._captured is not None
            self.state_sum += self._captured[:, -1].float()
        self.pos = self.pos + 1
        self.next_ids, lps = sample(out.logits[:, -1, :], [r.text for r in self.rows], [r.gen for r in self.rows])
        self.steps += 1
        self._after_tokens(self.rows, self.next_ids, lps, offset=0)
        if self.rows and self.steps % self.progress_every == 0:
            self._progress()

    def _after_tokens(self, rows: list[_Row], ids: torch.Tensor, lps: list, offset: int) -> None:
        """Append each row's new token, stream the text, and retire rows that ended."""
        now = time.time()
        events: list[TokenEvent] = []
        for j, row in enumerate(rows):
            row.text.append(int(ids[j]), now, lps[j])
            ev = row.text.flush()
            if ev is not None:
                events.append(ev)
            n = len(row.text.ids)
            if self.state_sum is not None and n in CHECKPOINTS:  # every state up to token n - 1: n of them
                row.state = (self.state_sum[offset + j] / n).tolist()
        if events:
            self.send("tokens", events)
        done = {offset + j for j, row in enumerate(rows) if row.text.done}
        if done:
            ended = [self.rows[i] for i in sorted(done)]
            self._drop(done)
            for row in ended:
                self._report_done(row)

    def _progress(self) -> None:
        for row in self.rows:
            if not row.looping and len(row.text.ids) >= 64:
                row.looping = is_looping(row.text.ids)
        # the first tokens go along until a report has them all (re-prediction uses no more), and a
        # head state once, with the first report after its checkpoint
        reports = [RowProgress(r.item.request_id, len(r.text.ids), r.looping,
                               r.text.ids[:HEAD_IDS] if len(r.text.ids) < HEAD_IDS + 8 else [],
                               r.state) for r in self.rows]
        for r in self.rows:
            r.state = None  # sent
        self.send("progress", reports)

    def _drop(self, gone: set[int]) -> None:
        """Rows leave the cache; columns that are padding for every remaining row are trimmed."""
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pos = self.next_ids = self.state_sum = None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.pos, self.next_ids = self.mask[index], self.pos[index], self.next_ids[keep]
        if self.state_sum is not None:
            self.state_sum = self.state_sum[index]
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    # -- reports -----------------------------------------------------------------------------------
    def _report_done(self, row: _Row) -> None:
        res: RowOutput = row.text.result()
        end = time.time()
        n = len(row.text.ids) - row.resumed
        stats = BatchStats(batch_id=row.batch_id, size=1, max_prompt=len(row.item.prompt_ids), max_gen=len(row.text.ids),
                           prefill_s=row.prefill_s, decode_s=end - row.start - row.prefill_s, valid_tokens=n,
                           total_tokens=n, start_time=row.start, end_time=end)
        self.send("done", BatchOutput(batch_id=row.batch_id, outcome=Outcome.OK, rows=[res], stats=stats))

    def _recover(self, exc: Exception) -> None:
        """A step failed: hand everything back (out of memory) or fail everything (anything else)."""
        rows = self.rows + self._pending_on_error + self.pending
        self.rows, self.pending, self._pending_on_error = [], [], []
        self.cache = self.mask = self.pos = self.next_ids = self.state_sum = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if is_oom(exc) and len(rows) > 1:
            self.send("preempted", [Preempted(r.item.request_id, list(r.text.ids), oom=True) for r in rows])
            return
        outcome = Outcome.OOM if is_oom(exc) else Outcome.ERROR
        error = f"oom: {exc}" if outcome is Outcome.OOM else traceback.format_exception(exc)
        for r in rows:
            self.send("done", BatchOutput(batch_id=r.batch_id, outcome=outcome, rows=[], stats=None,
                                          error=error if isinstance(error, str) else "".join(error)))
