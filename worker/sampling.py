"""Choosing the next token of every row of a batch: logits processors, sampling, logprobs.

One pass over the batch's last-position logits, vectorised over the rows that need each part:

1. **logprobs** (rows that asked): log-softmax of the model's raw logits, as vLLM's default
   (``raw_logprobs``): the chosen token's and the k most likely ones;
2. **processors** (rows that asked): ``logit_bias``; ``repetition_penalty`` over prompt and
   output tokens (HF/vLLM: a positive logit is divided, a negative one multiplied);
   ``frequency_penalty`` and ``presence_penalty`` over output tokens (OpenAI's formula);
   ``min_tokens`` masks the row's end tokens until it has that many;
3. **sampling**: greedy for temperature 0; else temperature + nucleus, each row drawing its
   uniform from its own seeded generator (inverse-CDF), so a row's tokens depend on its seed,
   not on its batch.

Per-row token counts for the penalties live on the row (``RequestText.sampler_state``) and are
updated with the tokens added since the last step: constant work per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.contract import TokenLogprob
from worker.text import RequestText


@dataclass
class _Counts:
    """A row's token counts over the vocabulary (output only, and prompt + output)."""

    output: torch.Tensor  # (vocab,) float
    seen: torch.Tensor  # (vocab,) bool: in the prompt or the output
    counted: int = 0  # row.ids[:counted] are in ``output``


def _counts(row: RequestText, vocab: int, device: torch.device) -> _Counts:
    st = row.sampler_state
    if not isinstance(st, _Counts):
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        prompt = [t for t in row.req.prompt_ids if t < vocab]
        if prompt:
            seen[torch.tensor(prompt, device=device)] = True
        st = row.sampler_state = _Counts(torch.zeros(vocab, device=device), seen)
    new = [t for t in row.ids[st.counted:] if t < vocab]
    if new:
        idx = torch.tensor(new, device=device)
        st.output.index_add_(0, idx, torch.ones(len(new), device=device))
        st.seen[idx] = True
    st.counted = len(row.ids)
    return st


def _process(logits: torch.Tensor, rows: list[RequestText], idx: list[int]) -> torch.Tensor:
    """The rows ``idx`` of ``logits`` (float32, a copy) with their processors applied."""
    dev = logits.device
    vocab = logits.shape[-1]
    out = logits[idx].float()
    params = [rows[i].req.sampling for i in idx]
    bias_rows, bias_ids, bias_vals = [], [], []
    for j, sp in enumerate(params):
        for tok, val in sp.logit_bias:
            if 0 <= tok < vocab:
                bias_rows.append(j)
                bias_ids.append(tok)
                bias_vals.append(val)
    if bias_rows:
        out.index_put_((torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev)),
                       torch.tensor(bias_vals, device=dev), accumulate=True)
    pen = [j for j, sp in enumerate(params)
           if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty]
    if pen:
        counts = [_counts(rows[idx[j]], vocab, dev) for j in pen]
        sel = torch.tensor(pen, device=dev)
        part = out[sel]
        rep = torch.tensor([params[j].repetition_penalty for j in pen], device=dev)[:, None]
        seen = torch.stack([c.seen for c in counts])
        part = torch.where(seen, torch.where(part > 0, part / rep, part * rep), part)
        output = torch.stack([c.output for c in counts])
        freq = torch.tensor([params[j].frequency_penalty for j in pen], device=dev)[:, None]
        pres = torch.tensor([params[j].presence_penalty for j in pen], device=dev)[:, None]
        part = part - freq * output - pres * (output > 0).float()
        out[sel] = part
    for j, sp in enumerate(params):
        row = rows[idx[j]]
        if len(row.ids) < sp.min_tokens:
            ends = [t for t in row.end_ids | row.eos_ids if t < vocab]
            if ends:
                out[j, torch.tensor(ends, device=dev)] = -torch.inf
    return out


def _logprobs(raw: torch.Tensor, rows: list[RequestText], idx: list[int], chosen: torch.Tensor
              ) -> dict[int, TokenLogprob]:
    """Each row of ``idx``: its chosen token's raw log-probability and its k most likely tokens."""
    dev = raw.device
    lp = torch.log_softmax(raw[idx].float(), dim=-1)
    picked = chosen.to(dev)[idx]
    chosen_lp = lp.gather(1, picked[:, None]).squeeze(1).tolist()
    k = max(rows[i].req.sampling.logprobs or 0 for i in idx)
    top_lp, top_ids = (lp.topk(k, dim=-1) if k else (None, None))
    out: dict[int, TokenLogprob] = {}
    tok = rows[idx[0]].tok
    for j, i in enumerate(idx):
        tid = int(picked[j])
        top: list[tuple[int, str, float]] = []
        ki = rows[i].req.sampling.logprobs or 0
        if ki:
            ids = top_ids[j, :ki].tolist()
            vals = top_lp[j, :ki].tolist()
            top = [(t, tok.decode([t]), v) for t, v in zip(ids, vals, strict=True)]
        out[i] = TokenLogprob(token_id=tid, token=tok.decode([tid]), logprob=float(chosen_lp[j]), top=top)
    return out


def sample(logits: torch.Tensor, rows: list[RequestText], generators: list[torch.Generator | None]
           ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """The next token of every row (on the CPU) and, for rows that asked, its logprobs."""
    live = [i for i, r in enumerate(rows) if not r.done]
    proc = [i for i in live if rows[i].req.sampling.processed]
    work = logits
    if proc:
        work = logits.clone() if logits.dtype == torch.float32 else logits.float()
        work[proc] = _process(logits, rows, proc)
    next_ids = work.argmax(dim=-1)
    idx = [i for i in live if generators[i] is not None]
    if idx:
        dev = logits.device
        sel = torch.tensor(idx, device=dev)
        temps = torch.tensor([rows[i].req.sampling.temperature for i in idx], device=dev)
        top_p = torch.tensor([rows[i].req.sampling.top_p for i in idx], device=dev)
        probs = torch.softmax(work[sel].float() / temps[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p[:, None]
        keep[:, 0] = True  # the top token always (a top_p below float32's range would keep none)
        cum = (sorted_p * keep).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in idx]).to(dev) * cum[:, -1]
        pick = torch.searchsorted(cum, u[:, None].contiguous()).clamp(max=cum.shape[-1] - 1)
        next_ids[sel] = order.gather(1, pick).squeeze(1)
    lp_rows = [i for i in live if rows[i].req.sampling.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(rows)
    if lp_rows:
        for i, entry in _logprobs(logits, rows, lp_rows, next_ids).items():
            lps[i] = entry
    return next_ids.cpu(), lps
