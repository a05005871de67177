"""Worker classes: subclass one and override ``process`` or ``process_multipart``.

- ``Worker``: the DEALER worker of the FBW01 protocol (heartbeats, reconnection,
  FAILED reports, credit, graceful hang-up). Its loop lives in ``fastbroker.worker.session``.
- ``ReqWorker``: the original protocol: REQ asks for a job, PUSH answers.
- ``WorkerBase``: what both share: the methods to override and ``Error``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List, Optional, Sequence, Union

import zmq

from fastbroker import _select, security
from fastbroker._common import (
    BrokerError,
    Closeable,
    ConfigError,
    check_count,
    check_heartbeat,
    check_seconds,
    zmq_reason,
)
from fastbroker.addresses import Addresses, split_addresses
from fastbroker.protocol import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    MAX_CREDIT,
    MAX_LIVENESS,
    MAX_REQUEST_TIMEOUT_MS,
    MIN_LIVENESS,
)
from fastbroker.wakepipe import WakePipe
from fastbroker.worker.session import WorkerStats

log = logging.getLogger("fastbroker.worker")

READY = b"requesting task"
"""What a ReqWorker sends to ask for a job (the broker accepts any one frame)."""


class WorkerBase(Closeable):
    """What every worker class shares: the job methods to override and ``Error``.

    Subclasses override ``process(data) -> bytes`` or
    ``process_multipart(frames) -> list of frames``.
    """

    class Error(BrokerError):
        """Raised for misuse of a worker class."""

    def process_multipart(self, frames: List[bytes]) -> Sequence[bytes]:
        """Process a job's payload frames; return the answer frames.
        By default, joins the frames and calls ``process`` (a lone frame as it came:
        ``bytes``, or a ``memoryview`` with ``Worker.zero_copy_min``); while this one is
        the worker's, the sessions call ``process`` themselves (running.direct_process)."""
        return [self.process(frames[0] if len(frames) == 1 else b"".join(frames))]

    def process(self, data: bytes) -> bytes:
        """Process a job's payload (frames joined); return the answer."""
        raise WorkerBase.Error("override one of `process` or `process_multipart`")

    def cancelled(self) -> bool:
        """Whether the client cancelled the job running in the calling thread.
        Always False here: only ``Worker`` (FBW01) is told of cancellations; a
        REQ/PUSH worker is not (its answer is dropped by the broker)."""
        return False

    # Every worker class runs until stopped; these are defined by each.
    def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def stopping(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class ReqWorker(WorkerBase):
    """The original protocol: asks the broker for a job on REQ when it is ready,
    processes it, pushes the answer on PUSH.

    An exception raised by ``process`` is logged and the job is left unanswered:
    the broker re-sends it when its attempt times out, as in the original.
    ``run()`` loops until ``stop()``.

    ``curve_server_key`` (the broker's public key file) and ``curve_secret`` (this
    worker's secret key file), given together, make both sockets CURVE clients of a
    broker run with ``curve_secret`` and ``authorized_keys`` (fastbroker.security).
    """

    poll_interval: float = 0.1
    """Seconds between checks of stop() while waiting for a job."""

    linger_ms: int = 5000
    """How long close() may wait to deliver answers already sent."""

    def __init__(
        self,
        context: Optional[zmq.Context],
        requests_addr: str,
        replies_addr: str,
        *,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
    ) -> None:
        self.requests_addr = requests_addr
        self.replies_addr = replies_addr
        self._curve = security.client_keys(curve_server_key, curve_secret)
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self._connect()
        self._stop = threading.Event()
        self._not_running = threading.Event()
        self._not_running.set()
        self._asked = False  # a "ready" is outstanding on the REQ socket
        self._closed = False

    def _connect(self) -> None:
        self.requests = self.context.socket(zmq.REQ)
        self.replies = self.context.socket(zmq.PUSH)
        # Closing must not drop a job the broker already sent us but also
        # must not hang forever on a vanished broker.
        self.requests.setsockopt(zmq.LINGER, 0)
        self.replies.setsockopt(zmq.LINGER, self.linger_ms)
        security.apply_curve(self.requests, self._curve)
        security.apply_curve(self.replies, self._curve)
        self.requests.connect(self.requests_addr)
        self.replies.connect(self.replies_addr)

    def configure(
        self,
        *,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
    ) -> ReqWorker:
        """Turn CURVE on before run() (both key files, or neither to change nothing);
        the sockets are made again with it. ConfigError for a bad key file."""
        if curve_server_key is None and curve_secret is None:
            return self
        if self._asked or not self._not_running.is_set():
            raise WorkerBase.Error("configure() must be called before run()")
        self._curve = security.client_keys(curve_server_key, curve_secret)
        # Nothing was sent on the old sockets yet: closing them loses nothing.
        self.requests.close(linger=0)
        self.replies.close(linger=0)
        self._connect()
        return self

    def request_and_process_task(self, timeout: Optional[float] = None) -> bool:
        """Ask for a job (unless already asked), wait for it, process it and send
        the answer. Waits at most `timeout` seconds (None: until a job or stop()).
        Returns True if an answer was sent."""
        if not self._asked:
            if not self._send_ready(timeout):
                return False
            self._asked = True
        task = self._wait_for_task(timeout)
        if task is None:
            return False
        self._asked = False
        if len(task) < 1:
            return False
        task_id, payload = task[0], task[1:]
        try:
            answer = [bytes(frame) for frame in self.process_multipart(payload)]
        except Exception:
            log.exception("job %s: processing failed; the broker will retry it after its timeout", task_id.hex())
            return False
        if not answer:
            log.error("job %s: process_multipart returned no frames; nothing sent", task_id.hex())
            return False
        if answer == [b""]:
            log.warning("job %s: the answer is one empty frame, which clients read as an abort", task_id.hex())
        self.replies.send_multipart([task_id] + answer)
        return True

    def _send_ready(self, timeout: Optional[float]) -> bool:
        """Send "ready" once the socket can take it, or give up at stop() or after
        `timeout`. A REQ socket with no connection blocks a send: libzmq drops the
        connection for good when its handshake fails (e.g. a CURVE server that does not
        know this worker), and a blocking send would then never return, not even to
        stop()."""
        remaining = timeout
        while not self._stop.is_set():
            try:
                self.requests.send(READY, zmq.NOBLOCK)
                return True
            except zmq.Again:
                pass
            step = self.poll_interval if remaining is None else min(self.poll_interval, remaining)
            self.requests.poll(int(step * 1000), zmq.POLLOUT)
            if remaining is not None:
                remaining -= step
                if remaining <= 0:
                    return False
        return False

    def _wait_for_task(self, timeout: Optional[float]) -> Optional[List[bytes]]:
        remaining = timeout
        while not self._stop.is_set():
            step = self.poll_interval if remaining is None else min(self.poll_interval, remaining)
            if self.requests.poll(int(step * 1000)):
                return self.requests.recv_multipart()
            if remaining is not None:
                remaining -= step
                if remaining <= 0:
                    return None
        return None

    def run(self) -> None:
        """Process jobs until stop() is called; the job in hand is finished first."""
        self._not_running.clear()
        try:
            while not self._stop.is_set():
                self.request_and_process_task()
        finally:
            self._not_running.set()

    def stop(self) -> None:
        """Make run() return once the current job, if any, is answered.
        Safe from other threads and signal handlers."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop, wait for run() (in any thread) to finish its job, close the sockets.
        Answers already sent are still delivered (within linger_ms)."""
        if self._closed:
            return
        self.stop()
        self._not_running.wait()
        self._closed = True
        self.requests.close()
        self.replies.close()
        if self._own_context:
            self.context.term()


def _check_reconnect_max(value: Optional[float]) -> Optional[float]:
    return None if value is None else check_seconds("reconnect_max", value)


class Worker(WorkerBase):
    """A DEALER worker speaking FBW01 on the broker's workers endpoint.

    ``run()`` runs the socket's I/O loop and ``process`` in up to ``credit``
    threads, so a long job never delays heartbeats. The loop is compiled and runs on a
    thread of its own without the GIL: a job that holds the GIL (pure-Python CPU work,
    or C code that never releases it) does not stop the heartbeats either (the
    pure-Python loop, under ``FASTBROKER_PURE=1``, needs the GIL for each). The
    worker tells the broker how many jobs it takes at once (``credit``, plus
    ``prefetch``: jobs it may hold waiting for a thread, 0 by default, for very short
    jobs, whose round trip to the broker would leave threads idle; a prefetched job's
    attempt timeout runs from when the broker sent it, wait included),
    heartbeats every ``heartbeat`` seconds, reconnects when the broker is silent
    for ``liveness`` heartbeats or says DISCONNECT, reports an exception raised
    by ``process`` as FAILED (the broker retries the job at once), and on
    ``stop()`` finishes and answers every job it holds before hanging up.

    ``replies_addr`` is accepted for signature compatibility with ReqWorker and
    unused: answers travel on the same socket.

    ``curve_server_key`` (the broker's public key file) and ``curve_secret`` (this
    worker's secret key file), given together, make its socket a CURVE client of a
    broker run with ``curve_secret`` and ``authorized_keys`` (fastbroker.security).

    **Cancellation.** When a client cancels a job, the broker sends CANCEL. A job
    not started yet is never run (the worker reports it FAILED ``Cancelled`` at
    once). A running one is not interrupted: ``self.cancelled()`` turns True in
    the job's thread, and a long job should poll it and return early or raise;
    whatever it returns or raises is reported as usual (the broker drops it)::

        for chunk in chunks:
            if self.cancelled():
                raise RuntimeError("cancelled")
    """

    linger_ms: int = 5000
    """How long the final close may wait to deliver the last answers and DISCONNECT."""

    stop_grace: float = 0.05
    """Seconds a stopping worker keeps listening after READY(0) for jobs the
    broker sent before reading it (the broker re-queues any it misses anyway)."""

    zero_copy_min: Optional[int] = None
    """Payload frames of at least this many bytes reach ``process_multipart`` (and
    ``process``, for a one-frame payload) as read-only ``memoryview``s of the received
    message, without a copy; None (the default): always ``bytes``. For large payloads
    whose job reads them without needing ``bytes``' methods (``numpy.frombuffer``,
    ``hashlib``, slicing). The compiled session sends answers of 64 KiB or more without a
    copy anyway (``running.ANSWER_ZERO_COPY_MIN``)."""

    def __init__(
        self,
        context: Optional[zmq.Context],
        requests_addr: Addresses,
        replies_addr: Optional[str] = None,
        *,
        credit: int = 1,
        prefetch: int = 0,
        heartbeat: float = DEFAULT_HEARTBEAT,
        liveness: int = DEFAULT_LIVENESS,
        reconnect_max: Optional[float] = None,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
        protocol: int = 2,
    ) -> None:
        self.brokers = split_addresses(requests_addr)
        """The brokers it serves: one, or several (one credit for all)."""
        self.requests_addr = self.brokers[0] if len(self.brokers) == 1 else ",".join(self.brokers)
        self.replies_addr = replies_addr
        self.protocol = 2
        self.credit = 1
        self.prefetch = 0
        self.heartbeat = DEFAULT_HEARTBEAT
        self.liveness = DEFAULT_LIVENESS
        self.reconnect_max: Optional[float] = None
        self.curve: Optional[security.CurveKeys] = None
        """The keys the session's sockets use (None: plain); see configure()."""
        self.configure(
            credit=credit,
            prefetch=prefetch,
            heartbeat=heartbeat,
            liveness=liveness,
            reconnect_max=reconnect_max,
            curve_server_key=curve_server_key,
            curve_secret=curve_secret,
            protocol=protocol,
        )
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        for broker in self.brokers:
            self._check_address(broker)
        # stop() may come from a signal handler or another thread while the
        # loop sleeps in poll: the pipe wakes it; pool threads use it too (one loop
        # serves every broker).
        self.wake_pipe = WakePipe()
        self._keep_wake_pipe = False
        self._stop = threading.Event()
        self._running = False
        self._not_running = threading.Event()
        self._not_running.set()
        self._closed = False
        self._link_stats = [WorkerStats() for _ in self.brokers]
        # The sessions of the current (or last) run(): stop() tells them, stats reads them.
        self._sessions: List[Any] = []
        # Per job thread: (task id, its session, its job number) while a job runs.
        self._job_local = threading.local()

    def _check_address(self, address: str) -> None:
        # Sockets are made by run(); a bad address must still fail here, where
        # the caller (e.g. the CLI) can report it, not in the middle of run().
        probe = self.context.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        error = None
        try:
            probe.connect(address)
        except zmq.ZMQError as exc:
            error = zmq_reason(exc)
        except (TypeError, UnicodeError, ValueError) as exc:
            error = str(exc)
        probe.close()  # before a term() of our own context, which waits for every socket
        if error is not None:
            self._release_context()
            raise ConfigError(f"cannot connect to {address!r}: {error}")

    def configure(
        self,
        *,
        credit: Optional[int] = None,
        prefetch: Optional[int] = None,
        heartbeat: Optional[float] = None,
        liveness: Optional[int] = None,
        reconnect_max: Optional[float] = None,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
        protocol: Optional[int] = None,
    ) -> Worker:
        """Change settings before run(); None leaves one unchanged. ConfigError if invalid.
        The two CURVE key files go together (both None: unchanged)."""
        if getattr(self, "_running", False):
            raise WorkerBase.Error("configure() must be called before run()")
        if credit is not None:
            self.credit = check_count("credit", credit, 1, MAX_CREDIT)
        if prefetch is not None:
            self.prefetch = check_count("prefetch", prefetch, 0, MAX_CREDIT)
        if self.credit + self.prefetch > MAX_CREDIT:
            raise ConfigError(f"credit + prefetch must be at most {MAX_CREDIT}, not {self.credit + self.prefetch}")
        if heartbeat is not None:
            self.heartbeat = check_heartbeat(heartbeat)
        if liveness is not None:
            self.liveness = check_count("liveness", liveness, MIN_LIVENESS, MAX_LIVENESS)
        if reconnect_max is not None:
            self.reconnect_max = _check_reconnect_max(reconnect_max)
        if curve_server_key is not None or curve_secret is not None:
            self.curve = security.client_keys(curve_server_key, curve_secret)
        if protocol is not None:
            if protocol not in (1, 2):
                raise ConfigError(f"protocol must be 1 (FBW01) or 2 (FBW02), not {protocol!r}")
            self.protocol = protocol
        return self

    def process_batch(self, items: List[bytes]) -> Sequence[Union[bytes, BaseException]]:
        """Optional, for code that can vectorise: process several jobs' payloads (each
        one's frames joined) at once; return one answer per item, in order, or an
        exception instance for an item that failed (that job is reported FAILED).
        If it raises, every job of the batch is reported FAILED.

        When a subclass defines it, it is called instead of ``process`` and
        ``process_multipart``, with the jobs the worker holds when a thread is free:
        at most ``credit + prefetch`` of them, never waiting for more (so use
        ``prefetch`` to have batches). ``cancelled()`` is False inside it: a cancelled
        job's answer is dropped by the broker."""
        raise NotImplementedError  # never called: only an override is used

    @property
    def batched(self) -> bool:
        """Whether this worker's class defines process_batch."""
        return type(self).process_batch is not Worker.process_batch

    def cancelled(self) -> bool:
        """True once the broker has sent CANCEL for the job running in the calling
        thread: its client cancelled it, and whatever it returns now is dropped.

        A method, not a property: it answers for the current job at each call, and
        is cheap enough (a lookup; the compiled session takes its job table's lock for
        it) to poll in a job's inner loop. Only
        meaningful in the thread running ``process``/``process_multipart`` (threads
        the job starts itself are not its thread); elsewhere it is False. The job
        decides what to do: return early or raise; either way the worker sends
        ANSWER or FAILED for it, which the broker needs to free the worker's credit.
        """
        job = getattr(self._job_local, "job", None)
        return job is not None and job[1].job_cancelled(job[2], job[0])

    def extend(self, seconds: float) -> None:
        """Tell the broker that the job running in the calling thread is alive: its
        attempt's deadline becomes `seconds` from now (at most the broker's
        ``max_extend``; an attempt without a timeout has no deadline to move). A long
        job calls it now and then, more often than its timeout; a job that stops
        calling it times out as before. Sent by the I/O loop, without waiting.
        ``Error`` outside the thread running ``process``/``process_multipart``
        (``process_batch`` included)."""
        job = getattr(self._job_local, "job", None)
        if job is None:
            raise WorkerBase.Error("extend() is for the thread running process() or process_multipart()")
        task_id, session, number = job
        session.request_extend(number, task_id, check_seconds("extend", seconds, 0.001, MAX_REQUEST_TIMEOUT_MS / 1000))

    @property
    def stats(self) -> WorkerStats:
        """Counters of this worker (jobs received/answered/failed, reconnects...); with
        several brokers, those of every connection summed (``protocol``: the lowest)."""
        for session in self._sessions:
            session.update_stats()
        if len(self._link_stats) == 1:
            return self._link_stats[0]
        return WorkerStats.total(self._link_stats)

    @property
    def wake_fd(self) -> int:
        """Write end of the pipe that wakes the loop; fit for ``signal.set_wakeup_fd``."""
        return self.wake_pipe.write_fd

    def run(self) -> None:
        """Serve jobs until stop(); then hang up gracefully and return."""
        if self._closed:
            raise WorkerBase.Error("the worker is closed")
        if self._running:
            raise WorkerBase.Error("run() is already running")
        self._running = True
        self._not_running.clear()
        try:
            for session in self._new_sessions():  # one, whatever the number of brokers
                session.run()
        finally:
            self._running = False
            self._not_running.set()

    def _new_sessions(self) -> List[Any]:
        """The sessions of one run(), listed for stop() and stats, from the compiled
        session module unless the pure one is asked for: one Session, which serves
        every broker (one loop, one job table, the credit exact across the brokers:
        docs/PROTOCOL.md 4.14)."""
        chosen, _ = _select.worker_session()
        self._sessions = chosen.open_sessions(self)
        if self.stopping:  # stop() came before the sessions were listed
            for session in self._sessions:
                session.request_stop()
        return self._sessions

    def stop(self) -> None:
        """Ask run() to hang up: READY(0), finish and answer the jobs held,
        DISCONNECT, return. Safe from other threads and signal handlers."""
        self._stop.set()
        for session in self._sessions:
            session.request_stop()
        self.wake()

    def wake(self) -> None:
        """Wake the I/O loop."""
        self.wake_pipe.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop, wait for run() (in any thread) to return, release the context and pipe."""
        if self._closed:
            return
        self.stop()
        self._not_running.wait()
        self._closed = True
        self._release_context()
        if self._keep_wake_pipe:
            return  # run() failed with jobs still running; they may still wake us
        self.wake_pipe.close()

    def _release_context(self) -> None:
        if self._own_context:
            self.context.term()


__all__ = ["WorkerBase", "ReqWorker", "Worker", "WorkerStats", "READY"]
