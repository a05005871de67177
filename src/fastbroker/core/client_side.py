"""core/client_side.py: ClientSide, the FBC01 client protocol (twin of
core/client_side.pxi).

Owns: nothing of its own: it handles FBC01 messages with the parts below.
Touches: RequestTable (new requests), RequestIds (id -> request or outcome),
KeptOutcomes (keep, replies, the dead-letter), Journal (submit, finish, held replies), JobQueue
(queue, limit, defaults), WorkerSessions (CANCEL to the worker), DeadlineHeap
(cancel), Counters; the requests socket (replies).

Docs: docs/PROTOCOL.md section 10.
"""

from __future__ import annotations

from typing import List, Optional, Union

import zmq

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.clock import Clock, monotonic
from fastbroker.core.counters import Counters
from fastbroker.core.deadline_heap import DeadlineHeap
from fastbroker.core.idle_workers import IdleWorkers
from fastbroker.core.job_queue import JobQueue
from fastbroker.core.journal import Journal
from fastbroker.core.kept_outcomes import Done, KeptOutcomes
from fastbroker.core.reply_batches import ReplyBatches
from fastbroker.core.request_ids import RequestIds
from fastbroker.core.request_table import QUEUED, Req, RequestTable
from fastbroker.core.worker_sessions import WorkerSessions
from fastbroker.protocol import (
    C_CANCEL,
    C_DEAD,
    C_REQUEUE,
    C_REQUEUE_ALL,
    C_RESULT,
    C_STATS,
    C_STATUS,
    C_SUBMIT,
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    CMD_CANCEL,
    R_ACCEPTED,
    R_CANCELLED,
    R_DEAD,
    R_FAILED,
    R_REJECTED,
    R_REPLIES,
    R_REQUEUED,
    R_STATS,
    R_STATUS,
    R_TIMED_OUT,
    R_UNKNOWN,
)

_COMMANDS = frozenset((C_SUBMIT, C_STATUS, C_RESULT, C_CANCEL, C_STATS, C_DEAD, C_REQUEUE, C_REQUEUE_ALL))
_DEAD_CODES = (R_FAILED, R_TIMED_OUT)  # the outcomes of a request given up: dead
_STATS_NAMES = ",".join(protocol.stats_fields()).encode("ascii")


class ClientSide:
    """FBC01 messages on the requests endpoint: [identity, FBC01, command, id, ...]."""

    __slots__ = (
        "table",
        "ids",
        "kept",
        "journal",
        "queue",
        "sessions",
        "idle",
        "heap",
        "counters",
        "clock",
        "s_requests",
        "batches",
    )

    def __init__(
        self,
        table: RequestTable,
        ids: RequestIds,
        kept: KeptOutcomes,
        journal: Journal,
        queue: JobQueue,
        sessions: WorkerSessions,
        idle: IdleWorkers,
        heap: DeadlineHeap,
        counters: Counters,
        clock: Clock,
        requests: zmq.Socket,
    ) -> None:
        self.table = table
        self.ids = ids
        self.kept = kept
        self.journal = journal
        self.queue = queue
        self.sessions = sessions
        self.idle = idle
        self.heap = heap
        self.counters = counters
        self.clock = clock
        self.s_requests = requests
        self.batches = ReplyBatches()  # its own: the FBC02 replies of the current turn

    @cdef
    def on_client(self, m: list) -> None:
        """An FBC01 message m (its signature checked)."""
        if len(m) < 3 or len(m[2]) != 1:
            self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        command = m[2].bytes
        if command not in _COMMANDS:
            self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        if len(m) < 4 or len(m[3]) != protocol.REQUEST_ID_SIZE:
            self.counters.drop(protocol.DROP_CLIENT_BAD_ID)
            return
        cid = m[3].bytes
        if command == C_SUBMIT:
            self.submit(m, cid)
            return
        if command == C_DEAD:
            if len(m) != 5 or len(m[4]) != 4:
                self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
                return
            self.reply_dead(m, cid, int.from_bytes(m[4].bytes, "big"))
            return
        if len(m) != 4:
            self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        if command == C_STATS:
            self.reply_stats(m, cid)
            return
        if command == C_REQUEUE_ALL:
            self.requeue_all(m, cid)
            return
        v = self.ids.entry(cid)
        if v is None:
            self.reply(m[0].bytes, R_UNKNOWN, cid)
            return
        if command == C_STATUS:
            self.reply_status(m, cid, v)
            return
        if command == C_REQUEUE:
            self.requeue(m, cid, v)
            return
        if type(v) is Done:
            # RESULT, or CANCEL of a finished request: its outcome.
            self.reply_outcome(m[0].bytes, v)
            return
        if command == C_CANCEL:
            self.cancel(m, v)
            return
        self.add_waiter(v, m[0].bytes, False)
        self.reply_status(m, cid, v)

    @cdef
    def submit(self, m: list, cid: bytes) -> None:
        """FBC01 SUBMIT: [identity, FBC01, SUBMIT, id, options, payload frames...]."""
        if len(m) < 6:
            self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        options = m[4].bytes
        flags = timeout_ms = tries = 0
        if len(options) == protocol.OPTIONS_SIZE:
            flags = options[0]
            timeout_ms = int.from_bytes(options[1:5], "big")
            tries = int.from_bytes(options[5:9], "big")
        elif options:
            flags = 0xFF  # neither empty nor 9 bytes: bad options
        self.submit_job(m[0].bytes, False, cid, flags, timeout_ms, tries, m[5:])

    @cdef
    def on_batch(self, m: list) -> None:
        """FBC02 SUBMIT: [identity, FBC02, SUBMIT, header, payload frames...]; the header
        is one SUBMIT_RECORD_SIZE record per request. A header that does not match the
        frames drops the whole message; a request with bad options is REJECTED alone."""
        if len(m) < 4 or m[2].bytes != C_SUBMIT:
            self.counters.drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        h = m[3].bytes
        size = protocol.SUBMIT_RECORD_SIZE
        count = len(h) // size
        if not h or len(h) % size or count > protocol.MAX_BATCH:
            self.counters.drop(protocol.DROP_CLIENT_BAD_BATCH)
            return
        nframes = [int.from_bytes(h[j * size + 25 : j * size + 27], "big") for j in range(count)]
        if 0 in nframes or sum(nframes) != len(m) - 4:
            self.counters.drop(protocol.DROP_CLIENT_BAD_BATCH)
            return
        identity = m[0].bytes
        at = 4
        for j, nf in enumerate(nframes):
            rec = h[j * size : (j + 1) * size]
            flags, timeout_ms, tries = rec[16], int.from_bytes(rec[17:21], "big"), int.from_bytes(rec[21:25], "big")
            self.submit_job(identity, True, rec[:16], flags, timeout_ms, tries, m[at : at + nf])
            at += nf

    @cdef
    def submit_job(
        self, me: bytes, v2: bool, cid: bytes, flags: int, timeout_ms: int, tries: int, payload: list
    ) -> None:
        """One request from client `me` (FBC01, or one record of an FBC02 batch): queued,
        or a duplicate, or REJECTED."""
        if flags & ~protocol.OPT_KNOWN_FLAGS or timeout_ms > protocol.MAX_REQUEST_TIMEOUT_MS:
            self.reject(me, v2, cid, protocol.REJECT_BAD_OPTIONS)
            return
        ack = not flags & protocol.OPT_NO_ACK
        v = self.ids.entry(cid)
        if v is not None:
            # The same id again: it runs once; this sender is told the outcome too.
            self.counters.add("duplicates")
            done = type(v) is Done
            if not done:
                self.add_waiter(v, me, v2)
            if ack:
                self.to_client(me, v2, R_ACCEPTED, cid)
            if done:
                self.to_client(me, v2, v.code, cid, v.body)
            return
        queue = self.queue
        if queue.full():
            self.reject(me, v2, cid, protocol.REJECT_QUEUE_FULL)
            return
        if tries == 0:
            tries_left = queue.tries
        else:
            tries_left = min(tries, protocol.MAX_REQUEST_TRIES)
        r = self.table.alloc([], payload, tries_left)
        r.timeout = queue.timeout if timeout_ms == 0 else timeout_ms / 1000.0
        r.arrived = monotonic()
        r.cid = cid
        r.waiters.append(me)
        r.v2_waiters = 1 if v2 else 0
        queue.push(r)
        self.ids.add(cid, r)
        queue.count += 1
        self.counters.add("requests")
        if self.journal.on:
            self.journal.push(("submit", cid, [f.bytes for f in payload], r.timeout, tries_left))
        if ack:
            self.to_client(me, v2, R_ACCEPTED, cid)

    @cdef
    def reject(self, me: bytes, v2: bool, cid: bytes, reason: int) -> None:
        """REJECTED for `reason` (a protocol.REJECT_* code) to client `me`."""
        self.counters.add("rejected")
        self.to_client(me, v2, R_REJECTED, cid, [bytes([reason]), protocol.REJECT_REASONS[reason].encode()])

    @cdef
    def is_waiter(self, r: Req, me: bytes) -> bool:
        """Whether identity `me` is one of r's waiters."""
        return me in r.waiters

    @cdef
    def add_waiter(self, r: Req, me: bytes, v2: bool) -> None:
        """Make identity `me` (speaking FBC02 if v2) one of r's waiters (on a full list
        the oldest gives way). One that is already keeps the protocol it had."""
        if self.is_waiter(r, me):
            return
        if v2:
            r.v2_waiters |= 1 << len(r.waiters)
        r.waiters.append(me)
        if len(r.waiters) > protocol.MAX_WAITERS:
            del r.waiters[0]
            r.v2_waiters >>= 1

    @cdef
    def reply(self, identity: bytes, code: bytes, cid: bytes, body: Optional[list] = None) -> None:
        """Send [identity, FBC01, code, id, body...] to a client."""
        self.emit([identity, CLIENT_SIGNATURE, code, cid] + (body or []))

    @cdef
    def emit(self, message: list) -> None:
        """Send a reply, or, with the journal on, hold it until release_held(). A
        client that is gone or not reading loses it, counted (ROUTER_MANDATORY makes
        the first frame fail)."""
        if self.journal.on:
            self.journal.hold(message)
            return
        try:
            self.s_requests.send_multipart(message, zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if self.counters.reply_lost(exc.errno) < 0:
                raise

    @cdef
    def to_client(self, identity: bytes, v2: int, code: bytes, cid: bytes, body: Optional[list] = None) -> None:
        """A reply about request cid to a client: an FBC01 message now, or a record of
        this turn's REPLIES batch to an FBC02 client (sent by flush_batches)."""
        if not v2:
            self.reply(identity, code, cid, body)
            return
        frames = body or []
        i = self.batches.find(identity)
        if self.batches.full(i, len(frames)):
            self.flush_batch(i)
        self.batches.add(i, code, cid, frames)

    @cdef
    def flush_batch(self, i: int) -> None:
        """Send batch i as [identity, FBC02, REPLIES, header, body frames...] and empty it."""
        b = self.batches.b[i]
        if b.count:
            self.emit([b.identity, CLIENT_SIGNATURE_V2, R_REPLIES, bytes(b.head), *b.body])
        self.batches.reset(i)

    @cdef
    def flush_batches(self) -> None:
        """Send every FBC02 client its replies of this turn (called at the start of each
        loop turn, so no reply waits longer than the turn that made it)."""
        for i in range(len(self.batches.b)):
            self.flush_batch(i)
        self.batches.clear()

    @cdef
    def reply_outcome(self, identity: bytes, d: Done) -> None:
        """The kept outcome d to a client."""
        self.reply(identity, d.code, d.cid, d.body)

    @cdef
    def reply_stats(self, m: list, cid: bytes) -> None:
        """STATS: the counters and gauges, in the order of protocol.stats_fields()."""
        counters = self.counters
        counts = counters.counts
        queued = self.queue.count
        values: List[int] = [counts[k] for k in protocol.COUNTERS]
        values += [
            queued,
            len(self.table) - queued,
            len(self.idle),
            len(self.sessions.sess),
            self.kept.count,
            self.kept.retained_bytes,
            self.kept.dead,
        ]
        values += counters.latency_counts
        values += [sum(counters.latency_counts), int(counters.latency_sum * 1e6)]
        self.reply(m[0].bytes, R_STATS, cid, [_STATS_NAMES, b"".join(v.to_bytes(8, "big") for v in values)])

    @cdef
    def reply_status(self, m: list, cid: bytes, v: Union[Req, Done]) -> None:
        """STATUS of v (a request or a kept outcome) to the sender of m."""
        if type(v) is Req:
            state = protocol.STATE_QUEUED if v.state == QUEUED else protocol.STATE_RUNNING
        else:
            state = protocol.STATE_DONE
        self.reply(
            m[0].bytes,
            R_STATUS,
            cid,
            [bytes([state]), v.attempts.to_bytes(4, "big"), max(v.tries, 0).to_bytes(4, "big")],
        )

    @cdef
    def cancel(self, m: list, r: Req) -> None:
        """The sender of m cancelled request r."""
        if r.state == QUEUED:
            # Its queue entry turns into a tombstone when it is released.
            self.queue.count -= 1
        else:
            self.heap.delete(r)
            s = r.worker
            if s is not None:
                # Tell its FBW01 worker, which may abandon the job; the credit stays
                # taken (a ghost) until the worker answers or fails it.
                self.sessions.send(s, CMD_CANCEL, [r.task_id])
            self.sessions.detach(r, False)
        self.counters.add("cancelled")
        self.conclude(r, R_CANCELLED, [])
        # Not made a waiter: on a full list it would push out a submitter.
        identity = m[0].bytes
        if not self.is_waiter(r, identity):
            self.reply(identity, R_CANCELLED, m[3].bytes)
        self.table.release(r)

    @cdef
    def conclude(self, r: Req, code: bytes, body: list) -> None:
        """Tell every waiter of a finished FBC01 request its outcome, and keep the
        outcome for RESULT (the caller releases the request)."""
        cid = r.cid
        assert cid is not None
        for w, identity in enumerate(r.waiters):
            self.to_client(identity, r.v2_waiters & (1 << w), code, cid, body)
        # A request given up keeps its payload: dead, until REQUEUE or retention.
        payload = [bytes(f) for f in r.payload] if code in _DEAD_CODES else None
        if self.journal.on:
            self.journal.push_finish(cid, code, [bytes(f) for f in body], payload or [], r.attempts, r.tries, r.timeout)
        self.kept.keep(cid, code, body, payload, r.attempts, r.tries, r.timeout, monotonic())

    # -- the dead-letter ----------------------------------------------------------

    @cdef
    def reply_dead(self, m: list, cid: bytes, limit: int) -> None:
        """DEAD: how many dead requests are kept, and the oldest `limit` of them (at
        most MAX_DEAD_LIST): a record each, then its error's type and message."""
        found = self.kept.dead_list(min(limit, protocol.MAX_DEAD_LIST))
        now = monotonic()
        head = bytearray()
        errors: List[bytes] = []
        for o in found:
            payload: List[bytes] = o.payload or []
            age_ms = min(int((now - o.finished) * 1000), 0xFFFFFFFF)
            size = min(sum(len(f) for f in payload), 0xFFFFFFFF)
            head += o.cid + o.code
            head += o.attempts.to_bytes(4, "big") + max(o.tries, 0).to_bytes(4, "big")
            head += max(age_ms, 0).to_bytes(4, "big") + size.to_bytes(4, "big") + len(payload).to_bytes(2, "big")
            errors += o.body if o.code == R_FAILED else [b"", b""]
        self.reply(m[0].bytes, R_DEAD, cid, [self.kept.dead.to_bytes(4, "big"), bytes(head)] + errors)

    @cdef
    def requeue(self, m: list, cid: bytes, v: Union[Req, Done]) -> None:
        """REQUEUE of a known id: REQUEUED if it was dead and is queued again,
        REJECTED if the queue is full, else its STATUS (it is not dead)."""
        if type(v) is not Done or v.payload is None:
            self.reply_status(m, cid, v)
            return
        if self.queue.full():
            self.reject(m[0].bytes, False, cid, protocol.REJECT_QUEUE_FULL)
            return
        self.requeue_dead(v)
        self.reply_requeued(m, cid, 1)

    @cdef
    def requeue_all(self, m: list, cid: bytes) -> None:
        """REQUEUE_ALL: every dead request queued again, oldest first, while the
        queue has room; REQUEUED says how many, and how many are still dead."""
        done = 0
        for o in self.kept.dead_list(self.kept.dead):
            if self.queue.full():
                break
            self.requeue_dead(o)
            done += 1
        self.reply_requeued(m, cid, done)

    @cdef
    def reply_requeued(self, m: list, cid: bytes, count: int) -> None:
        self.reply(m[0].bytes, R_REQUEUED, cid, [count.to_bytes(4, "big"), self.kept.dead.to_bytes(4, "big")])

    @cdef
    def requeue_dead(self, o: Done) -> None:
        """Queue dead request o again, behind those queued, as new: every try anew, no
        waiters (a client sends RESULT for its outcome)."""
        payload = o.payload
        assert payload is not None
        tries = o.tries if o.tries != 0 else self.queue.tries
        self.kept.withdraw(o)
        r = self.table.alloc([], payload, tries)
        r.timeout = o.timeout
        r.arrived = monotonic()
        r.cid = o.cid
        self.queue.push(r)
        self.ids.add(o.cid, r)
        self.queue.count += 1
        self.counters.add("dead_requeued")
        if self.journal.on:
            self.journal.push(("submit", o.cid, payload, r.timeout, tries))

    @cdef
    def restore(self, cid: bytes, payload: List[bytes], timeout: Optional[float], tries: int, attempts: int) -> None:
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        if len(cid) != protocol.REQUEST_ID_SIZE or not payload:
            raise ValueError("a request needs a 16-byte id and a payload")
        if self.ids.entry(cid) is not None:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        tries_left = -1 if tries < 0 else max(tries - attempts, 0)
        if tries_left == 0:
            raise ValueError(f"request {cid.hex()} has no tries left")
        r = self.table.alloc([], list(payload), tries_left)
        r.timeout = timeout
        r.arrived = monotonic()
        r.cid = cid
        r.tries = tries
        r.attempts = attempts
        self.queue.push(r)
        self.ids.add(cid, r)
        self.queue.count += 1
