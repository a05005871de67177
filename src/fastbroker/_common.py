"""Constants, errors and argument checks shared by both cores and the Python layer."""

from __future__ import annotations

import math
from types import TracebackType
from typing import Optional, Type, TypeVar

TASK_ID_SIZE = 16
"""Task ids sent to workers: an 8-byte random broker epoch, then 8 bytes the core
chooses (compiled: slot + generation; pure: a counter). Opaque to workers."""

MAX_FRAMES = 4096
"""A message with more frames than this is dropped as malformed (bounds memory)."""

HEAP_KEY_LIMIT = 1 << 24
"""DeadlineHeap keys given through its Python API are below this. The broker's keys
are request slots, dense from 0; the compiled heap indexes positions by key, so its
index costs 8 bytes per key up to the largest one."""

RECV_BATCH = 512
"""Messages taken from one socket per loop turn, so no endpoint starves the others."""

# Values returned by BrokerCore.run().
RUN_TIMEOUT = 0  # max_wait elapsed
RUN_WOKEN = 1  # the wake fd became readable or a signal interrupted the poll
RUN_DROP = 2  # a message was dropped and stop_on_drop was set
RUN_EVENT = 3  # events were recorded and stop_on_event was set (see BrokerCore.events)
RUN_JOURNAL = 4  # journal entries or held replies wait (journal on): store them, then release_held()

# What BrokerCore.events() reports, by kind index (the compiled core's numbering).
EVENT_KINDS = (
    "worker_joined",  # data: the worker's identity (first routing frame)
    "worker_left",  # DISCONNECT from it
    "worker_dead",  # silent past liveness, or unreachable at dispatch
    "aborted",  # a REQ client's request given up; data: task id; n: attempts
    "failed",  # an FBC01 request ended FAILED; data: request id; n: attempts
    "timed_out",  # an FBC01 request ended TIMED_OUT; data: request id; n: attempts
)
EVENT_DATA_MAX = 64
"""Bytes of an event's data kept (a longer identity is cut)."""
EVENT_QUEUE = 4096
"""Events held until read; more in one turn are counted in events_lost, not kept."""

# Latency of answered requests (arrival at the broker -> answer sent), seconds.
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Why a message was dropped; index into DROP_REASONS.
DROP_REQUEST_NO_DELIMITER = 0
DROP_REQUEST_NO_PAYLOAD = 1
DROP_READY_NO_DELIMITER = 2
DROP_READY_BAD_FRAMES = 3
DROP_ANSWER_TOO_SHORT = 4
DROP_ANSWER_BAD_ID = 5
DROP_ANSWER_UNKNOWN = 6
DROP_TOO_MANY_FRAMES = 7
DROP_OUT_OF_MEMORY = 8
DROP_WORKER_BAD_COMMAND = 9
DROP_WORKER_BAD_FRAMES = 10
DROP_CLIENT_BAD_COMMAND = 11
DROP_CLIENT_BAD_ID = 12

DROP_REASONS = (
    "request without an empty delimiter frame",
    "request without payload frames",
    "worker ready message without an empty delimiter frame",
    "worker ready message with other than one body frame",
    "answer with fewer than two frames",
    "answer whose task id is malformed",
    "answer for an unknown or already answered task",
    "message with too many frames",
    "message dropped for lack of memory",
    "worker message with an unknown command",
    "worker command with the wrong frames",
    "client message with an unknown command or the wrong frames",
    "client message whose request id is not 16 bytes",
)

# Keys of BrokerCore.stats(); the order is the compiled core's counter array.
COUNTERS = (
    "requests",  # requests accepted into the queue
    "dispatched",  # attempts sent to a worker
    "answered",  # requests answered to their client
    "late_answers",  # answered while waiting for a retry, after a timeout
    "timeouts",  # attempts whose deadline passed
    "retried",  # timed-out requests put back in the queue
    "aborted",  # requests given up after their last try (empty answer sent)
    "ready",  # worker ready messages accepted
    "unreachable_workers",  # idle workers found gone when a job was sent to them
    "dropped",  # malformed or unknown messages dropped (sum of the reasons)
    "failed",  # FAILED reports from workers (each counts a try)
    "workers_joined",  # DEALER workers that sent READY while unknown
    "workers_left",  # DEALER workers that sent DISCONNECT
    "workers_dead",  # DEALER workers silent past liveness
    "requeued",  # jobs put back in the queue because their worker died or left
    "cancelled",  # FBC01 requests cancelled by their client
    "rejected",  # FBC01 SUBMITs answered REJECTED
    "duplicates",  # FBC01 SUBMITs of an id the broker already had (not run again)
    "expired_results",  # finished outcomes forgotten (retention time or memory bound)
    "events_lost",  # events not kept for the log (more than EVENT_QUEUE in one turn)
)
GAUGES = ("queued", "running", "idle_workers", "workers", "retained", "retained_bytes")

# -- The worker protocol (DEALER workers), see docs/PROTOCOL.md ----------------
# Every message is [envelope..., b"", WORKER_SIGNATURE, command, body...]; the
# broker's ROUTER adds the envelope, the worker's DEALER sends from b"" on.
WORKER_SIGNATURE = b"FBW01"
CMD_READY = b"\x01"  # worker -> broker: [credit: 4-byte big-endian uint32]
CMD_TASK = b"\x02"  # broker -> worker: [task_id, payload frames...]
CMD_ANSWER = b"\x03"  # worker -> broker: [task_id, answer frames... (>= 1)]
CMD_FAILED = b"\x04"  # worker -> broker: [task_id, exception type, message] (UTF-8)
CMD_HEARTBEAT = b"\x05"  # both ways: []
CMD_DISCONNECT = b"\x06"  # both ways: []
CMD_CANCEL = b"\x07"  # broker -> worker: [task_id]; the client cancelled that job

# -- The client protocol (DEALER clients), see docs/PROTOCOL.md section 11 -------
# A client's DEALER sends [CLIENT_SIGNATURE, command, body...] with NO empty
# delimiter, so the broker's ROUTER sees [identity, CLIENT_SIGNATURE, ...]: a REQ
# client always has an empty frame there, so the two can never be mistaken.
CLIENT_SIGNATURE = b"FBC01"
REQUEST_ID_SIZE = 16
# client -> broker
C_SUBMIT = b"\x01"  # [id, options (0 or 9 bytes), payload frames (>= 1)]
C_STATUS = b"\x02"  # [id]
C_RESULT = b"\x03"  # [id]
C_CANCEL = b"\x04"  # [id]
C_STATS = b"\x05"  # [id (any 16 bytes)]: the broker's counters
# broker -> client; every reply's first body frame is the request id
R_ACCEPTED = b"\x11"  # [id]
R_REJECTED = b"\x12"  # [id, reason code (1 byte), reason text]
R_OK = b"\x13"  # [id, answer frames (>= 1)]
R_FAILED = b"\x14"  # [id, exception type, message]
R_TIMED_OUT = b"\x15"  # [id]
R_CANCELLED = b"\x16"  # [id]
R_UNKNOWN = b"\x17"  # [id]
R_STATUS = b"\x18"  # [id, state (1 byte), attempt (4 bytes BE), tries (4 bytes BE, 0: unlimited)]
R_STATS = b"\x19"  # [id, names (comma-separated ASCII), values (8 bytes BE each, same order)]

OPTIONS_SIZE = 9  # flags (1 byte), timeout in ms (4 bytes BE, 0: broker default), tries (4 bytes BE, 0: default)
OPT_NO_ACK = 0x01  # flag: do not send ACCEPTED
OPT_KNOWN_FLAGS = OPT_NO_ACK
MAX_REQUEST_TIMEOUT_MS = 0xFFFFFFFE  # a larger value in the options frame is rejected
MAX_REQUEST_TRIES = 1_000_000  # per-request tries above this are capped to it

# STATUS states
STATE_QUEUED = 1
STATE_RUNNING = 2
STATE_DONE = 3

# REJECTED reason codes
REJECT_BAD_OPTIONS = 1
REJECT_TOO_LARGE = 2  # reserved: no payload size limit yet
REJECT_QUEUE_FULL = 3  # the broker's max_queue requests are already waiting
REJECT_REASONS = {1: "bad options", 2: "too large", 3: "queue full"}

MAX_WAITERS = 8
"""Client sockets told the outcome of one request (each SUBMIT/RESULT from a new
socket adds one); beyond this the oldest is replaced."""

DEFAULT_RETENTION = 600.0
"""Seconds a finished outcome is kept for RESULT."""
DEFAULT_RETENTION_BYTES = 64 << 20
"""Memory bound on kept outcomes: answer bytes plus RESULT_OVERHEAD each."""
RESULT_OVERHEAD = 128
"""Bytes counted per kept outcome on top of its answer frames (record, index entry)."""

MAX_CREDIT = 1 << 16
MIN_LIVENESS = 2
"""With 1, a single heartbeat arriving a little late would end a healthy connection."""
MAX_LIVENESS = 1000

DEFAULT_HEARTBEAT = 1.0
"""Seconds between heartbeats, both ways."""
DEFAULT_LIVENESS = 3
"""Heartbeat intervals of silence after which a peer is taken for dead."""


def stats_fields() -> tuple:
    """Names of the values in a STATS reply, in order: counters, gauges, latency."""
    buckets = tuple(f"latency_le_{b:g}" for b in LATENCY_BOUNDS) + ("latency_le_inf",)
    return COUNTERS + GAUGES + buckets + ("latency_count", "latency_sum_us")


def decode_stats(names: bytes, values: bytes) -> dict:
    """The dict of a STATS reply's two frames; ValueError if they do not match."""
    keys = names.decode("ascii").split(",") if names else []
    if len(values) != 8 * len(keys):
        raise ValueError(f"{len(keys)} names but {len(values)} bytes of values")
    return {k: int.from_bytes(values[8 * i : 8 * i + 8], "big") for i, k in enumerate(keys)}


class BrokerError(Exception):
    """Base of fastbroker's own errors."""


class ConfigError(BrokerError, ValueError):
    """An invalid broker or worker setting."""


def check_timeout(timeout: float | None) -> float | None:
    """Return a valid per-attempt timeout in seconds, or raise ConfigError."""
    if timeout is None:
        return None
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"timeout must be a finite number >= 0, not {timeout!r}")
    return value


def check_seconds(name: str, value: float, low: float = 0.001, high: float = 3600) -> float:
    """Return a valid duration in seconds within [low, high], or raise ConfigError naming `name`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise ConfigError(f"{name} must be between {low} and {high} seconds, not {value!r}")
    return seconds


def check_heartbeat(heartbeat: float) -> float:
    """Return a valid heartbeat interval in seconds, or raise ConfigError."""
    return check_seconds("heartbeat", heartbeat)


def check_count(name: str, value: int, low: int, high: int) -> int:
    """Return a valid whole number in [low, high], or raise ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def check_tries(tries: int | None) -> int | None:
    """Return a valid number of tries, or raise ConfigError."""
    if tries is None:
        return None
    if isinstance(tries, bool) or not isinstance(tries, int):
        raise ConfigError(f"tries must be a whole number, not {tries!r}")
    if tries <= 0:
        raise ConfigError(f"tries must be at least 1, not {tries}")
    if tries > 2**31 - 1:
        raise ConfigError(f"tries must be below 2**31, not {tries}")
    return tries


def check_retention(retention: float) -> float:
    """Return a valid outcome retention in seconds (0 keeps none), or raise ConfigError."""
    return check_seconds("retention", retention, 0.0, 30 * 86400.0)


MAX_QUEUE_LIMIT = 1 << 31


def check_max_queue(limit: int | None) -> int | None:
    """Return a valid queue bound (None: unbounded), or raise ConfigError."""
    if limit is None:
        return None
    return check_count("max_queue", limit, 1, MAX_QUEUE_LIMIT)


def check_retention_bytes(limit: int) -> int:
    """Return a valid memory bound for kept outcomes, or raise ConfigError."""
    return check_count("retention_bytes", limit, 0, 1 << 48)


_C = TypeVar("_C", bound="Closeable")


class Closeable:
    """`with obj:` calls obj.close() on the way out."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
