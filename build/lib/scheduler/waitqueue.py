"""The waiting queue of the FCFS policies (VS, VSQ, CCB): ordered by (priority, arrival).

One FIFO per priority level, levels kept sorted: the head is the earliest request of the best
(lowest) priority. Requests join at the back of their level (arrivals come in time order) or at
its front (a requeued request, older than everything behind it), so each FIFO stays in arrival
order. With every priority equal this is one plain FIFO.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator

from scheduler.request import Request


class PriorityQueue:
    """Waiting requests, best first: ``(priority, arrival)``."""

    def __init__(self) -> None:
        self._levels: list[int] = []  # the priorities present, best (lowest) first
        self._fifos: dict[int, deque[Request]] = {}
        self._n = 0

    def _fifo(self, priority: int) -> deque[Request]:
        fifo = self._fifos.get(priority)
        if fifo is None:
            fifo = self._fifos[priority] = deque()
            bisect.insort(self._levels, priority)
        return fifo

    def _drop_if_empty(self, priority: int) -> None:
        if not self._fifos[priority]:
            del self._fifos[priority]
            self._levels.remove(priority)

    def append(self, req: Request) -> None:
        """At the back of its priority (a new arrival)."""
        self._fifo(req.priority).append(req)
        self._n += 1

    def appendleft(self, req: Request) -> None:
        """At the front of its priority (a requeued request, older than the ones waiting)."""
        self._fifo(req.priority).appendleft(req)
        self._n += 1

    def head(self) -> Request | None:
        """The best waiting request (None when empty)."""
        return self._fifos[self._levels[0]][0] if self._levels else None

    def popleft(self) -> Request:
        """Remove and return the best waiting request."""
        level = self._levels[0]
        req = self._fifos[level].popleft()
        self._drop_if_empty(level)
        self._n -= 1
        return req

    def oldest_arrival(self) -> float:
        """The earliest arrival of any priority (inf when empty)."""
        return min((f[0].arrival for f in self._fifos.values()), default=math.inf)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out wherever it is; None if it is not waiting."""
        for level, fifo in self._fifos.items():
            for i, r in enumerate(fifo):
                if r.id == request_id:
                    del fifo[i]
                    self._drop_if_empty(level)
                    self._n -= 1
                    return r
        return None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Request]:
        """Best first."""
        for level in self._levels:
            yield from self._fifos[level]
