"""The Worker base class, speaking the original protocol: REQ asks, PUSH answers."""

from __future__ import annotations

import logging
import threading
from typing import List, Optional, Sequence

import zmq

from fastbroker._common import BrokerError, Closeable

log = logging.getLogger("fastbroker.worker")

READY = b"requesting task"
"""What the worker sends to ask for a job (the broker accepts any one frame)."""


class Worker(Closeable):
    """Asks the broker for a job when it is ready, processes it, pushes the answer.

    Subclasses override ``process(data) -> bytes`` or
    ``process_multipart(frames) -> list of frames``. An exception raised there is
    logged and the job is left unanswered: the broker re-sends it when its
    attempt times out, as in the original. ``run()`` loops until ``stop()``.
    """

    class Error(BrokerError):
        """Raised for misuse of the Worker class."""

    poll_interval: float = 0.1
    """Seconds between checks of stop() while waiting for a job."""

    linger_ms: int = 5000
    """How long close() may wait to deliver answers already sent."""

    def __init__(self, context: Optional[zmq.Context], requests_addr: str, replies_addr: str) -> None:
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self.requests = self.context.socket(zmq.REQ)
        self.replies = self.context.socket(zmq.PUSH)
        # Closing must not drop a job the broker already sent us but also
        # must not hang forever on a vanished broker.
        self.requests.setsockopt(zmq.LINGER, 0)
        self.replies.setsockopt(zmq.LINGER, self.linger_ms)
        self.requests.connect(requests_addr)
        self.replies.connect(replies_addr)
        self._stop = threading.Event()
        self._not_running = threading.Event()
        self._not_running.set()
        self._asked = False  # a "ready" is outstanding on the REQ socket
        self._closed = False

    # -- to override ---------------------------------------------------------

    def process_multipart(self, frames: List[bytes]) -> Sequence[bytes]:
        """Process a job's payload frames; return the answer frames.
        By default, joins the frames and calls ``process``."""
        return [self.process(b"".join(frames))]

    def process(self, data: bytes) -> bytes:
        """Process a job's payload (frames joined); return the answer."""
        raise Worker.Error("override one of `process` or `process_multipart`")

    # -- the protocol ----------------------------------------------------------

    def request_and_process_task(self, timeout: Optional[float] = None) -> bool:
        """Ask for a job (unless already asked), wait for it, process it and send
        the answer. Waits at most `timeout` seconds (None: until a job or stop()).
        Returns True if an answer was sent."""
        if not self._asked:
            self.requests.send(READY)
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
