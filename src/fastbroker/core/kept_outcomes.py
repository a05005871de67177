"""core/kept_outcomes.py: KeptOutcomes, the outcomes of finished FBC01 requests kept
for RESULT and duplicate SUBMITs, and Done, one of them (twin of
core/kept_outcomes.pxi). A FAILED or TIMED_OUT outcome keeps its request's payload
too: it is *dead* (the dead-letter), listed by DEAD and run again by REQUEUE.

Owns: the kept outcomes, oldest first, their bytes, the retention limits.
Touches: RequestIds (an id points to its outcome while kept), Journal (forget),
Counters (expired_results). Users: ClientSide (conclude, replies, DEAD, REQUEUE),
BrokerCore (restore_outcome, run's retention timer).

Compiled only (absent here): not_kept (an outcome not kept for lack of memory) and
release_frames (an outcome's frames freed by hand; here the garbage collector does it).
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.clock import monotonic
from fastbroker.core.counters import Counters
from fastbroker.core.journal import Journal
from fastbroker.core.request_ids import RequestIds

_OUTCOME_CODES = (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED)
_DEAD_CODES = (protocol.R_FAILED, protocol.R_TIMED_OUT)  # given up: these keep their payload


class Done:
    """A finished FBC01 request's outcome, kept for RESULT and duplicate SUBMITs."""

    __slots__ = ("cid", "code", "body", "finished", "size", "attempts", "tries", "payload", "timeout", "gone")

    def __init__(
        self,
        cid: bytes,
        code: bytes,
        body: list,
        finished: float,
        attempts: int,
        tries: int,
        payload: Optional[list],
        timeout: Optional[float],
    ) -> None:
        self.cid = cid
        self.code = code
        self.body = body  # answer frames (OK) or type and message (FAILED)
        self.finished = finished
        self.attempts = attempts
        self.tries = tries
        # A dead request's payload and per-attempt timeout (for REQUEUE), else None.
        self.payload = payload
        self.timeout = timeout
        self.size = sum(len(f) for f in body) + sum(len(f) for f in payload or ()) + protocol.RESULT_OVERHEAD
        # Requeued: a tombstone in the FIFO until it reaches the front (its id is the
        # new request's).
        self.gone = False


class KeptOutcomes:
    """Outcomes kept until `retention` seconds pass or they pass `retention_bytes`
    in all (the oldest go first)."""

    __slots__ = (
        "ids",
        "journal",
        "counters",
        "retention",
        "retention_bytes",
        "fifo",
        "retained_bytes",
        "count",
        "dead",
    )

    def __init__(
        self, ids: RequestIds, journal: Journal, counters: Counters, retention: float, retention_bytes: int
    ) -> None:
        self.ids = ids
        self.journal = journal
        self.counters = counters
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.fifo: Deque[Done] = deque()  # oldest first, requeued ones (gone) included
        self.retained_bytes = 0  # sizes of the kept outcomes
        self.count = 0  # kept outcomes (not gone)
        self.dead = 0  # of which dead

    @cdef
    def keep(
        self,
        cid: bytes,
        code: bytes,
        body: list,
        payload: Optional[list],
        attempts: int,
        tries: int,
        timeout: Optional[float],
        finished: float,
    ) -> None:
        """Keep an outcome for RESULT (with its payload if it is dead: FAILED or
        TIMED_OUT); the id then points to it (or is forgotten)."""
        o = Done(cid, code, body, finished, attempts, tries, payload, timeout)
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
        self.count += 1
        if payload is not None:
            self.dead += 1
        while self.retained_bytes > self.retention_bytes:
            self.forget_first()

    @cdef
    def forget_first(self) -> None:
        """Forget the oldest kept outcome (a requeued one just leaves the FIFO)."""
        o = self.fifo.popleft()
        if o.gone:
            return
        self.ids.remove(o.cid)
        self.retained_bytes -= o.size
        self.count -= 1
        if o.payload is not None:
            self.dead -= 1
        self.counters.add("expired_results")
        if self.journal.on:
            self.journal.push(("forget", o.cid))

    @cdef
    def withdraw(self, o: Done) -> None:
        """Take dead outcome o out (REQUEUE: its id goes to the new request, which the
        caller makes from o's payload); it stays in the FIFO as a tombstone."""
        o.gone = True
        o.body = []
        o.payload = None  # the new request has it
        self.retained_bytes -= o.size
        self.count -= 1
        self.dead -= 1
        if self.journal.on:
            self.journal.push(("forget", o.cid))

    @cdef
    def dead_list(self, limit: int) -> List[Done]:
        """Up to `limit` dead outcomes, oldest first (a scan of the FIFO)."""
        found: List[Done] = []
        if limit <= 0:
            return found
        for o in self.fifo:
            if o.payload is not None and not o.gone:
                found.append(o)
                if len(found) == limit:
                    break
        return found

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
        self.count = 0
        self.dead = 0

    @cdef
    def restore(
        self,
        cid: bytes,
        code: bytes,
        body: List[bytes],
        attempts: int,
        tries: int,
        age: float,
        payload: Optional[List[bytes]],
        timeout: Optional[float],
    ) -> None:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first); a
        payload makes a FAILED or TIMED_OUT outcome dead (it is ignored on another)."""
        if len(cid) != protocol.REQUEST_ID_SIZE or code not in _OUTCOME_CODES:
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        if self.ids.entry(cid) is not None:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        if payload is not None:
            payload = [bytes(f) for f in payload] if payload and code in _DEAD_CODES else None
        self.keep(cid, code, list(body), payload, attempts, tries, timeout, monotonic() - max(age, 0.0))
