"""client/wire.py: whole messages in and out of a client's socket, in pyzmq calls (twin
of client/_wire.pyx, which does the same in one call per message, compiled).

The client's I/O loops (Client's thread) read and write whole messages, never a frame
alone; every frame is bytes.
"""

from __future__ import annotations

from typing import List, Sequence

import zmq

_NOBLOCK = zmq.NOBLOCK
_NOBLOCK_MORE = zmq.NOBLOCK | zmq.SNDMORE


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


def send_message(socket: zmq.Socket, frames: Sequence[bytes]) -> bool:
    """Send the message without blocking; False if the socket's queue is full (nothing
    sent: libzmq counts whole messages against the high-water mark, so only the first
    frame can meet it)."""
    send = socket.send
    try:
        for i in range(len(frames) - 1):
            send(frames[i], _NOBLOCK_MORE)
        send(frames[-1], _NOBLOCK)
    except zmq.Again:
        return False
    return True
