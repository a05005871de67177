"""A client for the original request protocol: a REQ socket, one request at a time."""

from __future__ import annotations

from typing import List, Optional, Union

import zmq

from fastbroker._common import BrokerError, Closeable

Payload = Union[bytes, List[bytes]]


class TaskAborted(BrokerError):
    """The broker gave up on the request after its last try (the empty answer)."""


class ReqClient(Closeable):
    """Sends a request and waits for its answer, as a plain REQ client of the
    original broker would. ``timeout`` (seconds) bounds each wait; when it passes,
    the socket is replaced (a REQ socket cannot send twice) and TimeoutError is
    raised — the request may still run on a worker."""

    def __init__(self, address: str, context: Optional[zmq.Context] = None, *, timeout: Optional[float] = None) -> None:
        self.address = address
        self.timeout = timeout
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        return socket

    def request_multipart(self, frames: List[bytes]) -> List[bytes]:
        """Send payload frames; return the answer frames. TaskAborted on the empty answer."""
        if not frames:
            raise ValueError("a request needs at least one frame")
        self._socket.send_multipart(frames)
        if self.timeout is not None and not self._socket.poll(int(self.timeout * 1000)):
            self._socket.close()
            self._socket = self._connect()
            raise TimeoutError(f"no answer from {self.address} within {self.timeout} s")
        answer = self._socket.recv_multipart()
        if answer == [b""]:
            raise TaskAborted("the broker gave up on the request after its last try")
        return answer

    def request(self, payload: bytes) -> bytes:
        """Send one payload frame; return the answer's frames joined."""
        return b"".join(self.request_multipart([payload]))

    def close(self) -> None:
        self._socket.close()
        if self._own_context:
            self.context.term()
