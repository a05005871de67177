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
from fastbroker.core.request_table import QUEUED, RUNNING, Req, RequestTable
from fastbroker.core.worker_sessions import Sess, WorkerSessions
from fastbroker.protocol import (
    ANSWER_RECORD_SIZE,
    CMD_ANSWER,
    CMD_DISCONNECT,
    CMD_EXTEND,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_RETURN,
    CMD_TASK,
    MAX_BATCH,
    MAX_CREDIT,
    MAX_FRAMES,
    R_FAILED,
    R_OK,
    WORKER_SIGNATURE,
    WORKER_SIGNATURE_V2,
)

_COMMANDS = frozenset((CMD_READY, CMD_ANSWER, CMD_FAILED, CMD_HEARTBEAT, CMD_DISCONNECT, CMD_EXTEND, CMD_RETURN))


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
        signature = m[d + 1].bytes if nb else b""
        if signature != WORKER_SIGNATURE and signature != WORKER_SIGNATURE_V2:
            self.counters.drop(protocol.DROP_READY_BAD_FRAMES)
            return
        v2 = signature == WORKER_SIGNATURE_V2
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
            self.worker_ready(m, s, d, nb, v2)
            return
        if command == CMD_ANSWER and v2:
            self.worker_answers(m, s, d, nb)
            return
        if command == CMD_ANSWER:
            if nb < 4:
                self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
                return
            # Accepted even from a worker the broker has forgotten: the job may
            # still be waiting for it. That worker is told to register again.
            self.attempts.answer(m[d + 3].bytes, m[d + 4 :], s)
            if s is None:
                sessions.send_env(m[: d + 1], CMD_DISCONNECT, None, v2)
            return
        if command == CMD_EXTEND:
            self.worker_extend(m, s, d, nb, v2)
            return
        if command == CMD_RETURN:
            self.worker_return(m, s, d, nb, v2)
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
            sessions.send_env(m[: d + 1], CMD_DISCONNECT, None, v2)
        if command == CMD_FAILED:
            self.worker_failed(m, s, d)

    @cdef
    def worker_ready(self, m: list, s: Optional[Sess], d: int, nb: int, v2: bool) -> None:
        """READY [credit] from the worker at m[0:d] (session s, or None: a new one); the
        worker speaks the protocol of its last READY (v2: FBW02)."""
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
        s.v2 = v2
        self.counters.add("ready")
        self.sessions.offer(s)

    @cdef
    def worker_failed(self, m: list, s: Optional[Sess], d: int) -> None:
        """FAILED [task id, exception type, message] from the worker at m[0:d]."""
        if len(m[d + 3]) != protocol.TASK_ID_SIZE:
            self.counters.drop(protocol.DROP_ANSWER_BAD_ID)
            return
        self.fail_attempt(m[d + 3].bytes, s, m[d + 4 : d + 6])

    @cdef
    def fail_attempt(self, tid: bytes, s: Optional[Sess], text: list) -> None:
        """Worker s reports the job `tid` failed; text: [exception type, message]."""
        r = self.table.find(tid)
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
            r.fail = text
        self.attempts.retry_or_abort(r)

    @cdef
    def worker_answers(self, m: list, s: Optional[Sess], d: int, nb: int) -> None:
        """FBW02 ANSWER [header, frames...]: one ANSWER_RECORD_SIZE record per outcome.
        A header that does not match the frames drops the whole message; a record with
        an unknown outcome or the wrong frames is dropped alone."""
        header = m[d + 3].bytes if nb >= 3 else b""
        count = len(header) // ANSWER_RECORD_SIZE
        if not header or len(header) % ANSWER_RECORD_SIZE or count > MAX_BATCH:
            self.counters.drop(protocol.DROP_WORKER_BAD_BATCH)
            return
        total = 0
        for j in range(count):
            total += int.from_bytes(header[j * ANSWER_RECORD_SIZE + 17 : j * ANSWER_RECORD_SIZE + 19], "big")
        if total != nb - 3:
            self.counters.drop(protocol.DROP_WORKER_BAD_BATCH)
            return
        at = d + 4
        for j in range(count):
            record = header[j * ANSWER_RECORD_SIZE : (j + 1) * ANSWER_RECORD_SIZE]
            code = record[16:17]
            nf = int.from_bytes(record[17:19], "big")
            if code == R_OK and nf >= 1:
                # Accepted even from a worker the broker has forgotten, as FBW01's ANSWER.
                self.attempts.answer_id(record[:16], m[at : at + nf], s)
            elif code == R_FAILED and nf == 2:
                self.fail_attempt(record[:16], s, m[at : at + 2])
            else:
                self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            at += nf
        if s is None:
            self.sessions.send_env(m[: d + 1], CMD_DISCONNECT, None, True)

    @cdef
    def worker_extend(self, m: list, s: Optional[Sess], d: int, nb: int, v2: bool) -> None:
        """EXTEND [task id, ms]: the job is alive; its attempt's deadline becomes now plus
        ms, at most max_extend (an attempt without a deadline keeps none)."""
        if nb != 4 or len(m[d + 3]) != protocol.TASK_ID_SIZE or len(m[d + 4]) != 4:
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if s is None:
            # From a worker this broker does not know: it must register again.
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            self.sessions.send_env(m[: d + 1], CMD_DISCONNECT, None, v2)
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
    def worker_return(self, m: list, s: Optional[Sess], d: int, nb: int, v2: bool) -> None:
        """RETURN [task id...]: jobs the worker got beyond its credit (two of its brokers
        sent at once) go back to the front of the queue without counting a try, and the
        worker gets nothing more until its next READY (its credit becomes 0, as after
        READY(0): it finishes the jobs it holds)."""
        if nb < 3:
            self.counters.drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if s is None:
            # From a worker this broker does not know: its jobs were put back already.
            self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
            self.sessions.send_env(m[: d + 1], CMD_DISCONNECT, None, v2)
            return
        for frame in m[d + 3 :]:
            if len(frame) != protocol.TASK_ID_SIZE:
                self.counters.drop(protocol.DROP_ANSWER_BAD_ID)
                continue
            r = self.table.find(frame.bytes)
            if r is None or r.worker is not s:
                # Not running here (timed out meanwhile, cancelled, or another worker's).
                self.counters.drop(protocol.DROP_ANSWER_UNKNOWN)
                self.sessions.settle_ghost(s)
                continue
            self.heap.delete(r)
            self.sessions.detach(r)
            # As if never sent: the try is not counted.
            r.attempts -= 1
            if r.tries_left >= 0:
                r.tries_left += 1
            if self.journal.on and r.cid is not None:
                self.journal.push(("start", r.cid, r.attempts))
            self.queue.requeue(r)
            r.state = QUEUED
            self.queue.count += 1
            self.counters.add("returned")
        s.credit = 0
        self.sessions.offer(s)

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
        be, and those found gone once the loop has polled since; heartbeat the others
        every interval. Expiries only move later, so the earliest one seen in a scan
        is when the next scan is due."""
        sessions = self.sessions
        beat = now >= sessions.next_tick
        if beat:
            sessions.next_tick = now + sessions.heartbeat
        earliest = now + sessions.heartbeat * sessions.liveness
        for s in list(sessions.sess.values()):
            if (s.gone >= 0 and sessions.polls > s.gone) or (s.gone < 0 and now >= s.expiry):
                self.counters.add("workers_dead")
                self.worker_event(EV_WORKER_DEAD, s)
                self.forget(s)
                continue
            if s.gone < 0 and beat and sessions.send(s, CMD_HEARTBEAT):
                # Its connection is gone (ROUTER_MANDATORY): dead at the next scan,
                # not when its liveness runs out.
                self.unreachable(s)
            earliest = min(earliest, now if s.gone >= 0 else s.expiry)
        sessions.next_check = earliest

    @cdef
    def probe(self) -> int:
        """HEARTBEAT to every worker now; one whose connection is gone (the send fails:
        ROUTER_MANDATORY) is forgotten at the loop's next scan, after its last messages
        are read, and its jobs go back to the queue. Returns how many were found."""
        count = 0
        for s in list(self.sessions.sess.values()):
            if s.gone < 0 and self.sessions.send(s, CMD_HEARTBEAT):
                self.unreachable(s)
                count += 1
        return count

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
        # An FBW02 worker's share of the queue, fixed for this pass: so that a few jobs
        # spread over the idle workers, and many fill each one's credit.
        share = -(-queue.count // len(workers)) if workers else 0
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
                if s.v2:
                    self.dispatch_batch(s, share, now)
                    continue
                # ROUTER_MANDATORY makes the send fail for a worker that is gone;
                # the job then stays at the front for the next idle worker.
                if sessions.send(s, CMD_TASK, [r.task_id] + r.payload):
                    self.unreachable(s)
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
            self.start_attempt(r, s, now)
            if s is not None:
                sessions.offer(s)

    @cdef
    def dispatch_batch(self, s: Sess, share: int, now: float) -> None:
        """One FBW02 TASK to worker s, taken from the idle FIFO: the queue's first jobs,
        at most its spare credit, `share` (of the queue, for this pass), MAX_BATCH and
        MAX_FRAMES. A failed job that another idle worker could retry ends the batch
        before it."""
        queue = self.queue
        spare = s.credit - len(s.jobs) - s.ghosts
        limit = min(spare, share, MAX_BATCH)
        if limit < 1:  # not reached: a worker is idle only with spare credit
            return
        taken: list = []  # (FIFO, request), to put back if the worker is gone
        frames: list = []
        header = []
        while len(taken) < limit:
            q = queue.next()
            if q is None:
                break
            r = q[0]
            if taken and (len(frames) + len(r.payload) > MAX_FRAMES or (r.failed_on is s and self.idle.workers)):
                break
            q.popleft()
            queue.count -= 1
            taken.append((q, r))
            frames += r.payload
            header.append(r.task_id + len(r.payload).to_bytes(2, "big"))
        frames.append(b"".join(header))
        # Header last: the compiled core commits each job as it sends its frames.
        if self.sessions.send(s, CMD_TASK, frames):
            for q, r in reversed(taken):
                q.appendleft(r)
                queue.count += 1
            self.unreachable(s)
            return
        for _, r in taken:
            self.start_attempt(r, s, now)
        self.sessions.offer(s)

    @cdef
    def unreachable(self, s: Sess) -> None:
        """A send to worker s failed at its first frame: its connection is gone. It
        gets nothing more and is forgotten at the next scan (tick), once the loop has
        polled: libzmq still holds the messages it sent before closing, and a
        DISCONNECT among them makes it a worker that left, not one that died."""
        self.counters.add("unreachable_workers")
        sessions = self.sessions
        s.gone = sessions.polls
        self.idle.remove_slot(s.key)
        sessions.next_check = sessions.clock.now

    @cdef
    def start_attempt(self, r: Req, s: Optional[Sess], now: float) -> None:
        """Request r, taken off the queue, was sent to a worker (session s, or None for
        a REQ worker): its attempt starts now."""
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
            self.sessions.attach(r, s)
        self.counters.add("dispatched")
