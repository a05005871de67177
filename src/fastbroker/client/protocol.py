"""The client side of FBC01 and FBC02 (docs/PROTOCOL.md sections 10 and 12), without
any I/O.

Shared by ``fastbroker.Client`` (a thread owns the socket), ``fastbroker.AsyncClient``
(an asyncio task owns it) and the CLI: message encoding and decoding, the checks of
per-request options, and the encoders and decoders ``RequestBook`` (client/book.py,
client/_book.pyx), the record of what a client waits for, uses.
"""

from __future__ import annotations

import math
import os
import struct
import time
import uuid
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from fastbroker._common import BrokerError, ConfigError, check_count, check_seconds
from fastbroker.client.outcomes import (
    DeadLetters,
    DeadRequest,
    Rejected,
    Requeued,
    Status,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    UnknownRequest,
)
from fastbroker.protocol import (
    C_CANCEL,
    C_DEAD,
    C_REQUEUE,
    C_REQUEUE_ALL,
    C_RESULT,
    C_STATS,
    C_STATUS,
    C_SUBMIT,
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    DEAD_RECORD_SIZE,
    MAX_BATCH,
    MAX_DEAD_LIST,
    MAX_REQUEST_TIMEOUT_MS,
    MAX_REQUEST_TRIES,
    OPT_NO_ACK,
    PEER_MAX_FRAMES,
    R_ACCEPTED,
    R_CANCELLED,
    R_DEAD,
    R_FAILED,
    R_OK,
    R_REJECTED,
    R_REPLIES,
    R_REQUEUED,
    R_STATUS,
    R_TIMED_OUT,
    R_UNKNOWN,
    REJECT_REASONS,
    REPLY_RECORD_SIZE,
    REQUEST_ID_SIZE,
    STATE_DONE,
    STATE_QUEUED,
    STATE_RUNNING,
)

Payload = Union[bytes, Sequence[bytes]]

MAX_TIMEOUT_SECONDS = MAX_REQUEST_TIMEOUT_MS / 1000
CHECK_BATCH = 1000
"""Most RESULT queries one lazy-pirate round sends (the others wait for later rounds)."""
DEFAULT_WINDOW = 256
"""Requests a client keeps in flight at most (sent, outcome not yet received); the others
wait in the client. Each costs the broker at most two queued replies (ACCEPTED and the
outcome), so 256 stay well below the broker's REQUESTS_SNDHWM (1000) and a client that
reads never has a reply dropped, however many it submits."""
DEFAULT_WINDOW_BYTES = 32 << 20
"""Payload bytes a client keeps in flight at most (one request larger than this still
goes, alone)."""
MAX_WINDOW = 1 << 20
"""The largest window a client accepts (requests in flight)."""
SUBMIT_PAYLOAD_AT = 4
"""Index of the first payload frame of a SUBMIT message: [FBC01, SUBMIT, id, options, payload...]."""
PROTOCOLS = (1, 2)
"""The client protocols a client may speak: 1 is FBC01, 2 FBC02 (the default)."""
_DEFAULT_OPTIONS = bytes(9)  # an FBC02 record's flags, timeout and tries for an empty options frame


_OPTIONS = struct.Struct(">BII")
_U32 = struct.Struct(">I")
_STATES = {STATE_QUEUED: "queued", STATE_RUNNING: "running", STATE_DONE: "done"}
OUTCOME_KINDS = frozenset((R_OK, R_FAILED, R_TIMED_OUT, R_CANCELLED))
REPLY_NAMES = {
    R_ACCEPTED: "ACCEPTED",
    R_REJECTED: "REJECTED",
    R_OK: "OK",
    R_FAILED: "FAILED",
    R_TIMED_OUT: "TIMED_OUT",
    R_CANCELLED: "CANCELLED",
    R_UNKNOWN: "UNKNOWN",
    R_STATUS: "STATUS",
    R_DEAD: "DEAD",
    R_REQUEUED: "REQUEUED",
}
ADMIN_KINDS = frozenset((R_DEAD, R_REQUEUED, R_REJECTED, R_STATUS, R_UNKNOWN))
"""The replies that answer a dead-letter command (RequestBook.admin)."""


# -- options ---------------------------------------------------------------------------


class RequestDefaults:
    """What Client and AsyncClient share of their settings: the defaults of each
    request, and the options frame they make of them."""

    addresses: List[str]
    timeout: Optional[float]
    tries: Optional[int]
    ack: bool
    check_interval: float
    window: int
    window_bytes: int
    protocol: int

    def _set_defaults(
        self,
        timeout: Optional[float],
        tries: Optional[int],
        ack: bool,
        check_interval: float,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        protocol: int = 2,
    ) -> None:
        self.timeout = check_request_timeout(timeout)
        self.tries = check_request_tries(tries)
        self.ack = bool(ack)
        self.check_interval = check_seconds("check_interval", check_interval)
        self.window = check_count("window", window, 1, MAX_WINDOW)
        self.window_bytes = check_count("window_bytes", window_bytes, 1, 1 << 62)
        if protocol not in PROTOCOLS or isinstance(protocol, bool):
            raise ConfigError(f"protocol must be 1 (FBC01) or 2 (FBC02), not {protocol!r}")
        self.protocol = protocol
        self._made_options: Optional[Tuple[Optional[float], Optional[int], bool, bytes]] = None

    def _new_books(
        self,
        sends: Sequence[Callable[[List[bytes]], None]],
        deliver: Callable[[Any, Any, Optional[BaseException]], None],
        failover_after: float,
        on_pending: Optional[Callable[[], None]] = None,
    ) -> Tuple[Any, List[Any]]:
        """(the book the client calls, one RequestBook per broker): with one broker that
        book itself, with several a ShardedBook over them (client/shards.py). The
        RequestBook is the compiled one or its pure twin (_select.client_book())."""
        from fastbroker import _select  # the books build on this module

        RequestBook = _select.client_book()[0].RequestBook
        if len(sends) == 1:
            book = RequestBook(
                sends[0],
                deliver,
                self.check_interval,
                window=self.window,
                window_bytes=self.window_bytes,
                v2=self.protocol == 2,
                on_pending=on_pending,
            )
            return book, [book]
        from fastbroker.client.shards import ShardedBook  # it builds on this module

        sharded = ShardedBook(deliver, self.check_interval, failover_after, time.monotonic)
        for send in sends:
            sharded.add(
                RequestBook(
                    send,
                    deliver,
                    self.check_interval,
                    window=self.window,
                    window_bytes=self.window_bytes,
                    v2=self.protocol == 2,
                    on_pending=on_pending,
                )
            )
        return sharded, sharded.books

    def _map_window(self, window: Optional[int]) -> int:
        """A map's bound on what it has submitted and not yet yielded: `window`, checked;
        by default the client's window for each broker of its list (the window is per
        broker, so a list's map keeps each broker's batches as large as one broker's)."""
        if window is None:
            return min(self.window * len(self.addresses), MAX_WINDOW)
        return check_count("window", window, 1, MAX_WINDOW)

    def _options(self, timeout: Optional[float], tries: Optional[int]) -> bytes:
        if timeout is None and tries is None:
            # The client's defaults, encoded once (encode_options checks its arguments:
            # a microsecond a submit()); kept with what they were made of, in one
            # attribute, so that defaults changed since are seen.
            timeout, tries, ack = self.timeout, self.tries, self.ack
            made = self._made_options
            # The same objects, not equal ones: True == 1 would skip the check of a
            # default set to True since.
            if made is not None and made[0] is timeout and made[1] is tries and made[2] is ack:
                return made[3]
            options = encode_options(timeout, tries, ack)
            self._made_options = (timeout, tries, ack, options)
            return options
        return encode_options(
            self.timeout if timeout is None else timeout, self.tries if tries is None else tries, self.ack
        )


def check_request_timeout(timeout: Optional[float]) -> Optional[float]:
    """A valid per-request attempt timeout in seconds (None: the broker's), or ConfigError."""
    if timeout is None:
        return None
    if isinstance(timeout, bool):
        raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}")
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ConfigError(f"timeout must be above 0 and at most {MAX_TIMEOUT_SECONDS} seconds, not {timeout!r}")
    return seconds


def check_request_tries(tries: Optional[int]) -> Optional[int]:
    """A valid per-request number of tries (None: the broker's), or ConfigError."""
    if tries is None:
        return None
    if isinstance(tries, bool) or not isinstance(tries, int):
        raise ConfigError(f"tries must be a whole number, not {tries!r}")
    if not 1 <= tries <= MAX_REQUEST_TRIES:
        raise ConfigError(f"tries must be between 1 and {MAX_REQUEST_TRIES}, not {tries}")
    return tries


def encode_options(timeout: Optional[float] = None, tries: Optional[int] = None, ack: bool = True) -> bytes:
    """The SUBMIT options frame: empty when everything is the default, else 9 bytes."""
    timeout = check_request_timeout(timeout)
    tries = check_request_tries(tries)
    if timeout is None and tries is None and ack:
        return b""
    # At least 1 ms: 0 would mean "the broker's timeout".
    ms = 0 if timeout is None else min(MAX_REQUEST_TIMEOUT_MS, max(1, round(timeout * 1000)))
    return _OPTIONS.pack(0 if ack else OPT_NO_ACK, ms, tries or 0)


def check_request_id(request_id: Any) -> bytes:
    """A request id as 16 bytes; accepts bytes, a uuid.UUID, or its text (32 hex or hyphenated)."""
    if isinstance(request_id, uuid.UUID):
        return request_id.bytes
    if isinstance(request_id, (bytes, bytearray, memoryview)):
        value = bytes(request_id)
        if len(value) != REQUEST_ID_SIZE:
            raise ConfigError(f"a request id is {REQUEST_ID_SIZE} bytes, not {len(value)}")
        return value
    if isinstance(request_id, str):
        try:
            return uuid.UUID(request_id.strip()).bytes
        except ValueError:
            raise ConfigError(f"not a request id (32 hex digits or a uuid): {request_id!r}") from None
    raise ConfigError(f"a request id is 16 bytes or a uuid, not {type(request_id).__name__}")


ID_BATCH = 1024
"""Request ids drawn from the system's randomness at once (see new_request_id)."""
_fresh_ids: List[bytes] = []


def new_request_id() -> bytes:
    """A new request id: the 16 bytes of a random (version 4) uuid. They are drawn
    ID_BATCH at a time: os.urandom releases the GIL, and a thread that gives it up
    once per request must then wait for it behind the client's I/O thread (24 us a
    request in Client.map, measured, against 0.5 us for the call alone)."""
    try:
        return _fresh_ids.pop()  # atomic under the GIL, as is extend()
    except IndexError:
        pass
    block = os.urandom(16 * ID_BATCH)
    ids = []
    for at in range(0, len(block), 16):
        raw = block[at : at + 16]
        # The version (4) and variant (RFC 4122) bits, as uuid.uuid4() sets them.
        ids.append(raw[:6] + bytes([raw[6] & 0x0F | 0x40, raw[7], raw[8] & 0x3F | 0x80]) + raw[9:])
    _fresh_ids.extend(ids)
    return _fresh_ids.pop()


# A forked child must not hand out the ids its parent will.
os.register_at_fork(after_in_child=_fresh_ids.clear)


def payload_frames(payload: Payload) -> Tuple[List[bytes], bool]:
    """(frames, multipart): a bytes payload is one frame; a sequence is several (>= 1)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return [bytes(payload)], False
    if isinstance(payload, str):
        raise TypeError("a payload is bytes or a sequence of bytes, not str (encode it first)")
    frames = [bytes(frame) for frame in payload]
    if not frames:
        raise ValueError("a request needs at least one payload frame")
    return frames, True


# -- messages ----------------------------------------------------------------------------


def submit_message(request_id: bytes, options: bytes, frames: Sequence[bytes]) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_SUBMIT, request_id, options, *frames]


def status_message(request_id: bytes) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_STATUS, request_id]


def result_message(request_id: bytes) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_RESULT, request_id]


def cancel_message(request_id: bytes) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_CANCEL, request_id]


def stats_message(request_id: bytes) -> List[bytes]:
    """STATS (the id: any 16 bytes, echoed)."""
    return [CLIENT_SIGNATURE, C_STATS, request_id]


def dead_message(request_id: bytes, limit: int) -> List[bytes]:
    """DEAD: the dead-letter's count and its oldest `limit` requests (request_id: any
    16 bytes, echoed in the reply)."""
    return [CLIENT_SIGNATURE, C_DEAD, request_id, _U32.pack(limit)]


def requeue_message(request_id: bytes) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_REQUEUE, request_id]


def requeue_all_message(request_id: bytes) -> List[bytes]:
    return [CLIENT_SIGNATURE, C_REQUEUE_ALL, request_id]


def check_dead_limit(limit: int) -> int:
    """A valid DEAD limit: 0 (the count only) to MAX_DEAD_LIST, or ConfigError."""
    return check_count("limit", limit, 0, MAX_DEAD_LIST)


def dead_result(reply: Reply) -> DeadLetters:
    """What a DEAD command's reply says (BrokerError if it is not a DEAD reply)."""
    if reply.kind != R_DEAD:
        raise BrokerError(f"the broker answered DEAD with {reply.name}")
    return reply.info


def requeue_result(reply: Reply) -> bool:
    """What a REQUEUE command's reply says: True, queued again; False, the broker has
    no dead request of that id (unknown, queued, running, or done otherwise); Rejected
    when the broker's queue is full."""
    if reply.kind == R_REQUEUED:
        return True
    if reply.kind == R_REJECTED and reply.error is not None:
        raise reply.error
    return False


def requeue_all_result(reply: Reply) -> Requeued:
    """What a REQUEUE_ALL command's reply says."""
    if reply.kind != R_REQUEUED:
        raise BrokerError(f"the broker answered REQUEUE_ALL with {reply.name}")
    return reply.info


_DEAD_RECORD = struct.Struct(">16sBIIIIH")
assert _DEAD_RECORD.size == DEAD_RECORD_SIZE


def decode_dead(body: Sequence[bytes]) -> Optional[DeadLetters]:
    """A DEAD reply's body [total, header, (type, message) per record], or None if
    malformed."""
    if len(body) < 2 or len(body[0]) != 4 or len(body[1]) % DEAD_RECORD_SIZE:
        return None
    count = len(body[1]) // DEAD_RECORD_SIZE
    if len(body) != 2 + 2 * count:
        return None
    requests = []
    for k in range(count):
        rid, code, attempts, tries, age_ms, size, frames = _DEAD_RECORD.unpack_from(body[1], k * DEAD_RECORD_SIZE)
        if bytes([code]) not in (R_FAILED, R_TIMED_OUT):
            return None
        requests.append(
            DeadRequest(
                rid,
                "failed" if bytes([code]) == R_FAILED else "timed_out",
                _text(body[2 + 2 * k]),
                _text(body[3 + 2 * k]),
                attempts,
                tries or None,
                age_ms / 1000.0,
                size,
                frames,
            )
        )
    return DeadLetters(_U32.unpack(body[0])[0], requests)


class Reply(NamedTuple):
    """A decoded broker reply. ``frames``: the body after the id (OK: the answer
    frames); ``status``: for STATUS and UNKNOWN; ``error``: the exception a
    non-OK outcome or REJECTED stands for."""

    request_id: bytes
    kind: bytes
    frames: List[bytes]
    status: Optional[Status] = None
    error: Optional[BrokerError] = None
    info: Any = None  # DEAD: DeadLetters; REQUEUED: Requeued

    @property
    def name(self) -> str:
        return REPLY_NAMES.get(self.kind, "?")

    @property
    def is_outcome(self) -> bool:
        return self.kind in OUTCOME_KINDS


def _cancelled_reply(request_id: bytes) -> Reply:
    return Reply(request_id, R_CANCELLED, [], error=TaskCancelled("the request was cancelled"))


def _text(frame: bytes) -> str:
    return frame.decode("utf-8", "replace")


def decode_reply(frames: Sequence[bytes]) -> Optional[Reply]:
    """The reply in ``[FBC01, kind, id, body...]`` (as a DEALER receives it), or None
    when it is not a well-formed FBC01 reply."""
    if len(frames) < 3 or frames[0] != CLIENT_SIGNATURE or len(frames[2]) != REQUEST_ID_SIZE:
        return None
    kind, request_id, body = bytes(frames[1]), bytes(frames[2]), [bytes(f) for f in frames[3:]]
    if kind == R_OK:
        return Reply(request_id, kind, body) if body else None
    if kind == R_FAILED:
        type_name = _text(body[0]) if body else "Exception"
        message = _text(body[1]) if len(body) > 1 else ""
        return Reply(request_id, kind, body, error=TaskFailed(type_name, message))
    if kind == R_TIMED_OUT:
        return Reply(request_id, kind, body, error=TaskTimedOut("every attempt of the request timed out"))
    if kind == R_CANCELLED:
        return Reply(request_id, kind, body, error=TaskCancelled("the request was cancelled"))
    if kind == R_UNKNOWN:
        return Reply(
            request_id,
            kind,
            body,
            status=Status("unknown"),
            error=UnknownRequest(f"the broker does not know request {request_id.hex()}"),
        )
    if kind == R_ACCEPTED:
        return Reply(request_id, kind, body)
    if kind == R_REJECTED:
        code = body[0][0] if body and body[0] else 0
        reason = _text(body[1]) if len(body) > 1 and body[1] else REJECT_REASONS.get(code, "rejected")
        return Reply(request_id, kind, body, error=Rejected(code, reason))
    if kind == R_STATUS:
        # Three frames (unlike the options, one frame of 9 bytes).
        if len(body) != 3 or len(body[0]) != 1 or len(body[1]) != 4 or len(body[2]) != 4:
            return None
        state, attempt, tries = body[0][0], _U32.unpack(body[1])[0], _U32.unpack(body[2])[0]
        if state not in _STATES:
            return None
        return Reply(request_id, kind, body, status=Status(_STATES[state], attempt, tries or None))
    if kind == R_DEAD:
        dead = decode_dead(body)
        return None if dead is None else Reply(request_id, kind, body, info=dead)
    if kind == R_REQUEUED:
        if len(body) != 2 or len(body[0]) != 4 or len(body[1]) != 4:
            return None
        return Reply(request_id, kind, body, info=Requeued(_U32.unpack(body[0])[0], _U32.unpack(body[1])[0]))
    return None


def submit_batch_messages(records: Iterable[Tuple[bytes, bytes, Sequence[bytes]]]) -> List[List[bytes]]:
    """FBC02 SUBMIT messages for (id, FBC01 options frame, payload frames) records: as few
    as MAX_BATCH records and PEER_MAX_FRAMES frames a message allow, in order."""
    messages: List[List[bytes]] = []
    header = bytearray()
    frames: List[bytes] = []
    count = 0
    for request_id, options, payload in records:
        # [signature, SUBMIT, header] and the payloads' frames.
        if count and (count == MAX_BATCH or len(frames) + len(payload) + 3 > PEER_MAX_FRAMES):
            messages.append([CLIENT_SIGNATURE_V2, C_SUBMIT, bytes(header), *frames])
            header, frames, count = bytearray(), [], 0
        # A record is the id, the FBC01 options' 9 bytes and the payload's frame count.
        header += request_id
        header += options or _DEFAULT_OPTIONS
        header += len(payload).to_bytes(2, "big")
        frames.extend(payload)
        count += 1
    if count:
        messages.append([CLIENT_SIGNATURE_V2, C_SUBMIT, bytes(header), *frames])
    return messages


_REPLY_RECORD = struct.Struct(">16scH")  # an FBC02 REPLIES header record: id, reply code, body frames


def reply_records(frames: Sequence[bytes]) -> Optional[List[Tuple[bytes, bytes, int]]]:
    """The header records of an FBC02 REPLIES message ``[FBC02, REPLIES, header,
    body...]`` (as a DEALER receives it): (id, reply code, body frames) each, the bodies
    following one another from frame 3; None when the header does not match its frames."""
    if len(frames) < 3 or frames[0] != CLIENT_SIGNATURE_V2 or frames[1] != R_REPLIES:
        return None
    header = frames[2]
    if not header or len(header) % REPLY_RECORD_SIZE:
        return None
    records = list(_REPLY_RECORD.iter_unpack(header))
    if sum([record[2] for record in records]) != len(frames) - 3:
        return None
    return records


def decode_replies(frames: Sequence[bytes]) -> Optional[List[Reply]]:
    """The replies of an FBC02 REPLIES message ``[FBC02, REPLIES, header, body...]`` (as
    a DEALER receives it), or None when its header does not match its frames. A record
    that is not a well-formed reply is left out."""
    records = reply_records(frames)
    if records is None:
        return None
    replies: List[Reply] = []
    at = 3
    for request_id, kind, n in records:
        # The two replies of every request, decoded here; the others as FBC01 replies.
        if kind == R_OK and n:
            reply: Optional[Reply] = Reply(request_id, kind, [bytes(f) for f in frames[at : at + n]])
        elif kind == R_ACCEPTED and not n:
            reply = Reply(request_id, kind, [])
        else:
            reply = decode_reply([CLIENT_SIGNATURE, kind, request_id, *frames[at : at + n]])
        at += n
        if reply is not None:
            replies.append(reply)
    return replies


def replies_of(frames: Sequence[bytes]) -> List[Reply]:
    """Every well-formed reply in a message a client receives, FBC01 or FBC02 (for
    tools that watch a client's socket: the chaos benchmark, the crash tests)."""
    if frames and frames[0] == CLIENT_SIGNATURE_V2:
        return decode_replies(frames) or []
    reply = decode_reply(frames)
    return [] if reply is None else [reply]


def describe_outcome(reply: Reply) -> str:
    """One line for people: "ok", "failed: ValueError: bad", "timed out", "cancelled", "unknown"..."""
    if reply.kind == R_OK:
        return "ok"
    if reply.kind == R_FAILED:
        return f"failed: {reply.error}"
    if reply.kind == R_TIMED_OUT:
        return "timed out"
    if reply.kind == R_CANCELLED:
        return "cancelled"
    if reply.status is not None:
        return reply.status.describe()
    if reply.kind == R_REJECTED:
        return f"rejected: {reply.error}"
    return reply.name.lower()


def request_once(
    socket: Any, message: List[bytes], request_id: bytes, wait: float, clock: Callable[[], float] = time.monotonic
) -> Optional[Reply]:
    """Send `message` on a connected DEALER socket and return the first well-formed
    reply about `request_id` other than ACCEPTED within `wait` seconds (None if
    none came): for one-shot commands (the CLI's status and cancel)."""
    socket.send_multipart(message)
    deadline = clock() + wait
    while True:
        remaining = deadline - clock()
        if remaining <= 0 or not socket.poll(max(1, int(remaining * 1000))):
            return None
        reply = decode_reply(socket.recv_multipart())
        if reply is not None and reply.request_id == request_id and reply.kind != R_ACCEPTED:
            return reply


def iter_with_len(iterable: Iterable[Any]) -> Tuple[Iterable[Any], Optional[int]]:
    """(iterable, its length if it has one)."""
    try:
        return iterable, len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return iterable, None


class Progress:
    """A one-line progress bar on a text stream: ``done/total  rate/s`` (redrawn
    at most every `interval` seconds, and once at the end)."""

    def __init__(
        self, stream: Any, total: Optional[int], interval: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.total = total
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.start = clock()
        self._drawn = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._drawn >= self.interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            width = 30
            filled = int(width * min(self.done, self.total) / self.total)
            line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        else:
            line = f"{self.done}"
        try:
            self.stream.write(f"\r{line}  {rate:,.1f}/s ")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not break the results

    def close(self) -> None:
        self._draw(self.clock())
        try:
            self.stream.write("\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


__all__ = [
    "CHECK_BATCH",
    "DEFAULT_WINDOW",
    "DEFAULT_WINDOW_BYTES",
    "MAX_TIMEOUT_SECONDS",
    "Payload",
    "Progress",
    "Reply",
    "cancel_message",
    "check_request_id",
    "check_request_timeout",
    "check_request_tries",
    "decode_reply",
    "describe_outcome",
    "encode_options",
    "new_request_id",
    "payload_frames",
    "request_once",
    "result_message",
    "status_message",
    "submit_message",
]
