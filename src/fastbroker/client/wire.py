"""client/wire.py: whole messages in and out of a client's socket, in pyzmq calls (twin
of client/_wire.pyx, which does the same in one call per message, compiled).

The client's I/O loops (Client's thread) read and write whole messages, never a frame
alone; every frame is bytes.
"""

from __future__ import annotations

from typing import List

import zmq

from fastbroker._common import send_message as send_message  # the twins share the name

_NOBLOCK = zmq.NOBLOCK


def recv_messages(socket: zmq.Socket, limit: int) -> List[List[bytes]]:
    """Up to `limit` whole messages waiting in `socket`, without blocking (none: [])."""
    recv = socket.recv
    messages: List[List[bytes]] = []
    for _ in range(limit):
        # recv_multipart, cheaper: a Frame says whether more parts follow, without a
        # getsockopt(RCVMORE) per frame.
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            break
        frames = [frame.bytes]
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            frames.append(frame.bytes)
        messages.append(frames)
    return messages
