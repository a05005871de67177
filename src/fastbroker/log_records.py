"""The log store's records in Python: journal entries written as records, and a log
read back into what it holds.

The layout (every constant) is protocol.py's "The store's log"; docs/ARCHITECTURE.md,
"The log store", says how the broker uses it. The compiled broker writes a turn's
records with core/journal.pxi's encode() instead of encode_entries(); both give the
same bytes (tests/test_log_store.py checks it). Records are read back here only, when
a store is opened or checked: never on the broker's hot path.
"""

from __future__ import annotations

import errno
import mmap
import re
import zlib
from struct import Struct
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from fastbroker.protocol import (
    JOURNAL_KINDS,
    LOG_ENTRY_SIZE,
    LOG_FINISH_SIZE,
    LOG_FORGET_SIZE,
    LOG_FRAME_HEAD,
    LOG_MAGIC,
    LOG_MAX_BODY,
    LOG_RECORD_HEAD,
    LOG_START_SIZE,
    LOG_SUBMIT_SIZE,
    REQUEST_ID_SIZE,
)

HEAD = Struct("<II")  # body length, CRC-32 of the body
ENTRY = Struct("<BBH16s")  # kind, reply code, zero, request id
SUBMIT = Struct("<BBH16sIidI")  # ENTRY, attempts, tries, timeout, frames
START = Struct("<BBH16sI")  # ENTRY, attempts
FINISH = Struct("<BBH16sIiddII")  # ENTRY, attempts, tries, timeout, finished, body frames, payload frames
FRAME = Struct("<I")
assert (HEAD.size, ENTRY.size, SUBMIT.size, START.size, FINISH.size, FRAME.size) == (
    LOG_RECORD_HEAD,
    LOG_ENTRY_SIZE,
    LOG_SUBMIT_SIZE,
    LOG_START_SIZE,
    LOG_FINISH_SIZE,
    LOG_FRAME_HEAD,
)
assert ENTRY.size == LOG_FORGET_SIZE and REQUEST_ID_SIZE == 16

K_SUBMIT, K_START, K_FINISH, K_FORGET = (JOURNAL_KINDS.index(k) for k in ("submit", "start", "finish", "forget"))


class LogDamage(ValueError):
    """A record in the middle of a log is not what was written (offset: where it starts)."""

    def __init__(self, offset: int, what: str) -> None:
        super().__init__(f"damaged record at byte {offset}: {what}")
        self.offset = offset


# -- writing ------------------------------------------------------------------------


def _record(parts: List[bytes]) -> bytes:
    body = b"".join(parts)
    if len(body) > LOG_MAX_BODY:
        raise OSError(errno.EFBIG, "a change of more than 4 GiB cannot be stored")
    return HEAD.pack(len(body), zlib.crc32(body)) + body


def _frame_parts(frames: Sequence[bytes], parts: List[bytes]) -> None:
    for frame in frames:
        parts.append(FRAME.pack(len(frame)))
        parts.append(bytes(frame))


def _seconds(timeout: Optional[float]) -> float:
    return -1.0 if timeout is None else float(timeout)


def encode_submit(
    rid: bytes, payload: Sequence[bytes], timeout: Optional[float], tries: int, attempts: int = 0
) -> bytes:
    parts = [SUBMIT.pack(K_SUBMIT, 0, 0, rid, attempts, tries, _seconds(timeout), len(payload))]
    _frame_parts(payload, parts)
    return _record(parts)


def encode_start(rid: bytes, attempts: int) -> bytes:
    return _record([START.pack(K_START, 0, 0, rid, attempts)])


def encode_finish(
    rid: bytes,
    code: int,
    body: Sequence[bytes],
    attempts: int,
    tries: int,
    payload: Sequence[bytes],
    timeout: Optional[float],
    finished: float,
) -> bytes:
    parts = [FINISH.pack(K_FINISH, code, 0, rid, attempts, tries, _seconds(timeout), finished, len(body), len(payload))]
    _frame_parts(body, parts)
    _frame_parts(payload, parts)
    return _record(parts)


def encode_forget(rid: bytes) -> bytes:
    return _record([ENTRY.pack(K_FORGET, 0, 0, rid)])


def encode_entries(entries: Iterable[tuple], now: float) -> bytes:
    """Journal entries (BrokerCore.journal_take's tuples) as records; every finish is
    stamped `now`. ValueError for an entry of an unknown kind."""
    out = []
    for entry in entries:
        kind = entry[0]
        if kind == "submit":
            _, rid, payload, timeout, tries = entry
            out.append(encode_submit(rid, payload, timeout, tries))
        elif kind == "start":
            out.append(encode_start(entry[1], entry[2]))
        elif kind == "finish":
            _, rid, code, body, attempts, tries, payload, timeout = entry
            out.append(encode_finish(rid, code[0], body, attempts, tries, payload, timeout, now))
        elif kind == "forget":
            out.append(encode_forget(entry[1]))
        else:
            raise ValueError(f"unknown journal entry {kind!r}")
    return b"".join(out)


# -- reading ------------------------------------------------------------------------


class LogRequest(NamedTuple):
    payload: List[bytes]
    timeout: Optional[float]
    tries: int
    attempts: int


class LogOutcome(NamedTuple):
    code: int
    body: List[bytes]
    attempts: int
    tries: int
    finished: float
    payload: Optional[List[bytes]]  # a dead request's (FAILED or TIMED_OUT), else None
    timeout: Optional[float]


class LogContents(NamedTuple):
    requests: Dict[bytes, LogRequest]  # in arrival order
    outcomes: Dict[bytes, LogOutcome]  # in the order written (oldest first)
    end: int  # bytes of whole records (the header included)
    torn: int  # bytes after them: an unfinished last write, ignored


def _frames(view: memoryview, offset: int, count: int, end: int) -> Tuple[List[bytes], int]:
    frames = []
    for _ in range(count):
        if offset + LOG_FRAME_HEAD > end:
            raise ValueError("frames run past the record")
        (size,) = FRAME.unpack_from(view, offset)
        offset += LOG_FRAME_HEAD
        if offset + size > end:
            raise ValueError("frames run past the record")
        frames.append(bytes(view[offset : offset + size]))
        offset += size
    return frames, offset


def decode_record(body: memoryview) -> tuple:
    """One record's body as a tuple: ("submit", id, payload frames, timeout (s or
    None), tries, attempts), ("start", id, attempts), ("finish", id, reply code, body
    frames, attempts, tries, payload frames, timeout (s or None), finished) or
    ("forget", id). ValueError if it is not a record as written."""
    size = len(body)
    if size < LOG_ENTRY_SIZE:
        raise ValueError("record too short")
    kind, code, _, rid = ENTRY.unpack_from(body, 0)
    if kind == K_SUBMIT and size >= LOG_SUBMIT_SIZE:
        _, _, _, _, attempts, tries, timeout, count = SUBMIT.unpack_from(body, 0)
        payload, at = _frames(body, LOG_SUBMIT_SIZE, count, size)
        if at == size:
            return ("submit", rid, payload, None if timeout < 0 else timeout, tries, attempts)
    elif kind == K_START and size == LOG_START_SIZE:
        return ("start", rid, START.unpack_from(body, 0)[4])
    elif kind == K_FINISH and size >= LOG_FINISH_SIZE:
        _, _, _, _, attempts, tries, timeout, finished, nbody, npayload = FINISH.unpack_from(body, 0)
        frames, at = _frames(body, LOG_FINISH_SIZE, nbody + npayload, size)
        if at == size:
            timeout = None if timeout < 0 else timeout
            return ("finish", rid, bytes([code]), frames[:nbody], attempts, tries, frames[nbody:], timeout, finished)
    elif kind == K_FORGET and size == LOG_FORGET_SIZE:
        return ("forget", rid)
    raise ValueError(f"not a record of kind {kind} as written")


def decode_entries(blob: bytes) -> List[tuple]:
    """The journal entries (BrokerCore.journal_take's tuples) that encode_entries(...,
    now) or BrokerCore.journal_encode made `blob` of. ValueError if it is not whole
    records as written."""
    view, offset, entries = memoryview(blob), 0, []
    while offset < len(view):
        if offset + LOG_RECORD_HEAD > len(view):
            raise ValueError("records cut short")
        size, crc = HEAD.unpack_from(view, offset)
        body = view[offset + LOG_RECORD_HEAD : offset + LOG_RECORD_HEAD + size]
        if len(body) < size or zlib.crc32(body) != crc:
            raise ValueError(f"record at byte {offset} cut short or not as written")
        entry = decode_record(body)
        entries.append(entry[:5] if entry[0] == "submit" else entry[:8] if entry[0] == "finish" else entry)
        offset += LOG_RECORD_HEAD + size
    return entries


def _apply(body: memoryview, requests: Dict[bytes, LogRequest], outcomes: Dict[bytes, LogOutcome]) -> None:
    """One record's change, as the SQLite store's apply() makes it."""
    entry = decode_record(body)
    kind, rid = entry[0], entry[1]
    if kind == "submit":
        if rid not in requests:  # a second SUBMIT of an id changes nothing
            _, _, payload, timeout, tries, attempts = entry
            requests[rid] = LogRequest(payload, timeout, tries, attempts)
    elif kind == "start":
        if rid in requests:
            requests[rid] = requests[rid]._replace(attempts=entry[2])
    elif kind == "finish":
        _, _, code, body_frames, attempts, tries, payload, timeout, finished = entry
        requests.pop(rid, None)
        outcomes.pop(rid, None)  # a replaced outcome moves to the end, as it finished last
        dead = payload if payload else None
        outcomes[rid] = LogOutcome(
            code[0], body_frames, attempts, tries, finished, dead, timeout if dead is not None else None
        )
    else:
        outcomes.pop(rid, None)


_BODY_START = re.compile(rb"[\x00-\x03].\x00\x00", re.DOTALL)
"""What a record's body starts with: a kind (JOURNAL_KINDS), a reply code, two zeros."""


def _last_nonzero(view: memoryview, start: int) -> int:
    """The offset just past the last byte that is not zero, from `start` on (start if none)."""
    end = len(view)
    while end > start:
        begin = max(start, end - (1 << 20))
        chunk = bytes(view[begin:end]).rstrip(b"\0")
        if chunk:
            return begin + len(chunk)
        end = begin
    return start


def whole_record_after(view: memoryview, start: int) -> Optional[int]:
    """The offset of a whole record (its length within the file, its checksum right)
    that starts after `start`, or None. Only where a record does not read as written:
    a whole record after it means damage, none an unfinished last write."""
    total = len(view)
    last = _last_nonzero(view, start + 1)
    for match in _BODY_START.finditer(view, start + 1 + LOG_RECORD_HEAD, last + LOG_RECORD_HEAD):
        offset = match.start() - LOG_RECORD_HEAD
        size, crc = HEAD.unpack_from(view, offset)
        end = offset + LOG_RECORD_HEAD + size
        if LOG_ENTRY_SIZE <= size and end <= total and zlib.crc32(view[offset + LOG_RECORD_HEAD : end]) == crc:
            return offset
    return None


def read_log(data: Union[bytes, mmap.mmap]) -> LogContents:
    """What a log holds (`data`: bytes, or a map of the file). A record that does not
    read as written (cut short by the end of the file, too short, its checksum wrong)
    with no whole record after it is an unfinished last write: left out and counted in
    `torn`. With a whole record after it, it is damage: LogDamage. A file that does not
    start with LOG_MAGIC: ValueError."""
    view = memoryview(data)
    if bytes(view[: len(LOG_MAGIC)]) != LOG_MAGIC:
        raise ValueError("not a fastbroker log store")
    requests: Dict[bytes, LogRequest] = {}
    outcomes: Dict[bytes, LogOutcome] = {}
    offset, total = len(LOG_MAGIC), len(view)
    while offset < total:
        wrong = ""
        if offset + LOG_RECORD_HEAD > total:
            wrong = "record head cut short"
        else:
            size, crc = HEAD.unpack_from(view, offset)
            end = offset + LOG_RECORD_HEAD + size
            if end > total:
                wrong = "record runs past the end of the file"
            elif size < LOG_ENTRY_SIZE:
                wrong = "record too short"
            elif zlib.crc32(view[offset + LOG_RECORD_HEAD : end]) != crc:
                wrong = "checksum mismatch"
        if wrong:
            if whole_record_after(view, offset) is not None:
                raise LogDamage(offset, wrong)
            break
        try:
            _apply(view[offset + LOG_RECORD_HEAD : end], requests, outcomes)
        except ValueError as exc:
            raise LogDamage(offset, str(exc)) from None
        offset = end
    return LogContents(requests, outcomes, offset, total - offset)
