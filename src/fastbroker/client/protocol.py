"""The client side of FBC01 and FBC02 (docs/PROTOCOL.md sections 10 and 12), without
any I/O.

Shared by ``fastbroker.Client`` (a thread owns the socket), ``fastbroker.AsyncClient``
(an asyncio task owns it) and the CLI: message encoding and decoding, the checks of
per-request options, and ``RequestBook``, the record of what a client waits for and
the lazy pirate that keeps it alive across a lost broker (section 10.7). The book
never touches a socket: it is given a ``send`` function and a ``deliver`` function,
so both clients drive the same logic from their own loop.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

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
    MAX_FRAMES,
    MAX_REQUEST_TIMEOUT_MS,
    MAX_REQUEST_TRIES,
    OPT_NO_ACK,
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

log = logging.getLogger("fastbroker.client")

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

    def _new_books(
        self,
        sends: Sequence[Callable[[List[bytes]], None]],
        deliver: Deliver,
        failover_after: float,
        on_pending: Optional[Callable[[], None]] = None,
    ) -> Tuple[Any, List[RequestBook]]:
        """(the book the client calls, one RequestBook per broker): with one broker that
        book itself, with several a ShardedBook over them (client/shards.py)."""
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
                    sharded.deliver_from,
                    self.check_interval,
                    window=self.window,
                    window_bytes=self.window_bytes,
                    v2=self.protocol == 2,
                    on_pending=on_pending,
                )
            )
        return sharded, sharded.books

    def _options(self, timeout: Optional[float], tries: Optional[int]) -> bytes:
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
    as MAX_BATCH records and MAX_FRAMES frames a message allow, in order."""
    messages: List[List[bytes]] = []
    header = bytearray()
    frames: List[bytes] = []
    count = 0
    for request_id, options, payload in records:
        if count and (count == MAX_BATCH or len(frames) + len(payload) + 3 > MAX_FRAMES):
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


# -- the book of a client's requests -----------------------------------------------------

Deliver = Callable[[Any, Any, Optional[BaseException]], None]
"""deliver(future, value, exception): resolve a future (in the client's own way)."""


class _Sink:
    __slots__ = ("future", "multipart")

    def __init__(self, future: Any, multipart: bool) -> None:
        self.future = future
        self.multipart = multipart


def _payload_size(message: Optional[List[bytes]]) -> int:
    return 0 if message is None else sum(map(len, message[SUBMIT_PAYLOAD_AT:]))


class _Entry:
    """An id this client waits for an outcome of."""

    __slots__ = ("message", "sinks", "accepted", "cancelling", "sent", "checked", "size", "batched")

    def __init__(self, message: Optional[List[bytes]]) -> None:
        # The SUBMIT message, kept to submit it again if the broker loses it;
        # None for an id only watched with RESULT (it cannot be re-submitted).
        self.message = message
        self.sinks: List[_Sink] = []
        self.accepted = False
        self.cancelling = False
        self.sent = False  # in the window: its SUBMIT (or RESULT) has gone to the broker
        self.checked = False  # the lazy pirate asked the broker for it
        self.size = _payload_size(message)  # payload bytes it holds in the window
        self.batched = False  # its SUBMIT last went in an FBC02 batch


class RequestBook:
    """What a client waits for, and what it does with each reply.

    Only the client's I/O loop calls it (never two threads at once). ``send(frames)``
    sends a message to the broker; ``deliver(future, value, exc)`` resolves a future.
    The loop calls ``on_message`` for every message received and ``tick()`` at
    least every ``check_interval`` seconds (``next_check()`` says when it is due).

    Flow control: at most ``window`` requests, and ``window_bytes`` of payload, are in
    flight (sent, outcome not received); the others are held here in submission order
    and sent as outcomes come back. So the broker holds at most two replies per request
    in flight for this client and never has to drop one at its high-water mark.

    With ``v2`` (FBC02), SUBMITs are not sent one by one: the requests that enter the
    window are gathered and ``flush_submits()``, which the loop calls once per turn,
    sends them as few FBC02 SUBMIT messages (one request alone as an FBC01 SUBMIT: the
    same to the broker, and cheaper); ``on_pending()`` is called when the first one
    waits, for a loop that must be told. Against a broker that does not speak FBC02 (it
    drops those messages), the first UNKNOWN for a request sent in a batch and never
    acknowledged, before anything FBC02 came from it, turns the book to FBC01 for good
    (``v2`` False) and submits again.
    """

    def __init__(
        self,
        send: Callable[[List[bytes]], None],
        deliver: Deliver,
        check_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_batch: int = CHECK_BATCH,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        v2: bool = False,
        on_pending: Optional[Callable[[], None]] = None,
    ) -> None:
        self._send = send
        self._deliver = deliver
        self.check_interval = check_interval
        self._clock = clock
        self._check_batch = check_batch
        self.window = window
        self.window_bytes = window_bytes
        self._entries: Dict[bytes, _Entry] = {}
        # The ids in flight, insertion-ordered: the lazy pirate checks those at the
        # front and moves them to the back, so every round reaches the next ones.
        self._in_flight: Dict[bytes, None] = {}
        self.in_flight_bytes = 0
        # The ids held back by the window, oldest first (an id forgotten meanwhile is
        # skipped when its turn comes).
        self._held: Deque[bytes] = deque()
        self._queries: Dict[bytes, Deque[Any]] = {}
        self._admin: Dict[bytes, Deque[Any]] = {}  # dead-letter commands waiting for their reply
        self._quiet_since = clock()
        self._heard = self._quiet_since  # the last message from the broker (or the start of a wait)
        self.resubmitted = 0
        """Requests submitted again after the broker said UNKNOWN (the lazy pirate)."""
        self.checks = 0
        """RESULT queries the lazy pirate sent."""
        self.refetched = 0
        """Outcomes received after the lazy pirate asked for them (lost or late replies)."""
        self.v2 = v2
        """Whether SUBMITs go as FBC02 batches (False: FBC01, asked for or fallen back to)."""
        self.heard_v2 = False
        """Whether the broker has sent an FBC02 message: it speaks FBC02."""
        self._pending: List[bytes] = []  # FBC02: ids to SUBMIT at the next flush_submits()
        self._on_pending = on_pending

    # -- from the client ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Ids waited for (an outcome or a STATUS reply)."""
        return len(self._entries) + len(self._queries)

    @property
    def in_flight(self) -> int:
        """Requests sent to the broker whose outcome has not come yet."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Requests held in this client by the window, not sent yet."""
        return len(self._entries) - len(self._in_flight)

    def stats(self) -> Dict[str, int]:
        """The flow-control figures: in_flight, in_flight_bytes, queued, and the lazy
        pirate's checks, refetched and resubmitted."""
        return {
            "in_flight": self.in_flight,
            "in_flight_bytes": self.in_flight_bytes,
            "queued": self.queued,
            "checks": self.checks,
            "refetched": self.refetched,
            "resubmitted": self.resubmitted,
            "protocol": 2 if self.v2 else 1,
        }

    @property
    def last_heard(self) -> float:
        """When the broker last sent something (or when waiting for it began)."""
        return self._heard

    def holds(self, request_id: bytes) -> bool:
        """Whether this book waits for the outcome of the id."""
        return request_id in self._entries

    def probe(self, request_id: bytes) -> None:
        """Send STATS (the id: any 16 bytes): a broker that answers is there."""
        self._send_now(stats_message(request_id))

    @property
    def waiting(self) -> bool:
        """Whether anything sent waits for the broker's reply."""
        return bool(self._in_flight or self._queries or self._admin)

    def surrender(self) -> List[Tuple[bytes, _Entry]]:
        """Take every request out of this book, with their futures, for another book
        (ShardedBook's failover): [(id, entry)], in submission order. The broker of this
        book is not told; queries and dead-letter commands stay (they time out)."""
        taken = list(self._entries.items())
        self._entries = {}
        self._in_flight, self._held, self.in_flight_bytes, self._pending = {}, deque(), 0, []
        return taken

    def adopt(self, request_id: bytes, entry: _Entry) -> None:
        """A request that another book surrendered: submitted here (or watched, for an id
        this client never submitted) as if new, with its futures. An id this book has
        already gets the futures added to its own entry."""
        if entry.cancelling:
            # Its CANCEL went to the broker it leaves: as cancelled, not run elsewhere.
            for sink in entry.sinks:
                self._deliver(sink.future, None, _cancelled_reply(request_id).error)
            return
        mine = self._entries.get(request_id)
        if mine is not None:
            mine.sinks.extend(entry.sinks)
            return
        entry.sent = entry.accepted = entry.checked = entry.batched = False
        self._entries[request_id] = entry
        self._enter(request_id, entry)

    def _start_waiting(self) -> None:
        if not self._in_flight and not self._queries:
            # The silence that matters starts now, not when the last reply came.
            self._quiet_since = self._heard = self._clock()

    # -- the window --------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        n = len(self._in_flight)
        return n == 0 or (n < self.window and self.in_flight_bytes + size <= self.window_bytes)

    def _enter(self, request_id: bytes, entry: _Entry) -> None:
        """A new entry: sent now if the window has room and nothing is held before it."""
        if not self._held and self._fits(entry.size):
            self._launch(request_id, entry)
        else:
            self._held.append(request_id)

    def _launch(self, request_id: bytes, entry: _Entry) -> None:
        self._start_waiting()
        entry.sent = True
        self._in_flight[request_id] = None
        self.in_flight_bytes += entry.size
        if entry.message is None:
            self._send_now(result_message(request_id))
        else:
            self._send_submit(request_id, entry.message)

    def _send_submit(self, request_id: bytes, message: List[bytes]) -> None:
        """The SUBMIT of a request: now (FBC01), or at the next flush_submits() (FBC02)."""
        if not self.v2:
            self._send_now(message)
            return
        if not self._pending and self._on_pending is not None:
            self._on_pending()
        self._pending.append(request_id)

    def flush_submits(self) -> int:
        """Send the FBC02 SUBMITs gathered since the last call (as FBC01 ones if the
        book has fallen back meanwhile); returns how many messages."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        records = []
        for request_id in pending:
            entry = self._entries.get(request_id)
            if entry is not None and entry.sent and entry.message is not None:  # not forgotten meanwhile
                message = entry.message
                records.append((request_id, message[3], message[SUBMIT_PAYLOAD_AT:]))
        if self.v2 and len(records) > 1:
            messages = submit_batch_messages(records)
            for request_id, _, _ in records:
                self._entries[request_id].batched = True
        else:
            # A lone request goes as FBC01: the broker takes it the same way, and a single
            # call() costs what it did before FBC02 (measured ~5-10 % less than one record).
            messages = [submit_message(request_id, options, payload) for request_id, options, payload in records]
            for request_id, _, _ in records:
                self._entries[request_id].batched = False
        for message in messages:
            self._send(message)
        return len(messages)

    def _send_now(self, message: List[bytes]) -> None:
        """Send an FBC01 message (STATUS, RESULT, CANCEL, an FBC01 SUBMIT) after the
        SUBMITs gathered before it: the broker must see them in the order they were made
        (a STATUS sent ahead of its request's batch would find it unknown)."""
        if self._pending:
            self.flush_submits()
        self._send(message)

    def _leave(self, request_id: bytes, entry: _Entry) -> None:
        """An entry that was removed from _entries leaves the window: held ones move up."""
        if not entry.sent:
            return  # still in _held: skipped when its turn comes
        del self._in_flight[request_id]
        self.in_flight_bytes -= entry.size
        held, entries = self._held, self._entries
        while held:
            waiting = entries.get(held[0])
            if waiting is not None and not waiting.sent:
                if not self._fits(waiting.size):
                    return
                self._launch(held[0], waiting)
            held.popleft()

    # -- requests ----------------------------------------------------------------------

    def submit(self, request_id: bytes, message: List[bytes], future: Any, multipart: bool) -> None:
        entry = self._entries.get(request_id)
        if entry is None:
            entry = self._entries[request_id] = _Entry(message)
            entry.sinks.append(_Sink(future, multipart))
            self._enter(request_id, entry)
            return
        entry.sinks.append(_Sink(future, multipart))
        if entry.message is None:
            # Only watched so far: from now on it can be submitted again if lost.
            entry.message = message
            if entry.sent:
                entry.size = _payload_size(message)
                self.in_flight_bytes += entry.size
                self._send_submit(request_id, message)
        # Else submitted already by this client: the broker would only add the same
        # socket as a waiter again; the future waits with the others.

    def watch(self, request_id: bytes, future: Any, multipart: bool) -> None:
        """RESULT: wait for the outcome of an id (submitted by anyone)."""
        entry = self._entries.get(request_id)
        if entry is None:
            entry = self._entries[request_id] = _Entry(None)
            entry.sinks.append(_Sink(future, multipart))
            self._enter(request_id, entry)
            return
        entry.sinks.append(_Sink(future, multipart))
        if entry.sent:
            self._send_now(result_message(request_id))

    def query(self, request_id: bytes, future: Any) -> None:
        """STATUS: the future gets a Status."""
        self._start_waiting()
        self._prune_queries()
        self._queries.setdefault(request_id, deque()).append(future)
        self._send_now(status_message(request_id))

    def admin(self, request_id: bytes, message: List[bytes], future: Any) -> None:
        """A dead-letter command (DEAD, REQUEUE, REQUEUE_ALL) about request_id: the
        future gets the first reply about that id among ADMIN_KINDS (a Reply)."""
        self._start_waiting()
        if len(self._admin) >= 64:
            # As for queries: callers that gave up leave done futures behind.
            for rid in [rid for rid, fs in self._admin.items() if all(f.done() for f in fs)]:
                del self._admin[rid]
        self._admin.setdefault(request_id, deque()).append(future)
        self._send_now(message)

    def _prune_queries(self) -> None:
        # A caller that gave up waiting (status() timed out) cancelled its future:
        # without this, a broker that never answers would make them pile up.
        if len(self._queries) < 64:
            return
        for request_id in [rid for rid, fs in self._queries.items() if all(f.done() for f in fs)]:
            del self._queries[request_id]

    def cancel(self, request_id: bytes) -> None:
        """CANCEL: the futures waiting for the id get the broker's answer (CANCELLED,
        or the outcome it already had); a request still held here is cancelled here."""
        entry = self._entries.get(request_id)
        if entry is not None:
            if not entry.sent:
                self._finish(request_id, _cancelled_reply(request_id))
            else:
                entry.cancelling = True
        # Sent even for a request held here: the id may be another client's.
        self._send_now(cancel_message(request_id))

    def forget(self, request_id: bytes, future: Any, cancel: bool = True) -> None:
        """A future cancelled by its owner waits no more; with `cancel`, the request
        is cancelled at the broker too (the other futures waiting for it get CANCELLED).
        A request still held here never reaches the broker."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.sinks = [s for s in entry.sinks if s.future is not future]
            if not entry.sinks:
                del self._entries[request_id]
                self._leave(request_id, entry)
                if not entry.sent:
                    return
            elif cancel:
                if not entry.sent:
                    self._finish(request_id, _cancelled_reply(request_id))
                    return
                entry.cancelling = True
        if cancel:
            self._send_now(cancel_message(request_id))

    def fail_all(self, exc: BaseException) -> None:
        """Every future waiting gets `exc` (the client is closing)."""
        entries, queries, admin = self._entries, self._queries, self._admin
        self._entries, self._queries, self._admin = {}, {}, {}
        self._in_flight, self._held, self.in_flight_bytes, self._pending = {}, deque(), 0, []
        for entry in entries.values():
            for sink in entry.sinks:
                self._deliver(sink.future, None, exc)
        for futures in list(queries.values()) + list(admin.values()):
            for future in futures:
                self._deliver(future, None, exc)

    # -- from the broker ---------------------------------------------------------------

    def on_message(self, frames: Sequence[bytes]) -> Optional[Reply]:
        """Handle one received message (FBC01, or FBC02 REPLIES: each of its replies);
        returns the (last) reply, None if malformed."""
        self._quiet_since = self._heard = self._clock()
        if frames and frames[0] == CLIENT_SIGNATURE_V2:
            return self._on_replies(frames)
        reply = decode_reply(frames)
        if reply is not None:
            self.on_reply(reply)
        return reply

    def _on_replies(self, frames: Sequence[bytes]) -> Optional[Reply]:
        """An FBC02 REPLIES message. The two replies of every request, ACCEPTED and OK,
        are handled here as on_reply would, without a Reply each (they are most of what
        a client reads); the others are decoded and go to on_reply."""
        records = reply_records(frames)
        if records is None:
            return None
        self.heard_v2 = True
        entries = self._entries
        last: Optional[Reply] = None
        at = 3
        for request_id, kind, n in records:
            if kind == R_OK and n:
                entry = entries.get(request_id)
                if entry is not None:
                    self._finish_ok(request_id, list(frames[at : at + n]))
            elif kind == R_ACCEPTED and not n:
                entry = entries.get(request_id)
                if entry is not None and entry.sent:
                    entry.accepted = True
            else:
                last = decode_reply([CLIENT_SIGNATURE, kind, request_id, *frames[at : at + n]])
                if last is not None:
                    self.on_reply(last)
            at += n
        return last

    def on_reply(self, reply: Reply) -> None:
        """Act on one decoded reply."""
        request_id, kind = reply.request_id, reply.kind
        if self._admin and kind in ADMIN_KINDS and request_id in self._admin:
            waiting = self._admin[request_id]
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    self._deliver(future, reply, None)
                    break
            if not waiting:
                del self._admin[request_id]
            if kind in (R_DEAD, R_REQUEUED):
                return
        if reply.status is not None:  # STATUS or UNKNOWN
            futures = self._queries.get(request_id)
            while futures:
                future = futures.popleft()
                if not future.done():
                    self._deliver(future, reply.status, None)
                    break
            if futures is not None and not futures:
                del self._queries[request_id]
        entry = self._entries.get(request_id)
        if entry is None:
            return  # a duplicate outcome, or about an id nobody here waits for
        if not entry.sent and kind not in OUTCOME_KINDS:
            return  # about an id held here (a status() of it, say): not its SUBMIT's
        if kind == R_ACCEPTED:
            entry.accepted = True
        elif kind in OUTCOME_KINDS or kind == R_REJECTED:
            self._finish(request_id, reply)
        elif kind == R_UNKNOWN:
            if entry.cancelling:
                # The broker does not have it, so it will not run: as cancelled.
                self._finish(request_id, _cancelled_reply(request_id))
            elif entry.message is None:
                self._finish(request_id, reply)  # RESULT of an id nobody can re-submit
            else:
                # The broker lost it (restarted without a store): submit it again,
                # with the same id, so that it runs once however many times it is sent.
                if self.v2 and entry.batched and not self.heard_v2 and not entry.accepted:
                    # Never a word in FBC02, and it does not know a request sent so:
                    # a broker that drops FBC02. FBC01 from now on.
                    self.v2 = False
                    log.warning("the broker does not speak FBC02: the client falls back to FBC01")
                self.resubmitted += 1
                entry.accepted = False
                self._send_submit(request_id, entry.message)
        elif kind == R_STATUS:
            entry.accepted = True
            if reply.status is not None and reply.status.state == "done":
                # It finished but its outcome did not reach this socket.
                self._send_now(result_message(request_id))

    def _finish(self, request_id: bytes, reply: Reply) -> None:
        if reply.kind == R_OK:
            self._finish_ok(request_id, reply.frames)
            return
        entry = self._entries.pop(request_id)
        if entry.checked:
            self.refetched += 1
        self._leave(request_id, entry)
        for sink in entry.sinks:
            self._deliver(sink.future, None, reply.error)

    def _finish_ok(self, request_id: bytes, frames: List[bytes]) -> None:
        """The answer (its frames) of a request this book waits for."""
        entry = self._entries.pop(request_id)
        if entry.checked:
            self.refetched += 1
        self._leave(request_id, entry)
        for sink in entry.sinks:
            self._deliver(sink.future, frames if sink.multipart else b"".join(frames), None)

    # -- the lazy pirate ---------------------------------------------------------------

    def next_check(self) -> Optional[float]:
        """Seconds until tick() has work (0: now), None while nothing is in flight."""
        if not self._in_flight:
            return None
        return max(0.0, self._quiet_since + self.check_interval - self._clock())

    def tick(self) -> int:
        """If the broker has been silent for check_interval while requests are in
        flight, ask RESULT for up to check_batch of them; returns how many."""
        if not self._in_flight:
            return 0
        now = self._clock()
        if now - self._quiet_since < self.check_interval:
            return 0
        self._quiet_since = now
        batch = []
        for request_id in self._in_flight:
            batch.append(request_id)
            if len(batch) >= self._check_batch:
                break
        for request_id in batch:
            del self._in_flight[request_id]
            self._in_flight[request_id] = None  # to the back
            self._entries[request_id].checked = True
            # RESULT rather than STATUS: the same answers (STATUS while it runs,
            # UNKNOWN if lost), but it also makes this socket a waiter, so an outcome
            # still reaches it after its connection or the broker (with a store) changed.
            self._send_now(result_message(request_id))
        self.checks += len(batch)
        return len(batch)


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
    "RequestBook",
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
