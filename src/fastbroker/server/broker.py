"""The Broker: binds the three endpoints and runs a core's loop until stopped."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Dict, List, Optional, Tuple

import zmq

from fastbroker import _select, protocol, security
from fastbroker._common import (
    BrokerError,
    Closeable,
    ConfigError,
    check_count,
    check_heartbeat,
    check_max_extend,
    check_max_queue,
    check_retention,
    check_retention_bytes,
    check_timeout,
    check_tries,
    zmq_reason,
)
from fastbroker.protocol import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    DEFAULT_MAX_EXTEND,
    DEFAULT_RETENTION,
    DEFAULT_RETENTION_BYTES,
    MAX_CREDIT,
    MAX_LIVENESS,
    MIN_LIVENESS,
)
from fastbroker.server.disconnects import DisconnectWatch
from fastbroker.server.store import DEFAULT_SYNC
from fastbroker.server.store_files import AnyStore, open_store
from fastbroker.wakepipe import WakePipe

log = logging.getLogger("fastbroker.broker")

STORE_UPKEEP_INTERVAL = 10.0
"""Seconds between two rounds of store upkeep (WAL checkpoint, freeing pages)."""

LINGER_MS = 1000
"""How long closing the broker may wait to flush answers already handed to ZeroMQ."""

# High-water marks (messages per peer) of the three sockets (docs/PROTOCOL.md section 9).
# A receiving pipe at its mark never loses a message: libzmq stops reading that
# peer's connection until the broker catches up, so a flooding peer slows itself
# down instead of growing the broker. A sending pipe at its mark is where the
# socket type decides: see each constant.
REQUESTS_SNDHWM = 1000
"""Replies queued for one client. The requests ROUTER has ROUTER_MANDATORY: a reply to a
client whose pipe is full fails at once and is dropped, counted in `replies_dropped`
(one to a client that has gone: `replies_unroutable`), so a client that never reads
costs the broker at most this many replies, not one per request. fastbroker.Client
keeps at most `window` requests in flight (ACCEPTED and the outcome each), well below
it; an FBC01 client that loses an outcome anyway gets it back with RESULT (section
10.7)."""
REQUESTS_RCVHWM = 1000
"""Requests read ahead from one client before its connection is paused."""
WORKERS_SNDHWM = 2 * MAX_CREDIT + 1000
"""Messages queued for one worker. The workers ROUTER has ROUTER_MANDATORY: a send to
a full pipe fails (EAGAIN), and the core takes the worker for unreachable and re-queues
its job. A worker that reads never comes near it: it holds at most its credit of
TASKs (MAX_CREDIT at most), one CANCEL each, and the heartbeats of a few intervals;
only one that stopped reading reaches the mark, and is then rightly given up."""
WORKERS_RCVHWM = 1000
"""READY, ANSWER, FAILED and HEARTBEAT read ahead from one worker."""
ANSWERS_RCVHWM = 1000
"""Answers read ahead from one REQ/PUSH worker (it holds one job at a time)."""

MIN_MAX_MESSAGE = 1024
"""Smallest max_message accepted, so that the protocols' fixed frames (ids, options,
credit) always fit. A FAILED's text (up to 2000 characters) may be longer: the limit
should be above the largest answer and error text workers send."""
MAX_MAX_MESSAGE = 1 << 62


def check_max_message(limit: Optional[int]) -> Optional[int]:
    """None (no limit) or a number of bytes from MIN_MAX_MESSAGE to MAX_MAX_MESSAGE."""
    if limit is None:
        return None
    return check_count("max_message", limit, MIN_MAX_MESSAGE, MAX_MAX_MESSAGE)


def _bind(socket: zmq.Socket, address: str, role: str) -> str:
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind the {role} endpoint to {address!r}: {zmq_reason(exc)}") from None
    except (TypeError, UnicodeError, ValueError) as exc:
        raise ConfigError(f"cannot bind the {role} endpoint to {address!r}: {exc}") from None
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) and endpoint else address


# How each core event (protocol.EVENT_KINDS) is logged: message, and the name of its
# data in the record's extra fields (for --log-format json).
_EVENT_LINES = {
    "worker_joined": ("worker %s joined", "worker"),
    "worker_left": ("worker %s left (DISCONNECT)", "worker"),
    "worker_dead": ("worker %s dead (silent past liveness, or unreachable)", "worker"),
    "aborted": ("request with task id %s aborted after %d attempt(s): the client got the empty answer", "task_id"),
    "failed": ("request %s failed after %d attempt(s)", "request_id"),
    "timed_out": ("request %s timed out after %d attempt(s)", "request_id"),
}


def _log_event(kind: str, data: bytes, n: int) -> None:
    message, field = _EVENT_LINES.get(kind, (kind + " %s", "data"))
    extra: Dict[str, object] = {"event": kind, field: data.hex()}
    if field == "worker":
        log.info(message, data.hex(), extra=extra)
    else:
        extra["attempts"] = n
        log.info(message, data.hex(), n, extra=extra)


class Broker(Closeable):
    """Hands jobs to workers that ask for them, re-sends a job whose attempt
    outlives `timeout` seconds, and answers the client with an empty frame after
    `tries` failed attempts.

    The arguments follow the original 2010 broker: ``Broker(context, timeout,
    tries, requests_addr, workers_addr, answers_addr)``; ``context`` may be None.
    ``core`` picks "compiled" or "pure" (default: fastbroker's live core).
    ``heartbeat`` (seconds) and ``liveness`` (intervals) govern DEALER workers: the
    broker heartbeats them and takes one silent for ``liveness * heartbeat`` s for dead.
    ``retention`` (seconds) and ``retention_bytes`` bound how long and in how much
    memory finished FBC01 outcomes are kept for RESULT (docs/PROTOCOL.md section 10.6).
    ``max_queue`` bounds the requests waiting for a worker: beyond it a new request is
    refused at once (REJECTED "queue full"; a REQ client gets the empty answer).
    ``max_extend`` (seconds) is the most one EXTEND from a worker moves its attempt's
    deadline from now (docs/PROTOCOL.md section 4.13).
    ``max_message`` (bytes) is the largest frame a peer may send on any endpoint
    (ZMQ_MAXMSGSIZE): libzmq disconnects a peer that sends a larger one.
    ``curve_secret`` (the broker's secret key file) and ``authorized_keys`` (a
    directory of ``*.key`` public key files), given together, make every endpoint a
    CURVE server that lets in only those keys (fastbroker.security).
    ``store`` (a file path) keeps FBC01 and FBC02 requests and outcomes in a file: a
    request is ACCEPTED, and an outcome sent, only once stored, and on start the broker
    puts back what the store holds. ``store_format`` is a new file's ("log", the
    default, or "sqlite"; fastbroker.server.store_files); an existing one keeps its own.
    ``sync`` ("full", "normal", "off") says when it is synced to disk
    (fastbroker.server.store.SYNC_LEVELS says what each promises).
    """

    def __init__(
        self,
        context: Optional[zmq.Context],
        timeout: Optional[float],
        tries: Optional[int],
        requests_addr: str,
        workers_addr: str,
        answers_addr: str,
        *,
        core: Optional[str] = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        liveness: int = DEFAULT_LIVENESS,
        retention: float = DEFAULT_RETENTION,
        retention_bytes: int = DEFAULT_RETENTION_BYTES,
        max_queue: Optional[int] = None,
        max_extend: float = DEFAULT_MAX_EXTEND,
        max_message: Optional[int] = None,
        curve_secret: Optional[security.KeyPath] = None,
        authorized_keys: Optional[security.KeyPath] = None,
        store: Optional[str] = None,
        sync: str = DEFAULT_SYNC,
        store_format: Optional[str] = None,
    ) -> None:
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        heartbeat = check_heartbeat(heartbeat)
        liveness = check_count("liveness", liveness, MIN_LIVENESS, MAX_LIVENESS)
        retention = check_retention(retention)
        retention_bytes = check_retention_bytes(retention_bytes)
        max_queue = check_max_queue(max_queue)
        max_extend = check_max_extend(max_extend)
        self.max_message = check_max_message(max_message)
        if (curve_secret is None) != (authorized_keys is None):
            raise ConfigError("curve_secret and authorized_keys go together: give both or neither")
        # Key files are checked before anything is built, so a bad one leaves nothing to undo.
        self._curve = None if curve_secret is None else security.server_keys(curve_secret)
        if authorized_keys is not None:
            security.load_authorized_keys(authorized_keys)
        self._authenticator = None
        self._store: Optional[AnyStore] = None
        try:
            core_module = _select.resolve(core)
        except ImportError as exc:
            raise ConfigError(f"the {core} core is not available: {exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.core_name = core if core is not None else _select.core_name
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self._sockets: list[zmq.Socket] = []
        self._wake = WakePipe()
        self._stopping = threading.Event()
        self._not_running = threading.Event()
        self._not_running.set()
        self._closed = False
        # Set by the DisconnectWatch's thread: probe the workers in the loop's next turn.
        self._probe_due = False
        try:
            if store is not None:
                # First: a store that cannot be used must stop the broker before it binds.
                self._store = open_store(store, sync, store_format)
            if authorized_keys is not None:
                # Before any socket: a handshake must never find no ZAP handler (libzmq
                # would then let any CURVE key in).
                self._authenticator = security.start_authenticator(self.context, authorized_keys)
            requests = self._socket(zmq.ROUTER, REQUESTS_SNDHWM, REQUESTS_RCVHWM)
            workers = self._socket(zmq.ROUTER, WORKERS_SNDHWM, WORKERS_RCVHWM)
            # A job sent to a worker that has gone fails at once instead of
            # vanishing, and goes to the next idle worker.
            workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A reply that cannot go fails at its first frame, so the core counts it
            # (replies_dropped, replies_unroutable) instead of losing it unseen.
            requests.setsockopt(zmq.ROUTER_MANDATORY, 1)
            answers = self._socket(zmq.PULL, 0, ANSWERS_RCVHWM)
            self.endpoints: Tuple[str, str, str] = (
                _bind(requests, requests_addr, "requests"),
                _bind(workers, workers_addr, "workers"),
                _bind(answers, answers_addr, "answers"),
            )
            self._core = core_module.BrokerCore(
                requests,
                workers,
                answers,
                timeout,
                tries,
                heartbeat=heartbeat,
                liveness=liveness,
                retention=retention,
                retention_bytes=retention_bytes,
                max_queue=max_queue,
                max_extend=max_extend,
            )
            if self._store is not None:
                self._restore(retention)
        except BaseException:
            self.close()
            raise
        log.info(
            "broker on requests=%s workers=%s answers=%s (timeout=%s, tries=%s, heartbeat=%s, liveness=%s, core=%s)",
            *self.endpoints,
            timeout,
            tries,
            heartbeat,
            liveness,
            self.core_name,
        )
        if self._curve is not None or max_queue is not None or self.max_message is not None:
            log.info(
                "curve=%s, max_queue=%s, max_message=%s", "on" if self._curve else "off", max_queue, self.max_message
            )

    # -- the durable store ----------------------------------------------------------

    def _restore(self, retention: float) -> None:
        """Put back what the store holds, then journal every change from now on."""
        assert self._store is not None
        core = self._core
        core.journal(True)
        requests, outcomes = self._store.load()
        now = time.time()
        stale: List[tuple] = []
        for o in outcomes:
            age = now - o.finished
            if age < retention:
                core.restore_outcome(o.id, o.code, o.body, o.attempts, o.tries, age, o.payload, o.timeout)
            else:
                stale.append(("forget", o.id))
        used_up: List[tuple] = []
        for r in requests:
            if 0 <= r.tries <= r.attempts:
                # Its last attempt was in flight when the broker stopped: that was its
                # last try. Dead, so its payload stays for REQUEUE.
                core.restore_outcome(r.id, protocol.R_TIMED_OUT, [], r.attempts, r.tries, 0.0, r.payload, r.timeout)
                used_up.append(("finish", r.id, protocol.R_TIMED_OUT, [], r.attempts, r.tries, r.payload, r.timeout))
            else:
                core.restore_request(r.id, r.payload, r.timeout, r.tries, r.attempts)
        self._store.apply(stale + used_up + core.journal_take())
        if requests or outcomes:
            log.info(
                "store %s: restored %d queued request(s) (%d had been sent to a worker), %d outcome(s); "
                "%d out of tries (TIMED_OUT), %d outcome(s) past retention",
                self._store.path,
                len(requests) - len(used_up),
                sum(1 for r in requests if r.attempts) - len(used_up),
                len(outcomes) - len(stale),
                len(used_up),
                len(stale),
            )

    def _persist(self) -> None:
        """Store this turn's changes in one write (log) or transaction (SQLite), then
        let the held replies go."""
        store = self._store
        try:
            store.write_turn(self._core)  # type: ignore[union-attr]
        except (sqlite3.Error, OSError) as exc:
            # Nothing held is released: no client is told of what was not stored.
            raise BrokerError(f"store {store.path}: cannot write: {exc}") from None  # type: ignore[union-attr]
        self._core.release_held()

    def _socket(self, kind: int, sndhwm: int, rcvhwm: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        self._sockets.append(socket)
        socket.setsockopt(zmq.LINGER, LINGER_MS)
        if sndhwm:
            socket.setsockopt(zmq.SNDHWM, sndhwm)
        socket.setsockopt(zmq.RCVHWM, rcvhwm)
        if self.max_message is not None:
            socket.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        security.apply_curve(socket, self._curve)
        return socket

    @property
    def curve(self) -> bool:
        """Whether the endpoints are CURVE servers (authenticated and encrypted)."""
        return self._curve is not None

    @property
    def timeout(self) -> Optional[float]:
        return self._core.timeout

    @property
    def tries(self) -> Optional[int]:
        return self._core.tries

    @property
    def heartbeat(self) -> float:
        return self._core.heartbeat

    @property
    def liveness(self) -> int:
        return self._core.liveness

    @property
    def max_queue(self) -> Optional[int]:
        return self._core.max_queue

    @property
    def wake_fd(self) -> int:
        """Write end of the pipe that wakes the loop; fit for ``signal.set_wakeup_fd``."""
        return self._wake.write_fd

    def run(self) -> None:
        """Serve until stop() is called (from any thread or a signal handler)."""
        if self._closed:
            raise RuntimeError("the broker is closed")
        debug = log.isEnabledFor(logging.DEBUG)
        # With INFO on, the core keeps its events (workers joining, leaving, dying;
        # requests given up) and returns after a turn that had some, to log them.
        # With INFO off it keeps none and runs as before.
        events = log.isEnabledFor(logging.INFO)
        drops = self._core.stats()["drops"]
        if events:
            self._core.record_events(True)
        self._not_running.clear()
        next_upkeep = time.monotonic() + STORE_UPKEEP_INTERVAL
        watch = DisconnectWatch(self._sockets[1], self._on_disconnect)
        try:
            while not self._stopping.is_set():
                # The core returns on a wake-up (stop(), a signal), when debug logging
                # is on after a turn that dropped messages (to log them), and with a
                # store after every turn that changed something (to store it).
                wait = None
                if self._store is not None:
                    now = time.monotonic()
                    if now >= next_upkeep:
                        try:
                            self._store.maintain()
                        except sqlite3.Error as exc:
                            # SQLite's upkeep only bounds the files' size: nothing promised
                            # depends on it, so it is retried next time rather than stop.
                            log.warning("store %s: upkeep failed: %s", self._store.path, exc)
                        except OSError as exc:
                            # The log's is its sync: what failed to reach the disk may never
                            # (Linux forgets a failed write-back). Stop, as for a failed write.
                            raise BrokerError(f"store {self._store.path}: cannot sync: {exc}") from None
                        next_upkeep = now + STORE_UPKEEP_INTERVAL
                    wait = next_upkeep - now
                result = self._core.run(self._wake.read_fd, wait, debug, events)
                self._wake.drain()
                if self._probe_due:
                    # Before the flag is read again: a disconnection from now on probes again.
                    self._probe_due = False
                    # First what is waiting on the sockets: libzmq queues a peer's last
                    # messages before it reports the connection closed, so a worker that
                    # said DISCONNECT and closed is one that left, not one that died.
                    self._core.run(self._wake.read_fd, 0.0, debug, events)
                    self._core.probe_workers()
                if self._store is not None:
                    self._persist()
                # One turn may have had both drops and events: whichever stopped the
                # run, both are read (the drops by difference, so none is lost).
                if debug and result in (protocol.RUN_DROP, protocol.RUN_EVENT):
                    drops = self._log_new_drops(drops)
                if events:
                    self._log_events()
        finally:
            watch.close()
            if events:
                self._log_events()
                self._core.record_events(False)
            self._not_running.set()
        log.info("broker stopped: %s", self._summary())

    _events_lost = 0  # the core's events_lost counter when last warned about

    def _log_events(self) -> None:
        recorded = self._core.events()
        for kind, data, n in recorded:
            _log_event(kind, data, n)
        if len(recorded) >= protocol.EVENT_QUEUE:
            lost = self._core.stats()["events_lost"]
            if lost > self._events_lost:
                log.warning(
                    "%d event(s) not logged: more than %d in one turn", lost - self._events_lost, protocol.EVENT_QUEUE
                )
                self._events_lost = lost

    def _log_new_drops(self, before: dict) -> dict:
        after = self._core.stats()["drops"]
        for reason, count in after.items():
            if count > before.get(reason, 0):
                log.debug("dropped %d message(s): %s", count - before.get(reason, 0), reason)
        return after

    def step(self, max_wait: float = 0.0) -> None:
        """Serve for at most `max_wait` seconds (0: handle what is pending) and return."""
        deadline = time.monotonic() + max_wait
        while True:
            result = self._core.run(self._wake.read_fd, max(0.0, deadline - time.monotonic()), False)
            self._wake.drain()
            if self._store is None:
                return
            self._persist()
            if result != protocol.RUN_JOURNAL or time.monotonic() >= deadline:
                return

    def _on_disconnect(self) -> None:
        """A connection to the workers endpoint ended (DisconnectWatch's thread)."""
        self._probe_due = True
        self._wake.wake()

    def stop(self) -> None:
        """Make run() return; safe from other threads and signal handlers."""
        self._stopping.set()
        self._wake.wake()

    def stats(self) -> dict:
        """Counters since start (protocol.COUNTERS), gauges (protocol.GAUGES) and "drops"."""
        return self._core.stats()

    def inproc_endpoint(self) -> str:
        """An inproc endpoint of the requests socket, for clients in this process on
        ``self.context`` (the metrics server sends STATS there; inproc skips the
        network security of the other endpoints). Call it before run(): a socket
        must not be bound from another thread while the loop uses it."""
        endpoint = getattr(self, "_inproc", None)
        if endpoint is None:
            if self._closed or not self._not_running.is_set():
                raise RuntimeError("inproc_endpoint() must be called before run() and close()")
            endpoint = f"inproc://fastbroker-requests-{id(self):x}"
            self._sockets[0].bind(endpoint)
            self._inproc = endpoint
        return endpoint

    def _summary(self) -> str:
        s = self.stats()
        return ", ".join(f"{k}={s[k]}" for k in protocol.COUNTERS + protocol.GAUGES)

    def close(self) -> None:
        """Stop serving and release sockets; queued and running jobs are discarded."""
        if self._closed:
            return
        # The loop must be out of the core before its memory is released.
        self.stop()
        self._not_running.wait()
        self._closed = True
        core = getattr(self, "_core", None)
        if core is not None:
            # Workers told DISCONNECT reconnect and wait for a broker to come back.
            told = core.disconnect_workers()
            if told:
                log.info("sent DISCONNECT to %d worker(s)", told)
            if self._store is not None:
                try:
                    self._persist()
                except BrokerError as exc:
                    log.error("%s", exc)
            core.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        for socket in self._sockets:
            socket.close()
        if self._authenticator is not None:
            # Before term(): the handler's own sockets live in this context.
            self._authenticator.stop()
            self._authenticator = None
        if self._own_context:
            self.context.term()
        self._wake.close()
