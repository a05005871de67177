"""core/request_table.py: RequestTable, every request in the broker by its 16-byte
task id, and Req, one request (twin of core/request_table.pxi).

Owns: the Req objects while they are live.
Touches: nothing else. Every handler reads and writes the Req fields of the requests
it is given; only this class makes and releases them. A request object stands where
the compiled core has a slot number: the deadline heap, the job queues and the
worker sessions hold the object itself.

Compiled only (absent here): live (a slot handle's generation check: a request object
is live while its state is not FREE) and write_id (the id is kept in Req.task_id).
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Dict, List, Optional

from fastbroker.core import cdef

if TYPE_CHECKING:
    from fastbroker.core.worker_sessions import Sess

# Req.state (ReqState in _core.pxd)
FREE = 0  # released: an entry still in a queue is a tombstone
QUEUED = 1
RUNNING = 2


class Req:
    """One request: where its answer goes, its payload, its attempts."""

    __slots__ = (
        "key",
        "task_id",
        "env",
        "payload",
        "state",
        "tries_left",
        "worker",
        "failed_on",
        "timeout",
        "tries",
        "attempts",
        "cid",
        "waiters",
        "v2_waiters",
        "fail",
        "arrived",
    )

    def __init__(self, key: int, task_id: bytes, env: list, payload: list, tries_left: int) -> None:
        self.key = key  # the table's counter value in task_id
        self.task_id = task_id
        self.env = env  # a REQ client's routing frames and delimiter; [] for FBC01
        self.payload = payload
        self.state = QUEUED
        self.tries_left = tries_left  # -1: unlimited
        self.worker: Optional[Sess] = None  # the DEALER worker running this attempt
        self.failed_on: Optional[Sess] = None  # the worker whose FAILED caused the retry
        self.timeout: Optional[float] = None  # per attempt
        self.tries = tries_left  # as given, -1: unlimited (for STATUS)
        self.attempts = 0
        # FBC01 requests only: the client's id, the identities told the outcome,
        # and the latest FAILED's (type, message) frames.
        self.cid: Optional[bytes] = None
        self.waiters: List[bytes] = []
        self.v2_waiters = 0  # bit w: waiter w speaks FBC02 (its replies go in REPLIES batches)
        self.fail: Optional[list] = None
        self.arrived = 0.0  # when it entered the broker (for the latency histogram)


class RequestTable:
    """Requests in the broker, keyed by 16-byte task ids (8-byte epoch + counter)."""

    __slots__ = ("epoch", "counter", "reqs")

    def __init__(self, epoch: Optional[bytes] = None) -> None:
        if epoch is None:
            epoch = os.urandom(8)
        if len(epoch) != 8:
            raise ValueError("epoch must be 8 bytes")
        self.epoch = epoch
        self.counter = itertools.count(1)
        self.reqs: Dict[bytes, Req] = {}

    @cdef
    def clear(self) -> None:
        """Forget every request (the epoch stays)."""
        self.reqs.clear()

    @cdef
    def alloc(self, env: list, payload: list, tries_left: int) -> Req:
        """A new request, QUEUED, with the next task id."""
        key = next(self.counter)
        task_id = self.epoch + key.to_bytes(8, "little")
        r = Req(key, task_id, env, payload, tries_left)
        self.reqs[task_id] = r
        return r

    @cdef
    def release(self, r: Req) -> None:
        """Forget a live request; its queue entries become tombstones."""
        del self.reqs[r.task_id]
        r.state = FREE

    @cdef
    def find(self, tid: bytes) -> Optional[Req]:
        """The live request with this task id, or None."""
        return self.reqs.get(tid)

    # -- Python interface ---------------------------------------------------

    def add(self) -> bytes:
        """Register an (empty) request and return its task id."""
        return self.alloc([], [], -1).task_id

    def discard(self, task_id: bytes) -> bool:
        """Forget a request; False if the id is unknown or stale."""
        r = self.reqs.pop(task_id, None)  # release(), without a second lookup
        if r is None:
            return False
        r.state = FREE
        return True

    def __contains__(self, task_id: bytes) -> bool:
        return task_id in self.reqs

    def __len__(self) -> int:
        return len(self.reqs)
