"""The adaptive batch assembler: wasted memory access (WMA), DESIGN §2.2.

For a batch ``B`` with ``L = L(B)`` (longest prompt) and ``G = G(B)`` (longest generation):

* ``WMA_gen(p)  = G(p) * (L - L(p))``                      (padding read while p decodes)
* ``WMA_wait(p) = sum_{g=G(p)}^{G} (g + L)``                 (reads after p's end token)
* ``WMA(B)      = max_{p in B} WMA_gen(p) + WMA_wait(p)``

The sum is taken literally, both ends included (so a member with ``G(p) = G`` still counts one
step, ``G + L``, and a lone request has ``WMA = L + G``).

O(1) update. Write ``S(L, G) = sum_{g=0}^{G} (L + g) = (G + 1) L + G (G + 1) / 2`` (the reads of
one padded slot over the batch's ``G + 1`` steps) and ``U(p) = sum_{g=0}^{G(p)-1} (L(p) + g)
= G(p) L(p) + G(p) (G(p) - 1) / 2`` (the reads p itself needs). Then

    WMA_gen(p) + WMA_wait(p) = S(L, G) - U(p),

because ``S(L, G) - sum_{g<G(p)} (L + g) = WMA_wait(p)`` and
``sum_{g<G(p)} (L + g) - U(p) = G(p) (L - L(p)) = WMA_gen(p)``. The first term depends only on
the batch, the second only on the member, so ``WMA(B) = S(L(B), G(B)) - min_p U(p)``: the maximum
is attained at the member needing the fewest reads, whatever ``L`` and ``G`` become. Adding
``p`` gives ``L' = max(L, L(p))``, ``G' = max(G, G(p))``, ``U' = min(U_min, U(p))`` -- three
aggregates per batch, so placing an arrival costs O(1) per waiting batch. Removing a member
(cancel) recomputes the aggregates of that one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.batch import Batch, new_batch_id
from scheduler.memory import MemoryModel
from scheduler.request import Request


def slot_reads(max_prompt: int, max_gen: int) -> int:
    """``S(L, G) = (G + 1) L + G (G + 1) / 2``."""
    return (max_gen + 1) * max_prompt + max_gen * (max_gen + 1) // 2


def useful_reads(prompt: int, gen: int) -> int:
    """``U(p) = G(p) L(p) + G(p) (G(p) - 1) / 2``."""
    return gen * prompt + gen * (gen - 1) // 2


def wma_gen(prompt: int, gen: int, max_prompt: int) -> int:
    """``WMA_gen(p) = G(p) (L(B) - L(p))``."""
    return gen * (max_prompt - prompt)


def wma_wait(gen: int, max_prompt: int, max_gen: int) -> int:
    """``WMA_wait(p) = sum_{g=G(p)}^{G(B)} (g + L(B))`` in closed form."""
    n = max_gen - gen + 1
    return n * max_prompt + (gen + max_gen) * n // 2


def wma(members: Iterable[tuple[int, int]]) -> int:
    """WMA of a batch given its members' ``(L(p), G(p))``, member by member (O(|B|))."""
    pairs = list(members)
    if not pairs:
        return 0
    max_prompt = max(p for p, _ in pairs)
    max_gen = max(g for _, g in pairs)
    return max(wma_gen(p, g, max_prompt) + wma_wait(g, max_prompt, max_gen) for p, g in pairs)


def phi_for_tokens(tokens: int) -> int:
    """A threshold Phi in KV-token reads: the reads of a whole ``tokens``-prompt,
    ``tokens``-generation request (``S(T, T) ~ 1.5 T^2``)."""
    return slot_reads(tokens, tokens)


#: Default Phi = S(512, 512) ~ 3.9e5 KV-token reads: a request may join a batch only if no member
#: then wastes more reads than a whole 512+512-token request needs. WMA grows with L*G, so an
#: absolute threshold is lenient with short requests (a 10-token request may wait in a batch of
#: ~400-token ones: cheap) and strict with long ones (1000-token requests group only with
#: lengths within ~10%, where a mismatch costs hundreds of decode steps). It keeps ~10-token and
#: ~1000-token requests apart (joining costs ~1.5e6) while ~1000-token requests within +-5%
#: (WMA <= ~3e5) still batch together. Tune per workload with phi_for_tokens().
DEFAULT_PHI = phi_for_tokens(512)


@dataclass(eq=False)
class WaitingBatch:
    """A batch in the waiting queue with the aggregates the assembler needs."""

    requests: list[Request]
    created: float  # when the batch was opened
    id: int = field(default_factory=new_batch_id)
    retries: int = 0  # OOM splits so far (see Batch.retries)
    sealed: bool = False  # takes no new members (an OOM half)
    priority: int = 0  # every member's (Request.priority): a batch holds one priority only
    max_prompt: int = 0  # L(B)
    max_gen: int = 0  # G(B), from predicted lengths capped by max_tokens
    min_useful: int = 0  # min_p U(p)
    since: float = math.inf  # earliest arrival: T_w counts from here
    tokens: int = 0  # sum of prompt + max_tokens (backpressure)

    def __post_init__(self) -> None:
        self.recompute()

    def recompute(self) -> None:
        """Rebuild the aggregates from the members (O(|B|))."""
        reqs = self.requests
        self.max_prompt = max((r.prompt_tokens for r in reqs), default=0)
        self.max_gen = max((r.gen_estimate for r in reqs), default=0)
        self.min_useful = min((useful_reads(r.prompt_tokens, r.gen_estimate) for r in reqs), default=0)
        self.since = min((r.arrival for r in reqs), default=math.inf)
        self.tokens = sum(r.prompt_tokens + r.max_tokens for r in reqs)

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def wma(self) -> int:
        """WMA(B) from the aggregates."""
        if not self.requests:
            return 0
        return slot_reads(self.max_prompt, self.max_gen) - self.min_useful

    def wma_with(self, prompt: int, gen: int) -> int:
        """WMA of the batch with a request ``(L(p), G(p))`` added, in O(1)."""
        u = useful_reads(prompt, gen)
        if not self.requests:
            return slot_reads(prompt, gen) - u
        return slot_reads(max(self.max_prompt, prompt), max(self.max_gen, gen)) - min(self.min_useful, u)

    def add(self, req: Request) -> None:
        gen = req.gen_estimate
        u = useful_reads(req.prompt_tokens, gen)
        if not self.requests:
            self.min_useful = u
        else:
            self.min_useful = min(self.min_useful, u)
        self.requests.append(req)
        self.max_prompt = max(self.max_prompt, req.prompt_tokens)
        self.max_gen = max(self.max_gen, gen)
        self.since = min(self.since, req.arrival)
        self.tokens += req.prompt_tokens + req.max_tokens

    def remove(self, request_id: str) -> Request | None:
        for i, r in enumerate(self.requests):
            if r.id == request_id:
                del self.requests[i]
                self.recompute()
                return r
        return None

    def to_batch(self) -> Batch:
        return Batch(requests=list(self.requests), created=self.created, id=self.id, retries=self.retries)


class WmaAssembler:
    """Places each arrival into the waiting batch of least WMA, or opens a new batch.

    A candidate counts as infinite when the grown batch would exceed ``memory`` (``MEM > Theta``)
    or ``max_batch_size``; sealed batches take no one, nor do batches of another priority (a batch
    holds requests of one priority, so that it can be dispatched by it). Join when ``phi < Phi``.
    """

    def __init__(
        self, phi: float = DEFAULT_PHI, memory: MemoryModel | None = None, max_batch_size: int | None = None
    ) -> None:
        if phi < 0:
            raise ValueError("phi must be >= 0")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.phi = phi
        self.memory = memory
        self.max_batch_size = max_batch_size
        self.batches: dict[int, WaitingBatch] = {}  # insertion (creation / requeue) order
        self._where: dict[str, int] = {}  # request id -> batch id
        self.n_requests = 0
        self.tokens = 0

    def best(self, req: Request) -> tuple[float, WaitingBatch | None]:
        """``(phi, B*)``: the least WMA over the waiting batches of ``req``'s priority with ``req``
        added (inf, None if none)."""
        prompt, gen, priority = req.prompt_tokens, req.gen_estimate, req.priority
        u = useful_reads(prompt, gen)
        cap = self.max_batch_size
        mem = self.memory
        best_phi, best_batch = math.inf, None
        for b in self.batches.values():
            if b.sealed or b.priority != priority or (cap is not None and b.size >= cap):
                continue
            L, G = max(b.max_prompt, prompt), max(b.max_gen, gen)
            phi = (G + 1) * L + G * (G + 1) // 2 - min(b.min_useful, u)  # inline slot_reads: hot loop
            if phi < best_phi and (mem is None or mem.fits(b.size + 1, L, G)):
                best_phi, best_batch = phi, b
        return best_phi, best_batch

    def place(self, req: Request, now: float) -> WaitingBatch:
        """Add an arrival; returns the batch it joined or opened."""
        phi, batch = self.best(req)
        if batch is None or not phi < self.phi:
            batch = WaitingBatch(requests=[], created=now, priority=req.priority)
            self.batches[batch.id] = batch
        batch.add(req)
        self._where[req.id] = batch.id
        self.n_requests += 1
        self.tokens += req.prompt_tokens + req.max_tokens
        return batch

    def insert(self, batch: WaitingBatch) -> None:
        """Put a whole batch (e.g. an OOM half) into the queue as it is."""
        self.batches[batch.id] = batch
        for r in batch.requests:
            self._where[r.id] = batch.id
        self.n_requests += batch.size
        self.tokens += batch.tokens

    def pop(self, batch_id: int) -> WaitingBatch:
        """Take a batch out of the queue (to dispatch it)."""
        batch = self.batches.pop(batch_id)
        for r in batch.requests:
            self._where.pop(r.id, None)
        self.n_requests -= batch.size
        self.tokens -= batch.tokens
        return batch

    def cancel(self, request_id: str) -> Request | None:
        """Remove a waiting request; fixes its batch's aggregates, drops the batch if now empty."""
        batch_id = self._where.pop(request_id, None)
        if batch_id is None:
            return None
        batch = self.batches[batch_id]
        req = batch.remove(request_id)
        if req is None:  # inconsistent index; nothing removed
            return None
        self.n_requests -= 1
        self.tokens -= req.prompt_tokens + req.max_tokens
        if not batch.requests:
            del self.batches[batch_id]
        return req
