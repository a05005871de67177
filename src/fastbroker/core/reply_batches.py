"""core/reply_batches.py: ReplyBatches, the FBC02 replies of one loop turn, gathered per
client so that each client gets them in one REPLIES message (twin of
core/reply_batches.pxi).

Owns: one Batch per client replied to in this turn: its identity, the header records
and the body frames.
Touches: nothing else. ClientSide adds to it and sends it (flush_batches) at the start
of every loop turn, so no reply waits for more than the turn that made it.

Docs: docs/PROTOCOL.md section 12.
"""

from __future__ import annotations

from typing import List

from fastbroker.core import cdef
from fastbroker.protocol import MAX_BATCH, MAX_FRAMES


class Batch:
    """The replies of this turn to one client."""

    __slots__ = ("identity", "head", "body", "count")

    def __init__(self, identity: bytes) -> None:
        self.identity = identity
        self.head = bytearray()  # REPLY_RECORD_SIZE records
        self.body: list = []  # the records' body frames, in order
        self.count = 0  # records


class ReplyBatches:
    """Batches by client identity, in the order they were made."""

    __slots__ = ("b", "index")

    def __init__(self) -> None:
        self.b: List[Batch] = []
        self.index: dict = {}  # identity -> position in b

    @cdef
    def find(self, identity: bytes) -> int:
        """The index of identity's batch, made if needed."""
        i = self.index.get(identity)
        if i is None:
            i = self.index[identity] = len(self.b)
            self.b.append(Batch(identity))
        return i

    @cdef
    def full(self, i: int, nbody: int) -> bool:
        """Whether batch i cannot take a record with nbody frames: its message would go
        past MAX_BATCH records or MAX_FRAMES frames."""
        b = self.b[i]
        return bool(b.count) and (b.count == MAX_BATCH or len(b.body) + nbody + 3 > MAX_FRAMES)

    @cdef
    def add(self, i: int, code: bytes, cid: bytes, body: list) -> None:
        """One record (and its body frames) on batch i."""
        b = self.b[i]
        b.head += cid + code + len(body).to_bytes(2, "big")
        b.body.extend(body)
        b.count += 1

    @cdef
    def reset(self, i: int) -> None:
        """Batch i empty, kept for the rest of the turn."""
        b = self.b[i]
        b.head = bytearray()
        b.body = []
        b.count = 0

    @cdef
    def clear(self) -> None:
        """Every batch gone (the end of a turn, or close())."""
        self.b = []
        self.index = {}
