"""core/worker_side.py: WorkerSide, the messages of REQ and FBW01 workers, their
liveness, and dispatch (twin of core/worker_side.pxi).

Owns: nothing of its own.
Touches: WorkerSessions, IdleWorkers, RequestTable (find), DeadlineHeap (deadlines
of attempts), JobQueue (what to send next), Attempts (answers, retries), Journal
(start), Counters, Events; the workers socket (REQ workers' jobs).

Docs: docs/PROTOCOL.md (FBW01).
"""

from __future__ import annotations

from typing import Optional

import zmq

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.attempts import Attempts
from fastbroker.core.counters import Counters
from fastbroker.core.deadline_heap import DeadlineHeap
from fastbroker.core.events import EV_WORKER_DEAD, EV_WORKER_JOINED, EV_WORKER_LEFT, Events
from fastbroker.core.frames import find_delimiter
from fastbroker.core.idle_workers import IdleWorkers
from fastbroker.core.job_queue import JobQueue
from fastbroker.core.journal import Journal
from fastbroker.core.request_table import RUNNING, RequestTable
from fastbroker.core.worker_sessions import Sess, WorkerSessions
from fastbroker.protocol import (
    CMD_ANSWER,
    CMD_DISCONNECT,
    CMD_EXTEND,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_TASK,
    MAX_CREDIT,
    WORKER_SIGNATURE,
)

_COMMANDS = frozenset((CMD_READY, CMD_ANSWER, CMD_FAILED, CMD_HEARTBEAT, CMD_DISCONNECT, CMD_EXTEND))


class WorkerSide:
    """Messages on the workers endpoint, worker liveness, and dispatch."""

    __slots__ = (
        "sessions",
        "idle",
        "table",
        "heap",
        "queue",
        "attempts",
        "journal",
        "counters",
        "events",
        "s_workers",
        "max_extend",
    )

    def __init__(
        self,
        sessions: WorkerSessions,
        idle: IdleWorkers,
        table: RequestTable,
        heap: DeadlineHeap,
        queue: JobQueue,
        attempts: Attempts,
        journal: Journal,
        counters: Counters,
        events: Events,
        workers: zmq.Socket,
        max_extend: float,
    ) -> None:
        self.sessions = sessions
        self.idle = idle
        self.table = table
        self.heap = heap
        self.queue = queue
        self.attempts = attempts
        self.journal = journal
        self.counters = counters
        self.events = events
        self.s_workers = workers
        self.max_extend = max_extend  # seconds: the most one EXTEND moves a deadline from now

    @cdef
    def on_ready(self, m: list) -> None:
        """A message on the workers endpoint: an original REQ worker's ready, or FBW01."""
        d = find_delimiter(m)
        if d < 1:
            self.counters.drop(protocol.DROP_READY_NO_DELIMITER)
            return
        nb = len(m) - d - 1
        if nb == 1:
            # The same length-prefixed address key as the compiled core, so both treat
            # a second "ready" from one address alike.
            self.idle.push_env(m[: d + 1])
            self.counters.add("ready")
            return
        if nb == 0 or m[d + 1].bytes != WORKER_SIGNATURE:
            self.counters.drop(protocol.DROP_READY_BAD_FRAMES)
            return
        command = m[d + 2].bytes
        if command not in _COMMANDS:
            self.counters.drop(protocol.DROP_WORKER_BAD_COMMAND)
            return
        sessions = self.sessions
        sessions.set_key(m, d)
        s = sessions.find()
        if s is not None:
            sessions.touch(s)
        if command == CMD_READY:
            self.worker_ready(m, s, d, nb)
            return
        if command == CMD_ANSWER:
            if nb < 4:
                self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
                return
            # Accepted even from a worker the broker has forgotten: the job may
            # still be waiting for it. That worker is told to register again.
            self.attempts.answer(m[d + 3].bytes, m[d + 4 :], s)
            if s is None:
                sessions.send_env(m[: d + 1], CMD_DISCONNECT)
            return
        if command == CMD_EXTEND:
            self.worker_extend(m, s, d, nb)
            return
        if nb != (5 if command == CMD_FAILED else 2):
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if command == CMD_DISCONNECT:
            if s is not None:
                self.counters.add("workers_left")
                self.worker_event(EV_WORKER_LEFT, s)
                self.forget(s)
            return
        if s is None:
            # HEARTBEAT or FAILED from a worker this broker does not know (it was
            # restarted, or took the worker for dead): make it register again.
            sessions.send_env(m[: d + 1], CMD_DISCONNECT)
        if command == CMD_FAILED:
            self.worker_failed(m, s, d)

    @cdef
    def worker_ready(self, m: list, s: Optional[Sess], d: int, nb: int) -> None:
        """READY [credit] from the worker at m[0:d] (session s, or None: a new one)."""
        if nb != 3 or len(m[d + 3]) != 4:
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        credit = int.from_bytes(m[d + 3].bytes, "big")
        if credit > MAX_CREDIT:
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if s is None:
            s = self.sessions.add(m, d)
            self.counters.add("workers_joined")
            self.worker_event(EV_WORKER_JOINED, s)
        s.credit = credit
        self.counters.add("ready")
        self.sessions.offer(s)

    @cdef
    def worker_failed(self, m: list, s: Optional[Sess], d: int) -> None:
        """FAILED [task id, exception type, message] from the worker at m[0:d]."""
        if len(m[d + 3]) != protocol.TASK_ID_SIZE:
            self.counters.drop(protocol.DROP_ANSWER_BAD_ID)
            return
        r = self.table.find(m[d + 3].bytes)
        if r is None or s is None or r.worker is not s:
            # Not the attempt in progress (answered, timed out, or another worker's).
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            self.sessions.settle_ghost(s)
            return
        self.counters.add("failed")
        self.heap.delete(r)
        self.sessions.detach(r)
        r.failed_on = s
        if r.cid is not None:
            r.fail = m[d + 4 : d + 6]
        self.attempts.retry_or_abort(r)

    @cdef
    def worker_extend(self, m: list, s: Optional[Sess], d: int, nb: int) -> None:
        """EXTEND [task id, ms]: the job is alive; its attempt's deadline becomes now plus
        ms, at most max_extend (an attempt without a deadline keeps none)."""
        if nb != 4 or len(m[d + 3]) != protocol.TASK_ID_SIZE or len(m[d + 4]) != 4:
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if s is None:
            # From a worker this broker does not know: it must register again.
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            self.sessions.send_env(m[: d + 1], CMD_DISCONNECT)
            return
        r = self.table.find(m[d + 3].bytes)
        if r is None or r.worker is not s:
            # Not the attempt in progress here (answered, timed out, or another worker's).
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            return
        self.counters.add("extended")
        if r.timeout is not None:
            seconds = int.from_bytes(m[d + 4].bytes, "big") / 1000.0
            self.heap.insert(r, self.sessions.clock.now + min(seconds, self.max_extend))

    @cdef
    def worker_event(self, kind: int, s: Sess) -> None:
        """An event about worker s; its data is the worker's identity."""
        self.events.push(kind, s.env[0].bytes)

    # -- liveness -----------------------------------------------------------------

    @cdef
    def forget(self, s: Sess, requeue: bool = True) -> None:
        """The worker is gone: its jobs go back to the front of the queue at once
        (unless the broker is closing: requeue=False leaves them to their fate)."""
        sessions = self.sessions
        s.credit = 0  # so detaching its jobs does not offer it again
        sessions.offer(s)
        # Oldest first, so the jobs keep the order in which they were sent.
        for r in list(s.jobs.values()):
            sessions.detach(r)
            if requeue:
                self.heap.delete(r)
                self.counters.add("requeued")
                self.attempts.retry_or_abort(r)
        sessions.release(s)

    @cdef
    def tick(self, now: float) -> None:
        """Forget workers silent past liveness, at the moment the earliest one may
        be; heartbeat the others every interval. Expiries only move later, so the
        earliest one seen in a scan is when the next scan is due."""
        sessions = self.sessions
        beat = now >= sessions.next_tick
        if beat:
            sessions.next_tick = now + sessions.heartbeat
        earliest = now + sessions.heartbeat * sessions.liveness
        for s in list(sessions.sess.values()):
            if now >= s.expiry:
                self.counters.add("workers_dead")
                self.worker_event(EV_WORKER_DEAD, s)
                self.forget(s)
            else:
                earliest = min(earliest, s.expiry)
                if beat:
                    sessions.send(s, CMD_HEARTBEAT)
        sessions.next_check = earliest

    @cdef
    def disconnect_all(self) -> int:
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        sessions = self.sessions
        every = list(sessions.sess.values())
        for s in every:
            sessions.send(s, CMD_DISCONNECT)
            # Closing: a job on its last try must not be reported as aborted.
            self.forget(s, requeue=False)
        return len(every)

    # -- dispatch -----------------------------------------------------------------

    @cdef
    def dispatch(self, now: float) -> None:
        """Send queued jobs to idle workers, oldest first, while both last."""
        idle = self.idle
        workers = idle.workers
        queue = self.queue
        sessions = self.sessions
        counters = self.counters
        while workers:
            q = queue.next()
            if q is None:
                return
            r = q[0]
            w = idle.pop_slot()
            if r.failed_on is not None and w is r.failed_on and workers:
                # Retry a failed job on another worker when one is idle.
                w2 = idle.pop_slot()
                sessions.offer(w)
                w = w2
            if type(w) is Sess:
                s = w
                # ROUTER_MANDATORY makes the send fail for a worker that is gone;
                # the job then stays at the front for the next idle worker.
                if sessions.send(s, CMD_TASK, [r.task_id] + r.payload):
                    counters.add("unreachable_workers")
                    counters.add("workers_dead")
                    self.worker_event(EV_WORKER_DEAD, s)
                    self.forget(s)
                    continue
            else:
                s = None
                try:
                    self.s_workers.send_multipart(w + [r.task_id] + r.payload, zmq.DONTWAIT, copy=False)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.ETERM:
                        raise
                    counters.add("unreachable_workers")
                    continue
            q.popleft()
            queue.count -= 1
            r.state = RUNNING
            r.attempts += 1
            if self.journal.on and r.cid is not None:
                self.journal.push(("start", r.cid, r.attempts))
            r.failed_on = None
            if r.tries_left > 0:
                r.tries_left -= 1
            if r.timeout is not None:
                self.heap.insert(r, now + r.timeout)
            if s is not None:
                sessions.attach(r, s)
                sessions.offer(s)
            counters.add("dispatched")
