"""core/worker_sessions.py: WorkerSessions, the FBW01 workers the broker knows, and
Sess, one of them (twin of core/worker_sessions.pxi).

Owns: the sessions by address key, the heartbeat schedule (next_tick, next_check) and
the current worker message's address key.
Touches: IdleWorkers (a session with spare credit is in the idle FIFO exactly then),
the Req fields worker (attach, detach), the workers socket (send_env).
Users: WorkerSide (messages, liveness, dispatch), ClientSide (cancel), Attempts
(answers).
"""

from __future__ import annotations

from typing import Dict, Optional

import zmq

from fastbroker.core import cdef
from fastbroker.core.address_index import address_key
from fastbroker.core.clock import Clock, monotonic
from fastbroker.core.idle_workers import IdleWorkers
from fastbroker.core.request_table import Req, RequestTable
from fastbroker.protocol import WORKER_SIGNATURE, WORKER_SIGNATURE_V2


class Sess:
    """A DEALER worker known to the broker: where it is, its credit, its jobs."""

    __slots__ = ("key", "env", "credit", "jobs", "ghosts", "expiry", "v2", "gone")

    def __init__(self, key: bytes, env: list) -> None:
        self.key = key
        self.env = env  # routing frames and the empty delimiter
        self.credit = 0
        self.jobs: Dict[int, Req] = {}  # by Req.key, oldest first
        # Jobs it still works on that ended without it (timed out, answered
        # elsewhere): their credit stays taken until it answers or fails them.
        self.ghosts = 0
        self.expiry = 0.0
        self.v2 = False  # its last READY was FBW02: it gets FBW02 messages, TASKs of many jobs
        # -1, or WorkerSessions.polls when a send to it failed (its connection is gone):
        # forgotten once the loop has polled again, so that a DISCONNECT it sent before
        # closing is read first and it is counted as left, not dead.
        self.gone = -1


class WorkerSessions:
    """The FBW01 workers by address key."""

    __slots__ = (
        "table",
        "idle",
        "clock",
        "s_workers",
        "heartbeat",
        "liveness",
        "sess",
        "next_tick",
        "next_check",
        "key",
        "polls",
    )

    def __init__(
        self, table: RequestTable, idle: IdleWorkers, clock: Clock, workers: zmq.Socket, heartbeat: float, liveness: int
    ) -> None:
        self.table = table
        self.idle = idle
        self.clock = clock
        self.s_workers = workers
        self.sess: Dict[bytes, Sess] = {}
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.next_tick = 0.0  # next heartbeat to the workers
        self.next_check = 0.0  # earliest time a worker may have gone silent too long
        self.key = b""  # the current worker message's address key
        self.polls = 0  # the loop's polls so far: a gone session waits for the next one

    @cdef
    def set_key(self, m: list, d: int) -> None:
        """Take the routing frames m[0:d] as the current address key."""
        self.key = address_key(m[:d])

    @cdef
    def find(self) -> Optional[Sess]:
        """The session of the worker whose key is the current one, or None."""
        return self.sess.get(self.key)

    @cdef
    def touch(self, s: Sess) -> None:
        """Worker s was heard from: it lives for liveness heartbeats more."""
        s.expiry = monotonic() + self.heartbeat * self.liveness

    @cdef
    def add(self, m: list, d: int) -> Sess:
        """Register the worker whose routing frames are m[0:d] (key: the current one)."""
        s = Sess(self.key, m[: d + 1])
        s.expiry = monotonic() + self.heartbeat * self.liveness
        self.sess[s.key] = s
        if len(self.sess) == 1:
            self.next_tick = monotonic() + self.heartbeat
            self.next_check = s.expiry
        else:
            self.next_check = min(self.next_check, s.expiry)
        return s

    @cdef
    def release(self, s: Sess) -> None:
        """Forget session s (its jobs were detached)."""
        del self.sess[s.key]

    @cdef
    def release_all(self) -> None:
        """Forget every session (closing)."""
        self.sess.clear()

    @cdef
    def offer(self, s: Sess) -> None:
        """Keep the worker in the idle FIFO exactly while it has spare credit (and is
        not gone)."""
        if len(s.jobs) + s.ghosts < s.credit and s.gone < 0:
            if self.idle.find(s.key) is None:
                self.idle.push_key(s.key, s)
        else:
            self.idle.remove_slot(s.key)

    @cdef
    def attach(self, r: Req, s: Sess) -> None:
        """Worker s runs r's attempt now."""
        r.worker = s
        s.jobs[r.key] = r

    @cdef
    def detach(self, r: Req, by_worker: bool = True) -> None:
        """The attempt in progress is over. If its worker ended it (answer, FAILED,
        death), its credit is free; if it ended without the worker (timeout, an
        answer from another attempt), the worker is still busy with it: the credit
        stays taken, as a ghost, until the worker answers or fails it."""
        s = r.worker
        if s is None:
            return
        r.worker = None
        del s.jobs[r.key]
        if by_worker:
            self.offer(s)
        else:
            s.ghosts += 1

    @cdef
    def settle_ghost(self, s: Optional[Sess]) -> None:
        """Worker s answered or failed a job that had ended without it: free that credit."""
        if s is not None and s.ghosts:
            s.ghosts -= 1
            self.offer(s)

    @cdef
    def send_env(self, env: list, command: bytes, body: Optional[list] = None, v2: bool = False) -> int:
        """Send env, the signature (FBW02 if v2), a command and the body, if any, to a
        worker. Returns 0, or 1 if the worker is unreachable (gone: ROUTER_MANDATORY,
        or not reading); raises on ETERM."""
        signature = WORKER_SIGNATURE_V2 if v2 else WORKER_SIGNATURE
        try:
            self.s_workers.send_multipart(env + [signature, command] + (body or []), zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM:
                raise
            return 1
        return 0

    @cdef
    def send(self, s: Sess, command: bytes, body: Optional[list] = None) -> int:
        """send_env with session s's envelope, in its protocol."""
        return self.send_env(s.env, command, body, s.v2)
