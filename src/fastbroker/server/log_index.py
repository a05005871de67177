"""server/log_index.py: LogIndex, the live records of an open log store (twin of
server/_log_index.pyx, same names and the same behaviour; _select.log_index() chooses).

A turn's records are written with one pwrite and indexed by request id: which SUBMIT
record each queued request has (and its attempts), which FINISH record each kept
outcome has. A compaction copies just those into a new file.

Owns: the two id maps and the file descriptor it writes, until compact() moves it.
Docs: docs/ARCHITECTURE.md, "The log store".
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Dict, List

from fastbroker.log_records import ENTRY, HEAD, K_FINISH, K_FORGET, K_START, K_SUBMIT, START, encode_start
from fastbroker.protocol import LOG_ENTRY_SIZE, LOG_RECORD_HEAD

COPY_BUFFER = 1 << 20
"""Bytes a compaction gathers before each write."""


def write_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)  # EINTR is retried by Python (PEP 475)
        view = view[n:]
        at += n


class LogIndex:
    """The live records of an open log: written with append(), copied with compact()."""

    __slots__ = ("fd", "end", "live", "reqs", "outs")

    def __init__(self, fd: int, end: int) -> None:
        self.fd = fd
        self.end = end  # the file's size: where the next record goes
        self.live = 0  # bytes of the live SUBMIT and FINISH records
        self.reqs: Dict[bytes, List[int]] = {}  # id -> [offset, length, attempts]
        self.outs: Dict[bytes, List[int]] = {}  # id -> [offset, length]

    @property
    def size(self) -> int:
        """Bytes in the file (the header included)."""
        return self.end

    @property
    def live_bytes(self) -> int:
        """Bytes of the records a compaction would keep (the START records it writes aside)."""
        return self.live

    @property
    def requests(self) -> int:
        return len(self.reqs)

    @property
    def outcomes(self) -> int:
        return len(self.outs)

    def load(self, start: int) -> None:
        """Index the records already in the file, from `start` (past its header) to its
        size: those that log_records.read_log read back whole. Nothing is written."""
        if self.end <= start:
            return
        with mmap.mmap(self.fd, self.end, mmap.MAP_SHARED, mmap.PROT_READ) as data:
            at = start
            while at < self.end:
                if self.end - at < LOG_RECORD_HEAD + LOG_ENTRY_SIZE:
                    raise ValueError("log records cut short")
                length = LOG_RECORD_HEAD + HEAD.unpack_from(data, at)[0]
                if length > self.end - at:
                    raise ValueError("log records cut short")
                self.index(data, at + LOG_RECORD_HEAD, at, length)
                at += length

    def append(self, blob: bytes) -> None:
        """Write records (encoded by the core's journal or log_records) at the end of the
        file, then index them. OSError if the write fails (nothing is indexed then);
        ValueError if blob is not whole records."""
        size, at, bounds = len(blob), 0, []
        while at < size:  # first check it all: nothing half-indexed
            if size - at < LOG_RECORD_HEAD + LOG_ENTRY_SIZE:
                raise ValueError("log records cut short")
            length = LOG_RECORD_HEAD + HEAD.unpack_from(blob, at)[0]
            if length > size - at:
                raise ValueError("log records cut short")
            bounds.append((at, length))
            at += length
        write_all(self.fd, blob, self.end)
        for at, length in bounds:
            self.index(blob, at + LOG_RECORD_HEAD, self.end + at, length)
        self.end += size

    def index(self, blob: Any, body: int, offset: int, length: int) -> None:
        """One record's change to the live set, as log_records.read_log makes it."""
        kind, _, _, rid = ENTRY.unpack_from(blob, body)
        if kind == K_SUBMIT:
            if rid not in self.reqs:  # a second SUBMIT of an id changes nothing
                attempts = START.unpack_from(blob, body)[4]
                self.reqs[rid] = [offset, length, attempts]
                self.live += length
        elif kind == K_START:
            slot = self.reqs.get(rid)
            if slot is not None:
                slot[2] = START.unpack_from(blob, body)[4]
        elif kind == K_FINISH:
            slot = self.reqs.pop(rid, None)
            if slot is not None:
                self.live -= slot[1]
            slot = self.outs.pop(rid, None)  # a replaced outcome moves to the end
            if slot is not None:
                self.live -= slot[1]
            self.outs[rid] = [offset, length]
            self.live += length
        elif kind == K_FORGET:
            slot = self.outs.pop(rid, None)
            if slot is not None:
                self.live -= slot[1]

    def compact(self, fd: int, start: int) -> int:
        """Copy the live records to fd from offset `start` (its header before it): the
        outcomes, then the requests, each in the order written, a request that started
        followed by a START with its attempts. Then fd is the file written and this one
        is no longer used. Returns the new size. OSError if a write fails: nothing
        changes then."""
        outs = sorted(self.outs.values(), key=lambda slot: slot[0])
        reqs = sorted(self.reqs.items(), key=lambda item: item[1][0])
        moved: List[tuple] = []
        at, live, buf = start, 0, bytearray()
        with mmap.mmap(self.fd, self.end, mmap.MAP_SHARED, mmap.PROT_READ) as old:
            for slot in outs:
                moved.append((slot, at))
                buf += old[slot[0] : slot[0] + slot[1]]
                at += slot[1]
                live += slot[1]
                if len(buf) >= COPY_BUFFER:
                    write_all(fd, bytes(buf), at - len(buf))
                    buf.clear()
            for rid, slot in reqs:
                moved.append((slot, at))
                buf += old[slot[0] : slot[0] + slot[1]]
                at += slot[1]
                live += slot[1]
                if slot[2] != START.unpack_from(old, slot[0] + LOG_RECORD_HEAD)[4]:
                    record = encode_start(rid, slot[2])
                    buf += record
                    at += len(record)
                if len(buf) >= COPY_BUFFER:
                    write_all(fd, bytes(buf), at - len(buf))
                    buf.clear()
        write_all(fd, bytes(buf), at - len(buf))
        for slot, offset in moved:  # written: now the index may point into the new file
            slot[0] = offset
        self.fd = fd
        self.end = at
        self.live = live
        return at
