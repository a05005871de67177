"""The Broker: binds the three endpoints and runs a core's loop until stopped."""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

import zmq

from fastbroker import _common, _select
from fastbroker.wakepipe import WakePipe
from fastbroker._common import (
    DEFAULT_HEARTBEAT,
    DEFAULT_LIVENESS,
    DEFAULT_RETENTION,
    DEFAULT_RETENTION_BYTES,
    MAX_LIVENESS,
    MIN_LIVENESS,
    Closeable,
    ConfigError,
    check_count,
    check_heartbeat,
    check_max_queue,
    check_retention,
    check_retention_bytes,
    check_timeout,
    check_tries,
)

log = logging.getLogger("fastbroker.broker")

LINGER_MS = 1000
"""How long closing the broker may wait to flush answers already handed to ZeroMQ."""


def _bind(socket: zmq.Socket, address: str, role: str) -> str:
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind the {role} endpoint to {address!r}: {zmq.strerror(exc.errno)}") from None
    except (TypeError, UnicodeError, ValueError) as exc:
        raise ConfigError(f"cannot bind the {role} endpoint to {address!r}: {exc}") from None
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) and endpoint else address


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
    ) -> None:
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        heartbeat = check_heartbeat(heartbeat)
        liveness = check_count("liveness", liveness, MIN_LIVENESS, MAX_LIVENESS)
        retention = check_retention(retention)
        retention_bytes = check_retention_bytes(retention_bytes)
        max_queue = check_max_queue(max_queue)
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
        try:
            requests = self._socket(zmq.ROUTER)
            workers = self._socket(zmq.ROUTER)
            # A job sent to a worker that has gone fails at once instead of
            # vanishing, and goes to the next idle worker.
            workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
            answers = self._socket(zmq.PULL)
            self.endpoints: Tuple[str, str, str] = (
                _bind(requests, requests_addr, "requests"),
                _bind(workers, workers_addr, "workers"),
                _bind(answers, answers_addr, "answers"),
            )
            self._core = core_module.BrokerCore(
                requests, workers, answers, timeout, tries, heartbeat=heartbeat, liveness=liveness,
                retention=retention, retention_bytes=retention_bytes, max_queue=max_queue,
            )
        except BaseException:
            self.close()
            raise
        log.info(
            "broker on requests=%s workers=%s answers=%s (timeout=%s, tries=%s, heartbeat=%s, liveness=%s, core=%s)",
            *self.endpoints, timeout, tries, heartbeat, liveness, self.core_name,
        )

    def _socket(self, kind: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, LINGER_MS)
        self._sockets.append(socket)
        return socket

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
        drops = self._core.stats()["drops"]
        self._not_running.clear()
        try:
            while not self._stopping.is_set():
                # The core returns on a wake-up (stop(), a signal) and, when debug
                # logging is on, after a turn that dropped messages, to log them.
                result = self._core.run(self._wake.read_fd, None, debug)
                self._wake.drain()
                if result == _common.RUN_DROP:
                    drops = self._log_new_drops(drops)
        finally:
            self._not_running.set()
        log.info("broker stopped: %s", self._summary())

    def _log_new_drops(self, before: dict) -> dict:
        after = self._core.stats()["drops"]
        for reason, count in after.items():
            if count > before.get(reason, 0):
                log.debug("dropped %d message(s): %s", count - before.get(reason, 0), reason)
        return after

    def step(self, max_wait: float = 0.0) -> None:
        """Serve for at most `max_wait` seconds (0: handle what is pending) and return."""
        self._core.run(self._wake.read_fd, max_wait, False)
        self._wake.drain()

    def stop(self) -> None:
        """Make run() return; safe from other threads and signal handlers."""
        self._stopping.set()
        self._wake.wake()

    def stats(self) -> dict:
        """Counters since start (_common.COUNTERS), gauges (_common.GAUGES) and "drops"."""
        return self._core.stats()

    def _summary(self) -> str:
        s = self.stats()
        return ", ".join(f"{k}={s[k]}" for k in _common.COUNTERS + _common.GAUGES)

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
            core.close()
        for socket in self._sockets:
            socket.close()
        if self._own_context:
            self.context.term()
        self._wake.close()
