"""core/kept_outcomes.py: KeptOutcomes, the outcomes of finished FBC01 requests kept
for RESULT and duplicate SUBMITs, and Done, one of them (twin of
core/kept_outcomes.pxi).

Owns: the kept outcomes, oldest first, their bytes, the retention limits.
Touches: RequestIds (an id points to its outcome while kept), Journal (forget),
Counters (expired_results). Users: ClientSide (conclude, replies), BrokerCore
(restore_outcome, run's retention timer).

Compiled only (absent here): not_kept (an outcome not kept for lack of memory).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.clock import monotonic
from fastbroker.core.counters import Counters
from fastbroker.core.journal import Journal
from fastbroker.core.request_ids import RequestIds

_OUTCOME_CODES = (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED)


class Done:
    """A finished FBC01 request's outcome, kept for RESULT and duplicate SUBMITs."""

    __slots__ = ("cid", "code", "body", "finished", "size", "attempts", "tries")

    def __init__(self, cid: bytes, code: bytes, body: list, finished: float, attempts: int, tries: int) -> None:
        self.cid = cid
        self.code = code
        self.body = body  # answer frames (OK) or type and message (FAILED)
        self.finished = finished
        self.size = sum(len(f) for f in body) + protocol.RESULT_OVERHEAD
        self.attempts = attempts
        self.tries = tries


class KeptOutcomes:
    """Outcomes kept until `retention` seconds pass or they pass `retention_bytes`
    in all (the oldest go first)."""

    __slots__ = ("ids", "journal", "counters", "retention", "retention_bytes", "fifo", "retained_bytes")

    def __init__(
        self, ids: RequestIds, journal: Journal, counters: Counters, retention: float, retention_bytes: int
    ) -> None:
        self.ids = ids
        self.journal = journal
        self.counters = counters
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.fifo: Deque[Done] = deque()  # oldest first
        self.retained_bytes = 0  # sizes of the kept outcomes

    @cdef
    def keep(self, cid: bytes, code: bytes, body: list, attempts: int, tries: int, finished: float) -> None:
        """Keep an outcome for RESULT; the id then points to it (or is forgotten)."""
        o = Done(cid, code, body, finished, attempts, tries)
        if self.retention <= 0 or o.size > self.retention_bytes:
            # Not kept (too big alone: forgotten at once, the others stay).
            self.ids.remove(cid)
            if self.retention > 0:
                self.counters.add("expired_results")
            if self.journal.on:
                self.journal.push(("forget", cid))
            return
        self.ids.add(cid, o)
        self.fifo.append(o)
        self.retained_bytes += o.size
        while self.retained_bytes > self.retention_bytes:
            self.forget_first()

    @cdef
    def forget_first(self) -> None:
        """Forget the oldest kept outcome."""
        o = self.fifo.popleft()
        self.ids.remove(o.cid)
        self.retained_bytes -= o.size
        self.counters.add("expired_results")
        if self.journal.on:
            self.journal.push(("forget", o.cid))

    @cdef
    def forget_due(self, now: float) -> None:
        """Forget the outcomes kept `retention` seconds by `now`."""
        limit = now - self.retention
        fifo = self.fifo
        while fifo and fifo[0].finished <= limit:
            self.forget_first()

    @cdef
    def first_expiry(self) -> float:
        """When the oldest kept outcome is due to be forgotten (there must be one)."""
        return self.fifo[0].finished + self.retention

    @cdef
    def release_all(self) -> None:
        """Forget every outcome (closing; the ids are the caller's)."""
        self.fifo.clear()
        self.retained_bytes = 0

    @cdef
    def restore(self, cid: bytes, code: bytes, body: List[bytes], attempts: int, tries: int, age: float) -> None:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first)."""
        if len(cid) != protocol.REQUEST_ID_SIZE or code not in _OUTCOME_CODES:
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        if self.ids.entry(cid) is not None:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        self.keep(cid, code, list(body), attempts, tries, monotonic() - max(age, 0.0))
