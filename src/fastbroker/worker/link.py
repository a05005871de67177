"""A worker Session's connection to one broker (the pure twin of compiled/link.pxi):
connecting and reconnecting with back-off, READY and the credit, heartbeats both ways,
the FBW01/FBW02 framing of TASK, CANCEL and DISCONNECT in and of ANSWER, FAILED, EXTEND
and RETURN out. What the jobs are and who runs them is the Session's; a Link reads
messages into its job table and sends what its outbox holds. Only the Session's loop
thread calls it.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Sequence, Tuple

import zmq

from fastbroker import security
from fastbroker._common import send_message
from fastbroker.protocol import (
    CMD_CANCEL,
    CMD_DISCONNECT,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_RETURN,
    CMD_TASK,
    PEER_MAX_FRAMES,
    RECV_BATCH,
    TASK_ID_SIZE,
    WORKER_SIGNATURE,
    WORKER_SIGNATURE_V2,
)
from fastbroker.worker import wire

if TYPE_CHECKING:
    from fastbroker.worker.session import Session, WorkerStats

log = logging.getLogger("fastbroker.worker")

# Plain ints: pyzmq's constants are enum flags, whose operators cost microseconds
# each in a loop that runs for every job.
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)


class Link:
    """The connection to one broker of a Session (one per broker of the worker's list)."""

    def __init__(self, session: Session, index: int, address: str, stats: WorkerStats) -> None:
        self.session = session
        self.index = index
        self.address = address
        self.stats = stats
        # FBW02 (many jobs per TASK and per ANSWER) unless the worker asks for FBW01. A
        # broker that never speaks on a new connection may not know FBW02: the next
        # connection tries the other protocol, and so on until one is heard.
        self.v2: bool = session.worker.protocol == 2
        self.signature = WORKER_SIGNATURE_V2 if self.v2 else WORKER_SIGNATURE
        self.sock: Optional[zmq.Socket] = None
        self.offered_v2 = False
        self.generation = 0  # sockets opened (and registrations) so far; each job remembers the one it came on
        self.heard = False  # the broker has spoken on this socket
        self.last_heard = 0.0
        self.next_heartbeat = 0.0
        self.announced: Optional[int] = None  # credit last sent in READY on this socket
        self.failures = 0  # connections lost in a row without hearing the broker
        self.reconnect_at: Optional[float] = None
        self.quiet_at: Optional[float] = None  # a stopping worker expects no more jobs after this
        self.in_hand = 0  # jobs of this broker in hand
        # Of them, those that came on an earlier generation (counted, not searched for
        # at each turn: with a large credit, that search was the loop's longest step).
        self.orphans = 0
        # With several brokers, the credit this one is told (Session._share_credit),
        # counting the jobs of this connection only, and since when it has left more
        # than one of them unused (None: it has not).
        self.share = 0
        self.spare_since: Optional[float] = None
        # Its broker was found to have nothing queued: it may send one job (once it
        # holds none), which the others' shares do not make room for.
        self.probing = False
        self.returns: List[bytes] = []  # task ids to give back (RETURN) at the next flush
        # (generation, frames): an ANSWER (generation None) is sent on whatever
        # socket comes next; a FAILED, EXTEND or RETURN only on the one its job came on.
        self.outbox: Deque[Tuple[Optional[int], List[bytes]]] = collections.deque()
        # ANSWERs sent since the broker last spoke: if the connection is lost now,
        # they may still sit in the socket's queue, which closing (linger 0)
        # discards; they are sent again on the next connection (a duplicate is
        # harmless: the broker drops an answer to an answered task).
        self.unconfirmed: List[List[bytes]] = []

    # -- the connection ----------------------------------------------------------------

    def open(self, now: float) -> None:
        session = self.session
        self.generation += 1
        self.orphans = self.in_hand
        self.sock = session.worker.context.socket(zmq.DEALER)
        # Abandoning a connection must not wait for it; the last close sets its own linger.
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_curve(self.sock, session.worker.curve)
        self.sock.connect(self.address)
        self.share = session.opening_share(self)  # what READY on the new connection offers
        self.spare_since = None
        self.probing = False
        self.heard = False
        self.offered_v2 = False  # see offer_v2
        self.stats.protocol = 2 if self.v2 else 1
        self.last_heard = now  # the broker gets `silence` seconds to speak first
        self.next_heartbeat = now + session.heartbeat
        self.announced = None
        self.reconnect_at = None
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        log.debug("connecting to %s (connection %d)", self.address, self.generation)

    def close_socket(self, linger_ms: int) -> None:
        if self.sock is not None:
            self.sock.close(linger=linger_ms)
            self.sock = None

    def register_again(self) -> None:
        """DISCONNECT: the broker does not know this worker (it was restarted, took
        the worker for dead, or is closing). Register again with READY on the same
        socket rather than open a new one: a READY sent just before this DISCONNECT
        may already have registered it, and the TASKs that followed it are on this
        socket. (A broker that is closing is found out by its silence.)"""
        # The jobs in hand belong to the registration the broker forgot: they are
        # orphans for the credit, and their FAILEDs would be for attempts it re-queued.
        self.generation += 1
        self.orphans = self.in_hand
        self.announced = None
        self.share = self.session.opening_share(self)  # what the READY that registers it again offers
        self.spare_since = None
        self.probing = False
        self.unconfirmed = []
        log.info("the broker sent DISCONNECT: registering again")

    def lose(self, now: float, reason: str) -> None:
        """Drop the connection and schedule the next: at once after one loss, then
        heartbeat/2 doubling up to reconnect_max while the broker stays silent."""
        session = self.session
        self.close_socket(0)
        self.spare_since = None  # the share is told again on the next connection
        self.outbox.extendleft((None, frames) for frames in reversed(self.unconfirmed))
        self.unconfirmed = []
        delay = (
            0.0 if self.failures == 0 else min(session.heartbeat / 2 * 2 ** (self.failures - 1), session.reconnect_max)
        )
        self.failures += 1
        self.reconnect_at = now + delay
        log.info("reconnecting to %s in %.2f s: %s", self.address, delay, reason)
        if not self.heard and session.worker.protocol == 2:
            # Perhaps the broker does not know this protocol (a broker without FBW02
            # drops FBW02 messages unanswered): the next connection tries the other.
            self.use_protocol(not self.v2)
            log.info("no word from the broker: trying %s on the next connection", self.signature.decode())

    def use_protocol(self, v2: bool) -> None:
        """Speak FBW02 (v2) or FBW01 from now on; what waits to be sent is rewritten."""
        self.v2 = v2
        self.signature = WORKER_SIGNATURE_V2 if v2 else WORKER_SIGNATURE
        self.stats.protocol = 2 if v2 else 1
        self.outbox = collections.deque(
            (gen, converted) for gen, frames in self.outbox for converted in wire.convert(frames, v2)
        )

    def turn(self, now: float) -> None:
        """The link's share of a loop turn: reconnect when due, give back, READY, send
        what is waiting, heartbeats both ways."""
        session = self.session
        if self.sock is None and self.reconnect_at is not None and now >= self.reconnect_at:
            self.open(now)
        if self.sock is None:
            return
        if self.returns:
            self.give_back(now)
        # READY first on a new connection (the broker answers anything else from an
        # unknown worker with DISCONNECT), and READY(0) or a lowered share before the
        # answers (else the broker would refill what they free); a raised one after.
        if session.stopping or self.announced is None or (session.has_limit and self.share < self.announced):
            self.announce_credit(now)
        self.flush(now)
        self.announce_credit(now)
        self.offer_v2(now)
        if now - self.last_heard > session.silence:
            self.lose(now, f"no word from the broker for {now - self.last_heard:.1f} s")
        elif now >= self.next_heartbeat:
            self.send(now, self.message(CMD_HEARTBEAT))
            self.stats.heartbeats_sent += 1
            self.next_heartbeat = now + session.heartbeat

    def due(self, now: float) -> Optional[float]:
        """When the link next needs the loop without a message (None: never)."""
        if self.sock is not None:
            due: Optional[float] = min(self.next_heartbeat, self.last_heard + self.session.silence)
        else:
            due = self.reconnect_at
        if self.quiet_at is not None and now < self.quiet_at and (due is None or self.quiet_at < due):
            due = self.quiet_at
        return due

    def finished(self, now: float) -> bool:
        """Nothing left to send to this broker, and the grace for jobs racing READY(0)
        has passed (the Session checks that no job is in hand)."""
        if self.sock is None:
            return True
        return not self.outbox and (self.quiet_at is None or now >= self.quiet_at)

    def hang_up(self) -> None:
        """The end of a graceful stop: deliver what is left, say DISCONNECT, close."""
        if self.sock is None and any(gen is None for gen, _ in self.outbox):
            # Answers finished while away: one last connection to deliver them.
            self.open(time.monotonic())
        if self.sock is None:
            self.outbox.clear()
            log.info("stopped (not connected to %s)", self.address)
            return
        now = time.monotonic()
        self.announce_credit(now)
        self.flush(now)
        dropped = len(self.outbox)
        self.send(now, self.message(CMD_DISCONNECT))
        # Bounded: a vanished broker must not keep the process alive.
        self.close_socket(self.session.worker.linger_ms)
        # What is left is not sent any more: let the answers go (the Worker keeps its sessions).
        self.outbox.clear()
        self.unconfirmed = []
        if dropped:
            log.warning("%d answer(s) could not be queued for %s before disconnecting", dropped, self.address)
        log.info("disconnected from %s", self.address)

    def announce_credit(self, now: float) -> None:
        """Send READY when the credit the broker should use changes: on connect, on
        stop (0), and when a job taken on an earlier connection finishes (the new
        connection's credit leaves room for those still running), and with several
        brokers when this one's share changes. The broker's credit is the worker's plus
        its prefetch: jobs it holds beyond those running."""
        session = self.session
        if session.stopping:
            credit = 0
        elif session.has_limit:
            credit = self.share
        else:
            credit = max(0, session.limit - self.orphans)
        if credit == self.announced:
            return
        if self.send(now, self.message(CMD_READY, credit.to_bytes(4, "big"))):
            self.announced = credit
            if session.stopping and self.quiet_at is None:
                self.quiet_at = now + session.worker.stop_grace

    def offer_v2(self, now: float) -> None:
        """On an FBW01 connection of an FBW02 worker (it fell back while the broker was
        silent, perhaps only down): offer FBW02 once with a READY in FBW02. A broker
        that knows it answers in FBW02 from then on (see receive); one that does not
        drops that READY (counted) and the connection stays FBW01. Once per connection,
        after the broker spoke and a credit was announced."""
        if self.v2 or self.session.worker.protocol != 2 or self.offered_v2 or self.session.stopping:
            return
        if not self.heard or not self.announced:
            return
        if self.send(now, wire.message(WORKER_SIGNATURE_V2, CMD_READY, (self.announced or 0).to_bytes(4, "big"))):
            self.offered_v2 = True

    def give_back(self, now: float) -> None:
        """RETURN the jobs that came beyond the credit (several brokers), in as many
        messages as PEER_MAX_FRAMES needs. The broker then takes this worker for full
        (share 0): it has jobs queued, so it is told a share again in its turn
        (Session._share_credit)."""
        returns, self.returns = self.returns, []
        self.stats.returned += len(returns)
        log.debug("gave %d job(s) back to %s: the credit is full", len(returns), self.address)
        most = PEER_MAX_FRAMES - 3  # and [b"", signature, RETURN]: a longer one is dropped whole
        for at in range(0, len(returns), most):
            self.outbox.append((self.generation, self.message(CMD_RETURN, *returns[at : at + most])))
        self.flush(now)
        self.share = self.announced = 0
        self.spare_since = None
        self.probing = False

    # -- sending -------------------------------------------------------------------------

    def message(self, command: bytes, *body: bytes) -> List[bytes]:
        return wire.message(self.signature, command, *body)

    def send(self, now: float, frames: Sequence[bytes]) -> bool:
        """Send without blocking; False when the socket's queue is full."""
        assert self.sock is not None
        if not send_message(self.sock, frames):
            return False
        # Any message tells the broker we are alive: the heartbeat can wait.
        self.next_heartbeat = now + self.session.heartbeat
        return True

    def flush(self, now: float) -> None:
        while self.outbox and self.sock is not None:
            gen, frames = self.outbox[0]
            if gen is not None and gen != self.generation:
                # The broker re-queues the jobs of a connection it lost; a
                # FAILED on a new one would count a second try.
                self.outbox.popleft()
                continue
            if not self.send(now, frames):
                return  # full: the poll waits for POLLOUT
            self.outbox.popleft()
            if gen is None:
                self.unconfirmed.append(frames)

    # -- receiving -------------------------------------------------------------------------

    def receive(self) -> None:
        sock = self.sock
        if sock is None:
            return
        session = self.session
        recv = sock.recv
        views = session.views_min
        for turn in range(RECV_BATCH):  # bounded, so results, timers and the other links get their turn
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
                    frames.append(frame.bytes if views is None or len(frame) < views else frame.buffer)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            self.unconfirmed = []
            if len(frames) < 3 or frames[0] != b"" or frames[1] not in wire.SIGNATURES:
                log.debug("ignored a message that is not FBW01 or FBW02 (%d frames)", len(frames))
                continue
            command = frames[2]
            if frames[1] == WORKER_SIGNATURE_V2 and not self.v2:
                log.info("the broker speaks FBW02: using it")
                self.use_protocol(True)
            if command == CMD_DISCONNECT:
                self.stats.disconnects += 1
                self.register_again()
                continue
            if not self.heard:
                # Not on DISCONNECT: a broker that keeps refusing us must meet the back-off.
                self.heard = True
                self.failures = 0
                log.info("connected to %s", self.address)
            if command == CMD_TASK and frames[1] == WORKER_SIGNATURE_V2:
                self.start_jobs(frames[3:])
            elif command == CMD_TASK:
                self.start_job(frames[3:])
            elif command == CMD_CANCEL:
                self.cancel(frames[3:])
            elif command != CMD_HEARTBEAT:
                self.stats.ignored += 1
                log.debug("ignored an unknown command %r", command)

    def start_job(self, body: List[bytes]) -> None:
        """An FBW01 TASK's body: [task id, payload frames...]."""
        if not body or len(body[0]) != TASK_ID_SIZE:
            self.stats.ignored += 1
            log.warning("ignored a TASK without a 16-byte task id")
            return
        self.session.start_job(self, bytes(body[0]), body[1:])

    def start_jobs(self, body: List[bytes]) -> None:
        """An FBW02 TASK: [payload frames..., header]; the header checked whole before
        any job starts."""
        jobs = wire.split_tasks(body)
        if jobs is None:
            self.stats.ignored += 1
            log.warning("ignored a TASK whose header does not match its %d frames", len(body))
            return
        for task_id, payload in jobs:
            self.session.start_job(self, task_id, payload)

    def cancel(self, body: List[bytes]) -> None:
        if len(body) != 1:
            self.stats.ignored += 1
            log.debug("ignored a CANCEL with %d body frames", len(body))
            return
        self.session.cancel(self, bytes(body[0]))


__all__ = ["Link"]
