"""core/broker_core.py: BrokerCore, which composes the parts and runs the loop (twin
of core/broker_core.pxi).

Owns: the three sockets, and the parts (in the order they are made, each given the
ones above it): Clock, Counters, Events, Journal, RequestTable, IdleWorkers,
DeadlineHeap, RequestIds, JobQueue, WorkerSessions, KeptOutcomes, ClientSide,
Attempts, WorkerSide.
Touches: every part, through its methods; REQ clients' messages itself (the
original protocol's requests, the empty answer of a full queue) and PUSH answers.

Compiled only (absent here): __dealloc__ (memory), and BrokerCore's scratch array of
received frames (each message is a list of zmq.Frame objects here).
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Dict, List, Optional

import zmq

from fastbroker import protocol
from fastbroker._common import (
    check_count,
    check_heartbeat,
    check_max_extend,
    check_max_queue,
    check_retention,
    check_retention_bytes,
    check_timeout,
    check_tries,
)
from fastbroker.core import cdef
from fastbroker.core.attempts import Attempts
from fastbroker.core.client_side import ClientSide
from fastbroker.core.clock import Clock, monotonic
from fastbroker.core.counters import Counters
from fastbroker.core.deadline_heap import DeadlineHeap
from fastbroker.core.events import Event, Events
from fastbroker.core.frames import find_delimiter
from fastbroker.core.idle_workers import IdleWorkers
from fastbroker.core.job_queue import JobQueue
from fastbroker.core.journal import Journal
from fastbroker.core.kept_outcomes import KeptOutcomes
from fastbroker.core.request_ids import RequestIds
from fastbroker.core.request_table import RequestTable
from fastbroker.core.worker_sessions import WorkerSessions
from fastbroker.core.worker_side import WorkerSide
from fastbroker.protocol import (
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    DEFAULT_MAX_EXTEND,
    DEFAULT_RETENTION,
    DEFAULT_RETENTION_BYTES,
    MAX_LIVENESS,
    MIN_LIVENESS,
    SIGNATURE_SIZE,
)

_MAX_POLL_MS = 3_600_000


class BrokerCore:
    """Routes requests to workers that asked, with per-attempt deadlines and tries.

    ``run()`` polls the three sockets and a wake fd; it returns when the fd is
    readable, a signal interrupts the poll, ``max_wait`` seconds pass, or (with
    ``stop_on_drop``) a message was dropped.
    """

    __slots__ = (
        "_sockets",
        "s_requests",
        "s_workers",
        "s_answers",
        "closed",
        "clock",
        "counters",
        "event_queue",
        "store_journal",
        "table",
        "idle",
        "heap",
        "ids",
        "queue",
        "sessions",
        "kept",
        "client_side",
        "attempts",
        "worker_side",
    )

    def __init__(
        self,
        requests: zmq.Socket,
        workers: zmq.Socket,
        answers: zmq.Socket,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        liveness: int = DEFAULT_LIVENESS,
        epoch: Optional[bytes] = None,
        retention: float = DEFAULT_RETENTION,
        retention_bytes: int = DEFAULT_RETENTION_BYTES,
        max_queue: Optional[int] = None,
        max_extend: float = DEFAULT_MAX_EXTEND,
    ) -> None:
        max_queue = check_max_queue(max_queue)
        max_extend = check_max_extend(max_extend)
        retention = check_retention(retention)
        retention_bytes = check_retention_bytes(retention_bytes)
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        heartbeat = check_heartbeat(heartbeat)
        liveness = check_count("liveness", liveness, MIN_LIVENESS, MAX_LIVENESS)
        self._sockets = (requests, workers, answers)
        self.s_requests = requests
        self.s_workers = workers
        self.s_answers = answers
        self.table = RequestTable(epoch)
        self.clock = Clock()
        self.counters = Counters()
        self.event_queue = Events(self.counters)
        self.store_journal = Journal()
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        self.ids = RequestIds()
        self.queue = JobQueue(self.table, timeout, tries, max_queue)
        self.sessions = WorkerSessions(self.table, self.idle, self.clock, workers, heartbeat, liveness)
        self.kept = KeptOutcomes(self.ids, self.store_journal, self.counters, retention, retention_bytes)
        self.client_side = ClientSide(
            self.table,
            self.ids,
            self.kept,
            self.store_journal,
            self.queue,
            self.sessions,
            self.idle,
            self.heap,
            self.counters,
            self.clock,
            requests,
        )
        self.attempts = Attempts(
            self.table,
            self.heap,
            self.queue,
            self.sessions,
            self.client_side,
            self.counters,
            self.event_queue,
            self.clock,
            requests,
        )
        self.worker_side = WorkerSide(
            self.sessions,
            self.idle,
            self.table,
            self.heap,
            self.queue,
            self.attempts,
            self.store_journal,
            self.counters,
            self.event_queue,
            workers,
            max_extend,
        )
        self.closed = False

    def disconnect_workers(self) -> int:
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        if self.closed:
            return 0
        return self.worker_side.disconnect_all()

    def probe_workers(self) -> int:
        """HEARTBEAT every DEALER worker now and forget, at once, those whose connection
        is gone (their jobs go back to the queue); returns how many. The Broker calls it
        when the workers socket reports a disconnection."""
        if self.closed:
            return 0
        return self.worker_side.probe()

    def close(self) -> None:
        """Release every message the core holds (queued jobs, idle workers)."""
        self.closed = True
        self.sessions.release_all()
        self.kept.release_all()
        self.ids.clear()
        self.client_side.batches.clear()
        self.store_journal.clear()
        self.store_journal.drop_held()
        self.table.clear()
        self.idle.clear()
        self.heap.clear()
        self.queue.clear()

    @property
    def timeout(self) -> Optional[float]:
        return self.queue.timeout

    @property
    def tries(self) -> Optional[int]:
        return None if self.queue.tries < 0 else self.queue.tries

    @property
    def heartbeat(self) -> float:
        return self.sessions.heartbeat

    @property
    def max_queue(self) -> Optional[int]:
        return self.queue.limit

    @property
    def max_extend(self) -> float:
        return self.worker_side.max_extend

    @property
    def liveness(self) -> int:
        return self.sessions.liveness

    @property
    def last_drop(self) -> Optional[str]:
        """Reason text of the latest dropped message, or None."""
        reason = self.counters.last_drop
        return None if reason < 0 else protocol.DROP_REASONS[reason]

    def stats(self) -> Dict[str, Any]:
        """Counters since start and current gauges, as a dict of ints."""
        result: Dict[str, Any] = self.counters.counts_dict()
        queued = self.queue.count
        result["queued"] = queued
        result["running"] = len(self.table) - queued
        result["idle_workers"] = len(self.idle)
        result["workers"] = len(self.sessions.sess)
        result["retained"] = self.kept.count
        result["retained_bytes"] = self.kept.retained_bytes
        result["dead"] = self.kept.dead
        result["drops"] = self.counters.drops_dict()
        result["latency"] = self.counters.latency_dict()
        return result

    def record_events(self, on: bool) -> None:
        """Keep worker and abort events for events() (off: none are kept)."""
        self.event_queue.record(on)

    def events(self) -> List[Event]:
        """Events since the last call, oldest first: (kind, data, n); see protocol.EVENT_KINDS."""
        return self.event_queue.take()

    # -- durable store support (docs/ARCHITECTURE.md, "The store") ---------------

    def journal(self, on: bool) -> None:
        """Journal on: FBC01 changes are recorded for journal_take(), every FBC01 reply
        is held until release_held(), and run() returns RUN_JOURNAL after a turn that
        left either. So nothing is promised to a client before it is stored."""
        self.store_journal.on = bool(on)

    def journal_take(self) -> List[tuple]:
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries,
        payload frames (a dead request's, else []), timeout (s or None)), ("forget", id)."""
        return self.store_journal.take()

    def journal_encode(self, now: float) -> bytes:
        """The changes since the last call as the log store's records
        (fastbroker.log_records), each finish stamped `now` (Unix time): one bytes
        object, b"" if none. MemoryError as journal_take()."""
        return self.store_journal.encode(now)

    def release_held(self) -> int:
        """Send the replies held since the last call; returns how many."""
        return self.store_journal.release(self.s_requests, self.counters)

    def restore_request(
        self, cid: bytes, payload: List[bytes], timeout: Optional[float], tries: int, attempts: int
    ) -> None:
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        self.client_side.restore(cid, payload, timeout, tries, attempts)

    def restore_outcome(
        self,
        cid: bytes,
        code: bytes,
        body: List[bytes],
        attempts: int,
        tries: int,
        age: float,
        payload: Optional[List[bytes]] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first). A
        FAILED or TIMED_OUT outcome given its request's payload is dead: REQUEUE can
        run it again (with `timeout` per attempt)."""
        self.kept.restore(cid, code, body, attempts, tries, age, payload, timeout)

    def run(
        self,
        wake_fd: int = -1,
        max_wait: Optional[float] = None,
        stop_on_drop: bool = False,
        stop_on_event: bool = False,
    ) -> int:
        """Serve until woken; returns one of protocol.RUN_*. Raises zmq.ZMQError on a socket error."""
        if self.closed:
            raise RuntimeError("BrokerCore is closed")
        return self._loop(wake_fd, max_wait, stop_on_drop, stop_on_event)

    # -- loop ---------------------------------------------------------------

    @cdef
    def _loop(self, wake_fd: int, max_wait: Optional[float], stop_on_drop: bool, stop_on_event: bool) -> int:
        requests, workers, answers = self.s_requests, self.s_workers, self.s_answers
        poller = zmq.Poller()
        poller.register(requests, zmq.POLLIN)
        poller.register(workers, zmq.POLLIN)
        poller.register(answers, zmq.POLLIN)
        if wake_fd >= 0:
            poller.register(wake_fd, zmq.POLLIN)
        t_end = None if max_wait is None else monotonic() + max(0.0, max_wait)
        # The parts and handlers a turn uses, bound once per run().
        clock, counters, heap, kept, sessions = self.clock, self.counters, self.heap, self.kept, self.sessions
        journal, event_queue, worker_side = self.store_journal, self.event_queue, self.worker_side
        expire, dispatch, drain = self.attempts.expire, worker_side.dispatch, self._drain
        on_ready, on_answer, on_request = worker_side.on_ready, self._on_answer, self._on_request
        batches, flush_batches = self.client_side.batches, self.client_side.flush_batches
        counters.last_drop = -1
        polled = False
        while True:
            now = clock.now = monotonic()
            expire(now)
            if kept.fifo:
                kept.forget_due(now)
            if sessions.sess and (now >= sessions.next_tick or now >= sessions.next_check):
                worker_side.tick(now)
            dispatch(now)
            # The FBC02 replies of the last turn (and of this one's expiries), before
            # any return: nothing waits in a batch while the loop sleeps.
            if batches.b:
                flush_batches()
            if stop_on_drop and counters.last_drop >= 0:
                return protocol.RUN_DROP
            if stop_on_event and event_queue.queue:
                return protocol.RUN_EVENT
            if journal.on and journal.pending():
                return protocol.RUN_JOURNAL
            # Poll at least once, and act on what was read before returning.
            if polled and t_end is not None and now >= t_end:
                return protocol.RUN_TIMEOUT
            polled = True
            next_t = t_end
            top = heap.peek()
            if top is not None and (next_t is None or top[0] < next_t):
                next_t = top[0]
            if sessions.sess:
                next_t = min(t for t in (next_t, sessions.next_tick, sessions.next_check) if t is not None)
            if kept.fifo:
                first = kept.first_expiry()
                next_t = first if next_t is None else min(next_t, first)
            if next_t is None:
                ms = None
            elif next_t <= now:
                ms = 0
            else:
                # Round up: waking before the deadline would only spin.
                # Capped: zmq_poll takes an int, and a request may wait ~49 days.
                ms = min(int((next_t - now) * 1000.0) + 1, _MAX_POLL_MS)
            try:
                ready = dict(poller.poll(ms))
            except zmq.ZMQError as exc:
                if exc.errno == errno.EINTR:  # (pyzmq has no zmq.EINTR)
                    return protocol.RUN_WOKEN
                raise
            if wake_fd >= 0 and wake_fd in ready:
                return protocol.RUN_WOKEN
            clock.now = monotonic()
            sessions.polls += 1  # a session found gone before now has its messages read
            # Ready messages first, so jobs arriving in the same turn find them.
            if workers in ready:
                drain(workers, on_ready)
            if answers in ready:
                drain(answers, on_answer)
            if requests in ready:
                drain(requests, on_request)

    @cdef
    def _drain(self, sock: zmq.Socket, handle: Callable[[list], None]) -> None:
        """Receive up to RECV_BATCH whole messages from sock and handle each."""
        recv = self._recv
        for _ in range(protocol.RECV_BATCH):
            m = recv(sock)
            if m is None:
                return
            if m:
                handle(m)

    @cdef
    def _recv(self, sock: zmq.Socket) -> Optional[list]:
        """Receive one multipart message: its frames, None if none is waiting, or []
        if it had too many frames to keep (dropped)."""
        try:
            m = sock.recv_multipart(zmq.DONTWAIT, copy=False)
        except zmq.Again:
            return None
        if len(m) > protocol.MAX_FRAMES:
            self.counters.drop(protocol.DROP_TOO_MANY_FRAMES)
            return []
        return m

    @cdef
    def _on_request(self, m: list) -> None:
        """A message on the requests endpoint: FBC01, FBC02, or an original REQ client's request."""
        if len(m) >= 2 and len(m[1]) == SIGNATURE_SIZE:
            signature = m[1].bytes
            if signature == CLIENT_SIGNATURE:
                self.client_side.on_client(m)
                return
            if signature == CLIENT_SIGNATURE_V2:
                self.client_side.on_batch(m)
                return
        d = find_delimiter(m)
        if d < 1:
            self.counters.drop(protocol.DROP_REQUEST_NO_DELIMITER)
            return
        if d == len(m) - 1:
            self.counters.drop(protocol.DROP_REQUEST_NO_PAYLOAD)
            return
        queue = self.queue
        if queue.full():
            # The original protocol's only "no": the empty answer, at once.
            self.counters.add("rejected")
            self._answer_empty(m, d + 1)
            return
        r = self.table.alloc(m[: d + 1], m[d + 1 :], queue.tries)
        r.timeout = queue.timeout
        r.arrived = monotonic()
        queue.push(r)
        queue.count += 1
        self.counters.add("requests")

    @cdef
    def _answer_empty(self, m: list, nenv: int) -> None:
        """Send the empty answer to the REQ client whose envelope is m[0:nenv]."""
        # A client that is gone or not reading loses it (counted: ROUTER_MANDATORY).
        try:
            self.s_requests.send_multipart(m[:nenv] + [b""], zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if self.counters.reply_lost(exc.errno) < 0:
                raise

    @cdef
    def _on_answer(self, m: list) -> None:
        """A PUSH answer: [task id, answer frames...]."""
        if len(m) < 2:
            self.counters.drop(protocol.DROP_ANSWER_TOO_SHORT)
            return
        self.attempts.answer(m[0].bytes, m[1:], None)
