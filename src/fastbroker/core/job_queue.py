"""core/job_queue.py: JobQueue, the requests waiting for a worker, and what a job
queued without options of its own gets (twin of core/job_queue.pxi).

Owns: the two FIFOs of queued requests (retries are served first), their count, the
queue limit and the broker's default timeout and tries.
Touches: RequestTable's requests, read only (a request is live while its state says
so). Users: BrokerCore (REQ clients), ClientSide
(FBC01 submit, restore, cancel), Attempts (retry, late answers), WorkerSide
(dispatch).

A request released while queued (answered late, cancelled) stays in its FIFO as a
tombstone (state FREE) until it reaches the front; ``count``, the number of QUEUED
requests, does not include it.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Optional

from fastbroker.core import cdef
from fastbroker.core.request_table import QUEUED, Req, RequestTable


class JobQueue:
    """New requests in ``waiting``, retries in ``retry`` (served first)."""

    __slots__ = ("table", "waiting", "retry", "count", "limit", "timeout", "tries")

    def __init__(
        self, table: RequestTable, timeout: Optional[float], tries: Optional[int], max_queue: Optional[int]
    ) -> None:
        self.table = table
        self.waiting: Deque[Req] = deque()  # new requests, FIFO
        self.retry: Deque[Req] = deque()  # requests whose attempt ended, served first
        self.count = 0  # QUEUED requests, tombstones not included
        self.timeout = timeout  # per attempt, None: none
        self.tries = -1 if tries is None else tries  # -1: unlimited
        self.limit = max_queue  # None: unbounded

    @cdef
    def push(self, r: Req) -> None:
        """Append request r to `waiting` (the caller counts it)."""
        self.waiting.append(r)

    @cdef
    def requeue(self, r: Req) -> None:
        """Append request r to `retry`, served before `waiting` (the caller counts it)."""
        self.retry.append(r)

    @cdef
    def full(self) -> bool:
        """Whether `limit` requests are queued already."""
        return self.limit is not None and self.count >= self.limit

    @cdef
    def next(self) -> Optional[Deque[Req]]:
        """The FIFO whose front is the request to dispatch next, or None.
        Tombstones met on the way are dropped."""
        for q in (self.retry, self.waiting):
            while q:
                if q[0].state == QUEUED:
                    return q
                q.popleft()
        return None

    @cdef
    def clear(self) -> None:
        """Forget every queued request."""
        self.waiting.clear()
        self.retry.clear()
        self.count = 0
