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
   not on its batch. The nucleus is found among the 256, then 4096 most likely tokens (a top-k,
   ~20x cheaper than sorting the vocabulary on a CPU), falling back to the full sort for a row
   whose nucleus is larger; without top_p no sort at all.

Per-row token counts for the penalties live on the row (``RequestText.sampler_state``) and are
updated with the tokens added since the last step: constant work per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scheduler.contract import TokenLogprob
from worker.text import RequestText


@dataclass
class _Counts:
    """The tokens a row has seen (prompt, then output) and how often each is in its output."""

    pos: dict[int, int] = field(default_factory=dict)  # token -> index in ``ids``
    ids: list[int] = field(default_factory=list)  # distinct tokens, prompt and output
    output: list[float] = field(default_factory=list)  # times each is in the output
    counted: int = 0  # row.ids[:counted] are counted


def _counts(row: RequestText, vocab: int) -> _Counts:
    st = row.sampler_state
    if not isinstance(st, _Counts):
        st = row.sampler_state = _Counts()
        for t in row.req.prompt_ids:
            if t < vocab and t not in st.pos:
                st.pos[t] = len(st.ids)
                st.ids.append(t)
                st.output.append(0.0)
    for t in row.ids[st.counted:]:
        if t >= vocab:
            continue
        j = st.pos.get(t)
        if j is None:
            st.pos[t] = len(st.ids)
            st.ids.append(t)
            st.output.append(1.0)
        else:
            st.output[j] += 1.0
    st.counted = len(row.ids)
    return st


def _process(work: torch.Tensor, rows: list[RequestText], idx: list[int]) -> None:
    """Apply the processors of rows ``idx`` to ``work`` (float32) in place. Penalties touch only
    the tokens a row has seen (sparse: a few hundred per row, not the vocabulary)."""
    dev = work.device
    vocab = work.shape[-1]
    bias_rows, bias_ids, bias_vals = [], [], []
    pen_rows, pen_ids, pen_counts, reps, freqs, press = [], [], [], [], [], []
    for i in idx:
        sp = rows[i].req.sampling
        for tok, val in sp.logit_bias:
            if 0 <= tok < vocab:
                bias_rows.append(i)
                bias_ids.append(tok)
                bias_vals.append(val)
        if sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
            c = _counts(rows[i], vocab)
            n = len(c.ids)
            pen_rows += [i] * n
            pen_ids += c.ids
            pen_counts += c.output
            reps += [sp.repetition_penalty] * n
            freqs += [sp.frequency_penalty] * n
            press += [sp.presence_penalty] * n
    if bias_rows:
        work.index_put_((torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev)),
                        torch.tensor(bias_vals, device=dev), accumulate=True)
    if pen_rows:
        r, t = torch.tensor(pen_rows, device=dev), torch.tensor(pen_ids, device=dev)
        cnt = torch.tensor(pen_counts, device=dev)
        rep = torch.tensor(reps, device=dev)
        vals = work[r, t]
        vals = torch.where(vals > 0, vals / rep, vals * rep)  # HF/vLLM: prompt and output tokens
        vals = vals - torch.tensor(freqs, device=dev) * cnt - torch.tensor(press, device=dev) * (cnt > 0).float()
        work[r, t] = vals
    for i in idx:
        row = rows[i]
        if len(row.ids) < row.req.sampling.min_tokens:
            ends = [t for t in row.end_ids | row.eos_ids if t < vocab]
            if ends:
                work[i, torch.tensor(ends, device=dev)] = -torch.inf


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


#: the nucleus is looked for among each row's 256, then 4096 most likely tokens (a top-k; sorting
#: the whole vocabulary costs ~20x more on a CPU); rows whose nucleus is larger get the full sort
_NUCLEUS_K = (256, 4096)


def _nucleus(vals: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from each row's nucleus (the most likely tokens whose mass before each is
    below top_p), given its most likely tokens in order (``vals``, ``order``) that hold the nucleus."""
    keep = (vals.cumsum(-1) - vals) < top_p[:, None]
    keep[:, 0] = True  # the top token always (a top_p below float32's range would keep none)
    cum = (vals * keep).cumsum(-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None].contiguous()).clamp(max=cum.shape[-1] - 1)
    return order.gather(1, pick).squeeze(1)


def _inverse_cdf(probs: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row drawn with its uniform ``u``; each row's draw depends on its own row only
    (never on its batch), so a seeded request samples the same tokens in any batch."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    whole = top_p >= 1.0
    if whole.any():  # no nucleus: the CDF in vocabulary order, no sort
        p = probs[whole]
        cum = p.cumsum(-1)
        out[whole] = torch.searchsorted(cum, (u[whole] * cum[:, -1])[:, None].contiguous()).clamp(
            max=p.shape[-1] - 1).squeeze(1)
    nuc = ~whole
    if nuc.any():
        p, tp, un = probs[nuc], top_p[nuc], u[nuc]
        picks = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
        left = torch.arange(p.shape[0], device=p.device)  # rows whose nucleus is not found yet
        for k in (*_NUCLEUS_K, p.shape[-1]):
            k = min(k, p.shape[-1])
            vals, order = (p[left].topk(k, dim=-1) if k < p.shape[-1]
                           else p[left].sort(dim=-1, descending=True))
            found = vals.sum(-1) >= tp[left] if k < p.shape[-1] else torch.ones_like(left, dtype=torch.bool)
            if found.any():  # the nucleus lies within these most likely tokens: exact
                picks[left[found]] = _nucleus(vals[found], order[found], tp[left[found]], un[left[found]])
            left = left[~found]
            if not len(left):
                break
        out[nuc] = picks
    return out


def sample(logits: torch.Tensor, rows: list[RequestText], generators: list[torch.Generator | None]
           ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """The next token of every row (on the CPU) and, for rows that asked, its logprobs."""
    live = [i for i, r in enumerate(rows) if not r.done]
    proc = [i for i in live if rows[i].req.sampling.processed]
    work = logits
    if proc:
        work = logits.clone() if logits.dtype == torch.float32 else logits.float()
        _process(work, rows, proc)
    next_ids = work.argmax(dim=-1)
    idx = [i for i in live if generators[i] is not None]
    if idx:
        dev = logits.device
        sel = torch.tensor(idx, device=dev)
        temps = torch.tensor([rows[i].req.sampling.temperature for i in idx], device=dev)
        top_p = torch.tensor([rows[i].req.sampling.top_p for i in idx], device=dev)
        probs = torch.softmax(work[sel].float() / temps[:, None], dim=-1)
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in idx]).to(dev)
        next_ids[sel] = _inverse_cdf(probs, top_p, u)
    lp_rows = [i for i in live if rows[i].req.sampling.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(rows)
    if lp_rows:
        for i, entry in _logprobs(logits, rows, lp_rows, next_ids).items():
            lps[i] = entry
    return next_ids.cpu(), lps
