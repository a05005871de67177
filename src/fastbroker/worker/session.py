"""The I/O loop of a DEALER ``Worker`` (protocol FBW01): one connection to the
broker at a time, heartbeats both ways, reconnection with back-off, jobs run in a
thread pool, graceful hang-up, CANCEL from the broker. ``Worker.run()`` runs
``Session(worker).run()``.

Only the loop's thread touches the socket; pool threads hand results back
through a deque and wake the loop through the worker's pipe.

CANCEL (PROTOCOL.md 4.12): the broker has dropped the job and keeps its credit
taken until we ANSWER or FAIL it. A job still waiting for a pool thread is
withdrawn and FAILED at once (``Cancelled``); a running one is marked in
``Session.cancelled``, which the job reads through ``Worker.cancelled()``, and is
answered as usual when it returns.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from fastbroker import security
from fastbroker.protocol import (
    CMD_ANSWER,
    CMD_CANCEL,
    CMD_DISCONNECT,
    CMD_EXTEND,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_RETURN,
    CMD_TASK,
    R_OK,
    RECV_BATCH,
    TASK_ID_SIZE,
    WORKER_SIGNATURE,
    WORKER_SIGNATURE_V2,
)
from fastbroker.worker import wire
from fastbroker.worker.running import run_batch, run_one

log = logging.getLogger("fastbroker.worker")

CANCELLED_TYPE = b"Cancelled"
CANCELLED_TEXT = b"cancelled by the client"
"""The FAILED a worker sends for a job cancelled before it started (PROTOCOL.md 4.12)."""


@dataclass
class WorkerStats:
    """Counters of a DEALER worker, updated by its I/O loop only."""

    received: int = 0  # TASKs received
    answered: int = 0  # jobs answered (ANSWER queued for the broker)
    failed: int = 0  # jobs whose process() raised (FAILED sent unless the connection was lost)
    connects: int = 0  # sockets opened, the first one included
    reconnects: int = 0  # sockets opened again after a silent broker or a DISCONNECT
    disconnects: int = 0  # DISCONNECTs received from the broker
    heartbeats_sent: int = 0
    cancelled: int = 0  # CANCELs received for jobs in hand (started or not)
    cancelled_unstarted: int = 0  # of which withdrawn before a pool thread took them (FAILED at once)
    protocol: int = 0  # what it speaks now: 2 (FBW02) or 1 (FBW01); 0 before its first connection
    ignored: int = 0  # broker messages not acted on: an unknown command, a TASK or CANCEL with the wrong frames
    returned: int = 0  # jobs given back (RETURN): they came from one broker while others filled the credit

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    @classmethod
    def total(cls, each: Sequence[WorkerStats]) -> WorkerStats:
        """The counters of several connections summed (``protocol``: the lowest)."""
        out = cls()
        for name in asdict(out):
            values = [getattr(one, name) for one in each]
            setattr(out, name, min(values) if name == "protocol" else sum(values))
        return out


# A job's outcome from a pool thread: (job number, task id, answer frames or None,
# (exception type name, message) or None).
_Result = Tuple[int, bytes, Optional[List[bytes]], Optional[Tuple[str, str]]]


# Plain ints: pyzmq's constants are enum flags, whose operators cost microseconds
# each in a loop that runs for every job.
_POLLIN = int(zmq.POLLIN)
_POLLIN_OUT = int(zmq.POLLIN | zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)


class JobPool:
    """Up to ``size`` threads that run jobs, started as jobs come: what the loop
    used a ThreadPoolExecutor for, without its Future, Condition and semaphore per
    job, which cost more than the hand-off itself (and hold the GIL longer after
    the job, when the loop wants it back to send the answer).

    A job waits in ``waiting`` until a thread takes it; ``withdraw`` (CANCEL) takes
    it first if no thread has. Each side takes it with one ``dict.pop``, atomic
    under the GIL, so exactly one of them gets it and a withdrawn job never runs.

    As a ThreadPoolExecutor's, the threads are not daemons and are told to end
    when the interpreter exits (after finishing the jobs they hold).
    """

    def __init__(
        self,
        size: int,
        run: Callable[[int, bytes, List[bytes]], None],
        name: str,
        run_batch: Optional[Callable[[List[Tuple[int, bytes, List[bytes]]]], None]] = None,
        batch_max: int = 1,
    ) -> None:
        self.size = size
        self.run = run
        # With run_batch, a thread takes every job waiting (up to batch_max) at once.
        self.run_batch = run_batch
        self.batch_max = batch_max
        self.name = name
        self.queue: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
        self.waiting: Dict[int, Tuple[bytes, List[bytes]]] = {}  # job number -> its arguments
        self.threads: List[threading.Thread] = []
        self.closed = False
        _watch_at_exit(self)

    def submit(self, number: int, task_id: bytes, payload: List[bytes], busy: int) -> None:
        """Queue a job; `busy`: the jobs in hand, this one included. A thread is
        started while there are fewer than those (and than ``size``)."""
        if self.closed:
            raise RuntimeError("cannot run new jobs after the pool was shut down")
        self.waiting[number] = (task_id, payload)
        if len(self.threads) < min(busy, self.size):
            thread = threading.Thread(target=self._serve, name=f"{self.name}_{len(self.threads)}")
            thread.start()
            self.threads.append(thread)
        self.queue.put(number)

    def withdraw(self, number: int) -> bool:
        """Take back a job no thread has taken yet; False if one has (it runs to its end)."""
        return self.waiting.pop(number, None) is not None

    def shutdown(self, wait: bool, cancel_waiting: bool = False) -> None:
        """Let the threads end once the queue is done (without the jobs waiting, with
        `cancel_waiting`); with `wait`, until they have."""
        self.closed = True
        if cancel_waiting:
            self.waiting.clear()
        for _ in self.threads:
            self.queue.put(None)
        if wait:
            for thread in self.threads:
                thread.join()

    def _serve(self) -> None:
        get, take, run = self.queue.get, self.waiting.pop, self.run
        while True:
            number = get()
            if number is None:
                return
            job = take(number, None)
            if job is None:
                continue  # withdrawn before this thread took it
            try:
                if self.run_batch is None:
                    run(number, *job)
                elif not self._serve_batch((number, *job)):
                    return
            except BaseException:  # run() reports the job's own errors: this is a bug
                log.exception("a job thread failed")

    def _serve_batch(self, first: Tuple[int, bytes, List[bytes]]) -> bool:
        """Run `first` with the jobs waiting now (no waiting for more); False if the
        pool's end (None) was taken meanwhile: it is the thread's last batch."""
        batch, more = [first], True
        while len(batch) < self.batch_max:
            try:
                number = self.queue.get_nowait()
            except queue.Empty:
                break
            if number is None:
                more = False
                break
            job = self.waiting.pop(number, None)
            if job is not None:
                batch.append((number, *job))
        assert self.run_batch is not None
        self.run_batch(batch)
        return more


_pools: weakref.WeakSet[JobPool] = weakref.WeakSet()
_exit_hook: List[bool] = []


def _watch_at_exit(pool: JobPool) -> None:
    if not _exit_hook:
        # What concurrent.futures does for its executors: a pool left running (its
        # loop in a daemon thread, say) must not keep the interpreter from exiting.
        threading._register_atexit(_end_pools_at_exit)  # type: ignore[attr-defined]
        _exit_hook.append(True)
    _pools.add(pool)


def _end_pools_at_exit() -> None:
    pools = list(_pools)
    for pool in pools:
        if not pool.closed:
            pool.shutdown(wait=False)
    for pool in pools:
        for thread in pool.threads:
            thread.join()


class CreditGate:
    """The jobs a worker connected to several brokers holds, one Session per broker:
    at most ``limit`` (its credit plus prefetch) in all. Each broker is told the whole
    credit; a job that comes when the gate is full is given back at once (RETURN), and
    that broker sends nothing more until the Session tells it READY again, which it does
    when the gate has room (``blocked`` sessions, oldest first, are woken by ``give``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.lock = threading.Lock()
        self.blocked: List[Session] = []

    def take(self) -> bool:
        """One more job in hand, if there is room."""
        with self.lock:
            if self.held >= self.limit:
                return False
            self.held += 1
            return True

    def give(self) -> None:
        """A job is no longer in hand: the session that gave jobs back first may offer
        its credit again (one per slot freed: waking them all would have them all send,
        and all but one give back again)."""
        with self.lock:
            self.held -= 1
            woken = self.blocked.pop(0) if self.blocked else None
        if woken is not None:
            woken.unblock()

    def block(self, session: Session) -> None:
        """`session` gave jobs back: wake it when there is room (at once if there is)."""
        with self.lock:
            if self.held >= self.limit:
                if session not in self.blocked:
                    self.blocked.append(session)
                return
        session.unblock()


class Session:
    """Runs one worker's loop until it has stopped and hung up: its connection to one
    broker (a worker given several runs one Session per broker, sharing a CreditGate)."""

    def __init__(
        self,
        worker: Any,
        address: Optional[str] = None,
        wake_pipe: Any = None,
        stats: Optional[WorkerStats] = None,
        gate: Optional[CreditGate] = None,
    ) -> None:
        self.worker = worker
        self.address: str = worker.requests_addr if address is None else address
        self.wake_pipe = worker.wake_pipe if wake_pipe is None else wake_pipe
        self.gate = gate
        self.returns: List[bytes] = []  # task ids to give back (RETURN) at the next flush
        self.unblocked = False  # set by the gate (another thread): offer the credit again
        self.heartbeat: float = worker.heartbeat
        self.silence: float = worker.liveness * worker.heartbeat
        self.reconnect_max: float = worker.reconnect_max or self.silence
        self.credit: int = worker.credit
        # Jobs the broker may send beyond those running: they wait here for a thread.
        self.prefetch: int = worker.prefetch
        self.views_min: Optional[int] = worker.zero_copy_min
        self.stats: WorkerStats = worker.stats if stats is None else stats
        # FBW02 (many jobs per TASK and per ANSWER) unless the worker asks for FBW01. A
        # broker that never speaks on a new connection may not know FBW02: the next
        # connection tries the other protocol, and so on until one is heard.
        self.v2: bool = worker.protocol == 2
        self.signature = WORKER_SIGNATURE_V2 if self.v2 else WORKER_SIGNATURE
        self.sock: Optional[zmq.Socket] = None
        self.offered_v2 = False
        self.generation = 0  # sockets opened so far; each job remembers the one it came on
        self.heard = False  # the broker has spoken on this socket
        self.last_heard = 0.0
        self.next_heartbeat = 0.0
        self.announced: Optional[int] = None  # credit last sent in READY on this socket
        self.failures = 0  # connections lost in a row without hearing the broker
        self.reconnect_at: Optional[float] = None
        self.quiet_at: Optional[float] = None  # a stopping worker expects no more jobs after this
        self.stopping = False
        self.next_job = 0
        self.jobs: Dict[int, int] = {}  # job number -> generation of the socket it came on
        # Jobs in hand that came on an earlier generation (counted, not searched for
        # at each turn: with a large credit, that search was the loop's longest step).
        self.orphans = 0
        # task id -> numbers of the jobs in hand with it: usually one, but a timed-out
        # attempt still running here and a later try of the same job make two.
        self.by_task: Dict[bytes, List[int]] = {}
        # Task ids the broker cancelled while their job runs here. Written by this
        # loop only; pool threads just test membership (Worker.cancelled()).
        self.cancelled: Set[bytes] = set()
        self.results: Deque[_Result] = collections.deque()
        # (job number, task id, milliseconds): EXTENDs asked for by running jobs.
        self.extends: Deque[Tuple[int, bytes, int]] = collections.deque()
        # (generation, frames): an ANSWER (generation None) is sent on whatever
        # socket comes next; a FAILED only on the socket its job came on.
        self.outbox: Deque[Tuple[Optional[int], List[bytes]]] = collections.deque()
        # ANSWERs sent since the broker last spoke: if the connection is lost now,
        # they may still sit in the socket's queue, which closing (linger 0)
        # discards; they are sent again on the next connection (a duplicate is
        # harmless: the broker drops an answer to an answered task).
        self.unconfirmed: List[List[bytes]] = []
        self.pool = JobPool(
            self.credit,
            self._process,
            "fastbroker-job",
            self._process_batch if worker.batched else None,
            self.credit + self.prefetch,
        )
        # The wake pipe was readable at the last poll (and may be at the start):
        # drain it before collecting results. A byte written later keeps it
        # readable, so the next poll returns at once and sets this again.
        self.woken = True
        # True from a pool thread's wake-up until the loop takes the results: a job
        # that ends while it is set needs no write to the pipe (one syscall per job less).
        self.results_pending = False

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        graceful = False
        try:
            if not self.worker.stopping:
                self._open(time.monotonic())
            while True:
                now = time.monotonic()
                if self.woken:
                    # Only when the pipe was readable: an empty pipe costs a failed read.
                    self.woken = False
                    self._drain_wake_pipe()
                # Before taking the results: one appended from now on wakes again.
                self.results_pending = False
                self._collect_results()
                self._collect_extends()
                if self.worker.stopping and not self.stopping:
                    self.stopping = True
                    log.info("stopping: finishing %d job(s) in hand, then disconnecting", len(self.jobs))
                if self.sock is None and self.reconnect_at is not None and now >= self.reconnect_at:
                    self._open(now)
                if self.sock is not None:
                    if self.returns:
                        self._give_back(now)
                    if self.unblocked:
                        # The broker took our credit for full when we gave jobs back.
                        self.unblocked = False
                        self.announced = None
                    # READY first on a new connection (the broker answers anything
                    # else from an unknown worker with DISCONNECT) and READY(0)
                    # before the last answers; a raised credit goes after them.
                    if self.stopping or self.announced is None:
                        self._announce_credit(now)
                    self._flush(now)
                    self._announce_credit(now)
                    self._offer_v2(now)
                    if now - self.last_heard > self.silence:
                        self._lose(now, f"no word from the broker for {now - self.last_heard:.1f} s")
                    elif now >= self.next_heartbeat:
                        self._send(now, self._message(CMD_HEARTBEAT))
                        self.stats.heartbeats_sent += 1
                        self.next_heartbeat = now + self.heartbeat
                if self.stopping and self._finished(now):
                    self._hang_up()
                    graceful = True
                    return
                self._poll(now)
        finally:
            if not graceful:  # an error escaped the loop: release without waiting
                if self.sock is not None:
                    self.sock.close(linger=0)
                    self.sock = None
                self.pool.shutdown(wait=False, cancel_waiting=True)
                if self.jobs:
                    # Jobs still running will write to the wake pipe when done:
                    # close() must not free its fds for reuse under them.
                    self.worker._keep_wake_pipe = True

    def _poll(self, now: float) -> None:
        pipe = self.wake_pipe.read_fd
        sock = self.sock
        if sock is not None:
            items: List[Tuple[Any, int]] = [(pipe, _POLLIN), (sock, _POLLIN_OUT if self.outbox else _POLLIN)]
            due: Optional[float] = min(self.next_heartbeat, self.last_heard + self.silence)
        else:
            items = [(pipe, _POLLIN)]
            due = self.reconnect_at
        if self.quiet_at is not None and now < self.quiet_at and (due is None or self.quiet_at < due):
            due = self.quiet_at
        wait = max(0.0, due - now) if due is not None else self.heartbeat
        # Round up: waking a hair early would spin through a turn with nothing due.
        receive = False
        for item, events in zmq.zmq_poll(items, int(math.ceil(wait * 1000))):
            if item is sock:
                receive = events & _POLLIN
            else:
                self.woken = True
        if receive:
            self._receive()

    def _drain_wake_pipe(self) -> None:
        """WakePipe.drain() in one read instead of two: a pipe's read that returns
        fewer bytes than asked for has emptied it (a byte written since keeps it
        readable for the next poll), so the read that fails on an empty pipe,
        and its exception, are not needed."""
        fd = self.wake_pipe.read_fd
        try:
            for _ in range(64):  # bounded: a pipe holds at most 64 KiB here
                if len(os.read(fd, 4096)) < 4096:
                    return
        except OSError:
            pass  # empty (BlockingIOError) or closed

    def _finished(self, now: float) -> bool:
        """A stopping worker may hang up: no job in hand, no answer to send, and the
        grace for jobs racing READY(0) has passed."""
        if self.jobs:
            return False
        if self.sock is None:
            return True
        return not self.outbox and (self.quiet_at is None or now >= self.quiet_at)

    # -- the connection ----------------------------------------------------------------

    def _open(self, now: float) -> None:
        self.generation += 1
        self.orphans = len(self.jobs)
        self.sock = self.worker.context.socket(zmq.DEALER)
        # Abandoning a connection must not wait for it; the last close sets its own linger.
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_curve(self.sock, self.worker.curve)
        self.sock.connect(self.address)
        self.heard = False
        self.offered_v2 = False  # see _offer_v2
        self.stats.protocol = 2 if self.v2 else 1
        self.last_heard = now  # the broker gets `silence` seconds to speak first
        self.next_heartbeat = now + self.heartbeat
        self.announced = None
        self.reconnect_at = None
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        log.debug("connecting to %s (connection %d)", self.address, self.generation)

    def _register_again(self) -> None:
        """DISCONNECT: the broker does not know this worker (it was restarted, took
        the worker for dead, or is closing). Register again with READY on the same
        socket rather than open a new one: a READY sent just before this DISCONNECT
        may already have registered it, and the TASKs that followed it are on this
        socket. (A broker that is closing is found out by its silence.)"""
        # The jobs in hand belong to the registration the broker forgot: they are
        # orphans for the credit, and their FAILEDs would be for attempts it re-queued.
        self.generation += 1
        self.orphans = len(self.jobs)
        self.announced = None
        self.unconfirmed = []
        log.info("the broker sent DISCONNECT: registering again")

    def _lose(self, now: float, reason: str) -> None:
        """Drop the connection and schedule the next: at once after one loss, then
        heartbeat/2 doubling up to reconnect_max while the broker stays silent."""
        assert self.sock is not None
        self.sock.close(linger=0)
        self.sock = None
        self.outbox.extendleft((None, frames) for frames in reversed(self.unconfirmed))
        self.unconfirmed = []
        delay = 0.0 if self.failures == 0 else min(self.heartbeat / 2 * 2 ** (self.failures - 1), self.reconnect_max)
        self.failures += 1
        self.reconnect_at = now + delay
        log.info("reconnecting to %s in %.2f s: %s", self.address, delay, reason)
        if not self.heard and self.worker.protocol == 2:
            # Perhaps the broker does not know this protocol (a broker without FBW02
            # drops FBW02 messages unanswered): the next connection tries the other.
            self._use_protocol(not self.v2)
            log.info("no word from the broker: trying %s on the next connection", self.signature.decode())

    def _use_protocol(self, v2: bool) -> None:
        """Speak FBW02 (v2) or FBW01 from now on; what waits to be sent is rewritten."""
        self.v2 = v2
        self.signature = WORKER_SIGNATURE_V2 if v2 else WORKER_SIGNATURE
        self.stats.protocol = 2 if v2 else 1
        self.outbox = collections.deque(
            (gen, converted) for gen, frames in self.outbox for converted in wire.convert(frames, v2)
        )

    def _offer_v2(self, now: float) -> None:
        """On an FBW01 connection of an FBW02 worker (it fell back while the broker was
        silent, perhaps only down): offer FBW02 once with a READY in FBW02. A broker
        that knows it answers in FBW02 from then on (see _receive); one that does not
        drops that READY (counted) and the connection stays FBW01. Once per connection,
        after the broker spoke and a credit was announced."""
        if self.v2 or self.worker.protocol != 2 or self.offered_v2 or self.stopping:
            return
        if not self.heard or not self.announced:
            return
        if self._send(now, wire.message(WORKER_SIGNATURE_V2, CMD_READY, (self.announced or 0).to_bytes(4, "big"))):
            self.offered_v2 = True

    def _hang_up(self) -> None:
        """The end of a graceful stop: deliver what is left, say DISCONNECT, close."""
        self.pool.shutdown(wait=True)
        if self.sock is None and any(gen is None for gen, _ in self.outbox):
            # Answers finished while away: one last connection to deliver them.
            self._open(time.monotonic())
        if self.sock is None:
            self.outbox.clear()
            log.info("stopped (not connected to %s)", self.address)
            return
        now = time.monotonic()
        self._announce_credit(now)
        self._flush(now)
        dropped = len(self.outbox)
        self._send(now, self._message(CMD_DISCONNECT))
        # Bounded: a vanished broker must not keep the process alive.
        self.sock.close(linger=self.worker.linger_ms)
        self.sock = None
        # What is left is not sent any more: let the answers go (the Worker keeps its sessions).
        self.outbox.clear()
        self.unconfirmed = []
        if dropped:
            log.warning("%d answer(s) could not be queued for %s before disconnecting", dropped, self.address)
        log.info("disconnected from %s", self.address)

    def _announce_credit(self, now: float) -> None:
        """Send READY when the credit the broker should use changes: on connect, on
        stop (0), and when a job taken on an earlier connection finishes (the new
        connection's credit leaves room for those still running). The broker's credit
        is the worker's plus its prefetch: jobs it holds beyond those running."""
        if self.stopping:
            credit = 0
        else:
            credit = max(0, self.credit + self.prefetch - self.orphans)
        if credit == self.announced:
            return
        if self._send(now, self._message(CMD_READY, credit.to_bytes(4, "big"))):
            self.announced = credit
            if self.stopping and self.quiet_at is None:
                self.quiet_at = now + self.worker.stop_grace

    def _send(self, now: float, frames: Sequence[bytes]) -> bool:
        """Send without blocking; False when the socket's queue is full."""
        assert self.sock is not None
        # send_multipart, without its per-frame type checks and enum flags: every
        # frame here is bytes. Only the first frame can meet a full queue (libzmq
        # counts whole messages against the high-water mark), so a message is
        # sent whole or not at all, as with send_multipart.
        send = self.sock.send
        try:
            for i in range(len(frames) - 1):
                send(frames[i], _NOBLOCK_MORE)
            send(frames[-1], _NOBLOCK)
        except zmq.Again:
            return False
        # Any message tells the broker we are alive: the heartbeat can wait.
        self.next_heartbeat = now + self.heartbeat
        return True

    def _flush(self, now: float) -> None:
        while self.outbox and self.sock is not None:
            gen, frames = self.outbox[0]
            if gen is not None and gen != self.generation:
                # The broker re-queues the jobs of a connection it lost; a
                # FAILED on a new one would count a second try.
                self.outbox.popleft()
                continue
            if not self._send(now, frames):
                return  # full: the poll waits for POLLOUT
            self.outbox.popleft()
            if gen is None:
                self.unconfirmed.append(frames)

    def _receive(self) -> None:
        sock = self.sock
        if sock is None:
            return
        recv = sock.recv
        for turn in range(RECV_BATCH):  # bounded, so results and timers get their turn
            # The poll said POLLIN for the first message; before each next one,
            # asking is cheaper than the exception of an empty socket.
            # EVENTS is an int option; pyzmq types getsockopt() int | bytes (a cast() costs a call a message).
            if turn and not sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                return
            # recv_multipart, cheaper: a Frame tells whether more parts follow
            # without a getsockopt(RCVMORE) each; .bytes copies it once, as
            # recv_multipart's copying receive would.
            try:
                frame = recv(_NOBLOCK, copy=False)
                frames: List[Any] = [frame.bytes]  # bytes, or memoryviews (zero_copy_min)
                while frame.more:
                    frame = recv(_NOBLOCK, copy=False)
                    # Worker.zero_copy_min: a large payload frame as a view of the message.
                    views = self.views_min
                    frames.append(frame.bytes if views is None or len(frame) < views else frame.buffer)
            except zmq.Again:
                return
            now = time.monotonic()
            self.last_heard = now
            self.unconfirmed = []
            if len(frames) < 3 or frames[0] != b"" or frames[1] not in wire.SIGNATURES:
                log.debug("ignored a message that is not FBW01 or FBW02 (%d frames)", len(frames))
                continue
            command = frames[2]
            if frames[1] == WORKER_SIGNATURE_V2 and not self.v2:
                log.info("the broker speaks FBW02: using it")
                self._use_protocol(True)
            if command == CMD_DISCONNECT:
                self.stats.disconnects += 1
                self._register_again()
                continue
            if not self.heard:
                # Not on DISCONNECT: a broker that keeps refusing us must meet the back-off.
                self.heard = True
                self.failures = 0
                log.info("connected to %s", self.address)
            if command == CMD_TASK and frames[1] == WORKER_SIGNATURE_V2:
                self._start_jobs(frames[3:])
            elif command == CMD_TASK:
                self._start_job(frames[3:])
            elif command == CMD_CANCEL:
                self._cancel(frames[3:])
            elif command != CMD_HEARTBEAT:
                self.stats.ignored += 1
                log.debug("ignored an unknown command %r", command)

    # -- jobs --------------------------------------------------------------------------

    def _start_job(self, body: List[bytes]) -> None:
        if not body or len(body[0]) != TASK_ID_SIZE:
            self.stats.ignored += 1
            log.warning("ignored a TASK without a 16-byte task id")
            return
        if self.gate is not None and not self.gate.take():
            # Another broker filled the credit meanwhile: this one gets the job back.
            self.returns.append(bytes(body[0]))
            return
        self.stats.received += 1
        self.next_job += 1
        number, task_id = self.next_job, bytes(body[0])
        self.jobs[number] = self.generation
        self.by_task.setdefault(task_id, []).append(number)
        self.pool.submit(number, task_id, body[1:], len(self.jobs))

    def _start_jobs(self, body: List[bytes]) -> None:
        """An FBW02 TASK: [payload frames..., header]."""
        jobs = wire.split_tasks(body)
        if jobs is None:
            self.stats.ignored += 1
            log.warning("ignored a TASK whose header does not match its %d frames", len(body))
            return
        for task_id, payload in jobs:
            self._start_job([task_id, *payload])

    def _cancel(self, body: List[bytes]) -> None:
        """CANCEL from the broker: withdraw the job if no pool thread has taken it
        yet (FAILED at once, so the broker frees its credit), else mark it so that
        ``Worker.cancelled()`` tells the job; its ANSWER or FAILED is sent when it
        ends. Never blocks."""
        if len(body) != 1:
            self.stats.ignored += 1
            log.debug("ignored a CANCEL with %d body frames", len(body))
            return
        task_id = bytes(body[0])
        numbers = self.by_task.get(task_id)
        if not numbers:
            # It may have just finished, its answer crossing the CANCEL.
            log.debug("ignored a CANCEL for job %s, which is not in hand", task_id.hex())
            return
        for number in list(numbers):
            self.stats.cancelled += 1
            # Withdrawing succeeds only while the job waits in the pool's queue;
            # from then on the pool never runs it, so no result will come.
            if not self.pool.withdraw(number):
                self.cancelled.add(task_id)
                log.info("job %s cancelled by the client while running; answering it when it returns", task_id.hex())
                continue
            self.stats.cancelled_unstarted += 1
            generation = self._forget(number, task_id)
            log.info("job %s cancelled by the client before it started; not running it", task_id.hex())
            # As for any FAILED, only on the connection the job came on: the broker
            # has already put back the jobs of a connection it lost.
            if generation == self.generation and self.sock is not None:
                self.outbox.append((generation, self._message(CMD_FAILED, task_id, CANCELLED_TYPE, CANCELLED_TEXT)))

    def _give_back(self, now: float) -> None:
        """RETURN the jobs that came beyond the credit (several brokers), then wait for
        room (CreditGate.block) before offering the credit to this broker again."""
        returns, self.returns = self.returns, []
        self.stats.returned += len(returns)
        log.debug("gave %d job(s) back to %s: the credit is full", len(returns), self.address)
        self.outbox.append((self.generation, self._message(CMD_RETURN, *returns)))
        self._flush(now)
        assert self.gate is not None
        self.gate.block(self)

    def request_stop(self) -> None:
        """Worker.stop(): nothing to do here, the loop reads ``worker.stopping`` each turn
        (the compiled twin, whose loop cannot read it without the GIL, sets a flag)."""

    def update_stats(self) -> None:
        """Worker.stats: nothing to do here, the loop writes ``stats`` itself (the compiled
        twin copies its counters in)."""

    def unblock(self) -> None:
        """From the CreditGate (any thread): there is room again; offer the credit."""
        self.unblocked = True
        self.wake_pipe.wake()

    def _forget(self, number: int, task_id: bytes) -> int:
        """The job is no longer in hand; returns the generation it came on."""
        generation = self.jobs.pop(number)
        if self.gate is not None:
            self.gate.give()
        if generation != self.generation:
            self.orphans -= 1
        numbers = self.by_task[task_id]
        numbers.remove(number)
        if not numbers:
            del self.by_task[task_id]
            self.cancelled.discard(task_id)
        return generation

    def _process(self, number: int, task_id: bytes, payload: List[bytes]) -> None:
        """In a pool thread: run the user's code, hand the outcome to the loop."""
        local = self.worker._job_local
        # What Worker.cancelled() and Worker.extend() read in this thread while the job runs.
        local.job = (task_id, self, number)
        try:
            answer, error = run_one(self.worker, task_id, payload, self, number)
        finally:
            local.job = None
        self.results.append((number, task_id, answer, error))
        self._result_ready()

    def job_cancelled(self, number: int, task_id: bytes) -> bool:
        """Worker.cancelled(): whether the broker cancelled this running job."""
        return task_id in self.cancelled

    def request_extend(self, number: int, task_id: bytes, seconds: float) -> None:
        """In a pool thread (Worker.extend): ask the loop to send EXTEND for the job."""
        self.extends.append((number, task_id, max(1, min(round(seconds * 1000), 0xFFFFFFFF))))
        self._result_ready()

    def _collect_extends(self) -> None:
        while self.extends:
            number, task_id, ms = self.extends.popleft()
            generation = self.jobs.get(number)
            if generation is not None:  # still running: on the connection its job came on
                self.outbox.append((generation, self._message(CMD_EXTEND, task_id, ms.to_bytes(4, "big"))))

    def _result_ready(self) -> None:
        """In a pool thread, after appending to results: wake the loop unless a wake-up
        is already on its way (the loop clears the flag before taking the results)."""
        if not self.results_pending:
            self.results_pending = True
            self.wake_pipe.wake()

    def _process_batch(self, jobs: List[Tuple[int, bytes, List[bytes]]]) -> None:
        """In a pool thread: the user's process_batch over several jobs; each job's
        outcome goes to the loop as if it had run alone."""
        outcomes = run_batch(self.worker, [payload for _, _, payload in jobs])
        self.results.extend((number, task_id, *outcome) for (number, task_id, _), outcome in zip(jobs, outcomes))
        self._result_ready()

    def _collect_results(self) -> None:
        # FBW02: the answers of this turn go as few ANSWER messages (FAILED stays one
        # message each: it is rare, and goes only on the connection its job came on).
        batch = wire.AnswerBatch() if self.v2 and self.results else None
        while self.results:
            number, task_id, answer, error = self.results.popleft()
            generation = self._forget(number, task_id)
            if answer is not None:
                self.stats.answered += 1
                if batch is not None:
                    batch.add(task_id, R_OK, answer)
                else:
                    self.outbox.append((None, self._message(CMD_ANSWER, task_id, *answer)))
                continue
            self.stats.failed += 1
            assert error is not None
            if generation == self.generation and self.sock is not None:
                name, text = error
                self.outbox.append(
                    (generation, self._message(CMD_FAILED, task_id, name.encode(), text.encode("utf-8", "replace")))
                )
            else:
                log.info("job %s failed after its connection was lost; the broker re-queues it", task_id.hex())
        if batch is not None:
            self.outbox.extend((None, frames) for frames in batch.close())

    def _message(self, command: bytes, *body: bytes) -> List[bytes]:
        return wire.message(self.signature, command, *body)


def drop_released_answers() -> None:
    """Nothing to do here: pyzmq copies the answers it sends (the compiled twin sends
    large ones from the job's own object and drops its references here, as its job
    threads do)."""
