"""core/attempts.py: Attempts, how an attempt ends (answer, expiry) and what follows
(delivery, retry, abort) (twin of core/attempts.pxi).

Owns: nothing of its own.
Touches: RequestTable (find, release), DeadlineHeap, JobQueue (retries, late answers),
WorkerSessions (detach, ghosts), ClientSide (FBC01 outcomes), Counters, Events; the
requests socket (REQ clients' answers).
"""

from __future__ import annotations

from typing import Optional

import zmq

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.client_side import ClientSide
from fastbroker.core.clock import Clock, monotonic
from fastbroker.core.counters import Counters
from fastbroker.core.deadline_heap import DeadlineHeap
from fastbroker.core.events import EV_ABORTED, EV_FAILED, EV_TIMED_OUT, Events
from fastbroker.core.job_queue import JobQueue
from fastbroker.core.request_table import QUEUED, Req, RequestTable
from fastbroker.core.worker_sessions import Sess, WorkerSessions
from fastbroker.protocol import R_FAILED, R_OK, R_TIMED_OUT


class Attempts:
    """The end of attempts: answers, deadlines, retries and aborts."""

    __slots__ = ("table", "heap", "queue", "sessions", "client", "counters", "events", "clock", "s_requests")

    def __init__(
        self,
        table: RequestTable,
        heap: DeadlineHeap,
        queue: JobQueue,
        sessions: WorkerSessions,
        client: ClientSide,
        counters: Counters,
        events: Events,
        clock: Clock,
        requests: zmq.Socket,
    ) -> None:
        self.table = table
        self.heap = heap
        self.queue = queue
        self.sessions = sessions
        self.client = client
        self.counters = counters
        self.events = events
        self.clock = clock
        self.s_requests = requests

    @cdef
    def answer(self, tid: bytes, body: list, from_s: Optional[Sess]) -> None:
        """Deliver the first answer for a task; later ones are dropped. from_s is
        the answering DEALER worker's session, None for a PUSH answer."""
        if len(tid) != protocol.TASK_ID_SIZE:
            self.counters.drop(protocol.DROP_ANSWER_BAD_ID)
            return
        self.answer_id(tid, body, from_s)

    @cdef
    def prefetch_answer(self, tid: bytes) -> None:
        """Compiled: start bringing into the cache the id slot answer_id(tid) will look
        up. Nothing to do with dicts (and WorkerSide here does not call it)."""

    @cdef
    def answer_id(self, tid: bytes, body: list, from_s: Optional[Sess]) -> None:
        """answer() for a task id of TASK_ID_SIZE bytes (an FBW02 ANSWER record's)."""
        r = self.table.find(tid)
        if r is None:
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            self.sessions.settle_ghost(from_s)
            return
        own = from_s is not None and r.worker is from_s
        if not own and from_s is not None:
            self.sessions.settle_ghost(from_s)
        self.deliver(r, body)
        self.counters.record_latency(monotonic() - r.arrived)
        if r.state == QUEUED:
            # Answered by an earlier attempt while waiting for a retry: the queue
            # entry turns into a tombstone when the request is released.
            self.queue.count -= 1
            self.counters.add("late_answers")
        else:
            self.heap.delete(r)
            self.sessions.detach(r, own)
        self.table.release(r)
        self.counters.add("answered")

    @cdef
    def deliver(self, r: Req, body: list) -> None:
        """Send r's envelope then body to its REQ client, or conclude an FBC01 request.
        A client that is gone or not reading loses its answer, as in the original
        broker, but counted: the first frame fails (ROUTER_MANDATORY)."""
        if r.cid is not None:
            self.client.conclude(r, R_OK, body)
            return
        try:
            self.s_requests.send_multipart(r.env + body, zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if self.counters.reply_lost(exc.errno) < 0:
                raise

    @cdef
    def expire(self, now: float) -> None:
        """End the attempts whose deadline is past `now`."""
        heap = self.heap
        while True:
            top = heap.peek()
            if top is None or top[0] > now:
                return
            r = heap.pop_min()
            self.counters.add("timeouts")
            self.sessions.detach(r, by_worker=False)
            self.retry_or_abort(r)

    @cdef
    def retry_or_abort(self, r: Req) -> None:
        """An attempt ended without an answer: queue the job ahead of new requests,
        or, with no tries left, send the client the empty answer."""
        if r.tries_left == 0:
            if r.cid is None:
                self.events.push(EV_ABORTED, r.task_id, r.attempts)
                self.deliver(r, [b""])
            elif r.fail is not None:
                self.events.push(EV_FAILED, r.cid, r.attempts)
                self.client.conclude(r, R_FAILED, r.fail)
            else:
                self.events.push(EV_TIMED_OUT, r.cid, r.attempts)
                self.client.conclude(r, R_TIMED_OUT, [])
            self.table.release(r)
            self.counters.add("aborted")
        else:
            self.queue.requeue(r)
            r.state = QUEUED
            self.queue.count += 1
            self.counters.add("retried")
