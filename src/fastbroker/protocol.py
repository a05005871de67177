"""Every constant of fastbroker's protocols, defined once: signatures, command and reply
bytes, options and flags, limits, reason codes, the STATS names and the core's run codes.

The Python layer imports them from here; the compiled code (the core and
bench/_loadgen.pyx) cimports ``fastbroker/_protocol.pxd``, which is generated from this
module (``python src/fastbroker/protocol.py`` rewrites it, ``--check`` says whether it is
current), and the core checks at import that what it was compiled with is what this
module says. docs/PROTOCOL.md describes every frame.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Tuple

# -- Sizes and limits ----------------------------------------------------------
TASK_ID_SIZE = 16
"""Task ids sent to workers: an 8-byte random broker epoch, then 8 bytes the core
chooses (compiled: slot + generation; pure: a counter). Opaque to workers."""
SIGNATURE_SIZE = 5
MAX_FRAMES = 4096
"""A message with more frames than this is dropped as malformed (bounds memory)."""
PEER_MAX_FRAMES = MAX_FRAMES - 1
"""Most frames in a message a DEALER client or worker sends: the broker's ROUTER adds
the peer's identity frame, which MAX_FRAMES counts too."""
MAX_CREDIT = 1 << 16
"""Most jobs a DEALER worker may ask for at once (READY's credit)."""
MIN_LIVENESS = 2
"""With 1, a single heartbeat arriving a little late would end a healthy connection."""
MAX_LIVENESS = 1000
DEFAULT_HEARTBEAT = 1.0
"""Seconds between heartbeats, both ways."""
DEFAULT_LIVENESS = 3
"""Heartbeat intervals of silence after which a peer is taken for dead."""

# -- The worker protocol (DEALER workers), docs/PROTOCOL.md ------------------------
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
CMD_EXTEND = b"\x08"  # worker -> broker: [task_id, milliseconds (4 bytes BE)]; the job is alive
CMD_RETURN = b"\x09"  # worker -> broker: [task_id...]; jobs beyond its credit, given back (several brokers)
DEFAULT_MAX_EXTEND = 300.0
"""Seconds: the most one EXTEND moves an attempt's deadline from now (broker's --max-extend)."""

# -- FBW02, the batched worker protocol, docs/PROTOCOL.md section 13 ---------------
# The FBW01 commands and bodies under a second signature, except two: TASK carries
# k jobs [payload frames..., header] (header LAST, so the broker commits each job as
# it sends it) and ANSWER carries many outcomes [header, frames...]. A worker speaks
# the protocol of its last READY; the broker answers each worker in its protocol.
WORKER_SIGNATURE_V2 = b"FBW02"
TASK_RECORD_SIZE = 18  # task id (16), payload frames (2 BE)
ANSWER_RECORD_SIZE = 19  # task id (16), outcome (1: R_OK or R_FAILED), frames (2 BE)

# -- The client protocol (DEALER clients), docs/PROTOCOL.md section 10 -------------
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
C_DEAD = b"\x06"  # [id (any 16 bytes), limit (4 BE)]: list the dead-letter (R_DEAD)
C_REQUEUE = b"\x07"  # [id]: run a dead request again (R_REQUEUED, REJECTED, STATUS or UNKNOWN)
C_REQUEUE_ALL = b"\x08"  # [id (any 16 bytes)]: run every dead request again (R_REQUEUED)
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
R_DEAD = b"\x1b"  # [id, total (4 BE), header of DEAD_RECORD_SIZE records, (type, message) per record]
R_REQUEUED = b"\x1c"  # [id, requeued (4 BE), dead left (4 BE)]

# -- FBC02, the batched client protocol, docs/PROTOCOL.md section 12 ---------------
# [CLIENT_SIGNATURE_V2, C_SUBMIT, header, payload frames...]: many requests in one
# message; the broker answers [CLIENT_SIGNATURE_V2, R_REPLIES, header, body frames...],
# the replies of one loop turn to one client. STATUS, RESULT, CANCEL and STATS stay
# FBC01 messages (on the same socket).
CLIENT_SIGNATURE_V2 = b"FBC02"
R_REPLIES = b"\x1a"  # FBC02: [header of REPLY_RECORD_SIZE records, body frames...]
SUBMIT_RECORD_SIZE = 27  # id (16), flags (1), timeout ms (4 BE), tries (4 BE), payload frames (2 BE)
REPLY_RECORD_SIZE = 19  # id (16), reply code (1: R_ACCEPTED ... R_CANCELLED), body frames (2 BE)
MAX_BATCH = 1024
"""Most requests in one FBC02 SUBMIT, and most records in one REPLIES (a message has
at most MAX_FRAMES frames in all)."""

DEAD_RECORD_SIZE = 35  # id (16), outcome (1), attempts (4 BE), tries (4 BE), age ms (4 BE), payload bytes (4 BE), payload frames (2 BE)
MAX_DEAD_LIST = 1000
"""Most records in one DEAD reply (a larger limit is cut to this)."""

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
REJECT_REASONS = {REJECT_BAD_OPTIONS: "bad options", REJECT_TOO_LARGE: "too large", REJECT_QUEUE_FULL: "queue full"}

MAX_WAITERS = 8
"""Client sockets told the outcome of one request (each SUBMIT/RESULT from a new
socket adds one); beyond this the oldest is replaced."""
DEFAULT_RETENTION = 600.0
"""Seconds a finished outcome is kept for RESULT."""
DEFAULT_RETENTION_BYTES = 64 << 20
"""Memory bound on kept outcomes: answer bytes (and a dead request's payload) plus
RESULT_OVERHEAD each."""
RESULT_OVERHEAD = 128
"""Bytes counted per kept outcome on top of its answer frames (record, index entry)."""

# -- Why a message was dropped; index into DROP_REASONS ---------------------------
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
DROP_CLIENT_BAD_BATCH = 13
DROP_WORKER_BAD_BATCH = 14

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
    "client batch whose header does not match its frames",
    "worker batch whose header does not match its frames",
)

# -- The STATS reply's names -------------------------------------------------------
# Counters, in the order of the compiled core's counter array (CNT_* in _protocol.pxd).
COUNTERS = (
    "requests",  # requests accepted into the queue
    "dispatched",  # attempts sent to a worker
    "answered",  # requests answered to their client
    "late_answers",  # answered while waiting for a retry, after a timeout
    "timeouts",  # attempts whose deadline passed
    "retried",  # timed-out requests put back in the queue
    "aborted",  # requests given up after their last try (empty answer sent)
    "ready",  # worker ready messages accepted
    "unreachable_workers",  # workers found gone when a job or a heartbeat was sent to them
    "dropped",  # malformed or unknown messages dropped (sum of the reasons)
    "failed",  # FAILED reports from workers (each counts a try)
    "workers_joined",  # DEALER workers that sent READY while unknown
    "workers_left",  # DEALER workers that sent DISCONNECT
    "workers_dead",  # DEALER workers silent past liveness, or whose connection was gone
    "requeued",  # jobs put back in the queue because their worker died or left
    "cancelled",  # FBC01 requests cancelled by their client
    "rejected",  # FBC01 SUBMITs answered REJECTED
    "duplicates",  # FBC01 SUBMITs of an id the broker already had (not run again)
    "expired_results",  # finished outcomes forgotten (retention time or memory bound)
    "events_lost",  # events not kept for the log (more than EVENT_QUEUE in one turn)
    "replies_dropped",  # replies to a client not sent: its pipe was at the high-water mark (not reading)
    "replies_unroutable",  # replies to a client not sent: it had disconnected
    "extended",  # EXTENDs accepted from the worker running the attempt
    "returned",  # jobs a worker gave back with RETURN (queued again, no try counted)
    "dead_requeued",  # dead requests (FAILED or TIMED_OUT, payload kept) queued again by REQUEUE
)
GAUGES = ("queued", "running", "idle_workers", "workers", "retained", "retained_bytes", "dead")
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Buckets of the latency of answered requests (arrival -> answer sent), seconds."""


def stats_fields() -> Tuple[str, ...]:
    """Names of the values in a STATS reply, in order: counters, gauges, latency."""
    buckets = tuple(f"latency_le_{b:g}" for b in LATENCY_BOUNDS) + ("latency_le_inf",)
    return COUNTERS + GAUGES + buckets + ("latency_count", "latency_sum_us")


def decode_stats(names: bytes, values: bytes) -> Dict[str, int]:
    """The dict of a STATS reply's two frames; ValueError if they do not match."""
    keys = names.decode("ascii").split(",") if names else []
    if len(values) != 8 * len(keys):
        raise ValueError(f"{len(keys)} names but {len(values)} bytes of values")
    return {k: int.from_bytes(values[8 * i : 8 * i + 8], "big") for i, k in enumerate(keys)}


# -- The core's interface (both cores, not on the wire) --------------------------
RECV_BATCH = 512
"""Messages taken from one socket per loop turn, so no endpoint starves the others."""
HEAP_KEY_LIMIT = 1 << 24
"""DeadlineHeap keys given through its Python API are below this. The broker's keys
are request slots, dense from 0; the compiled heap indexes positions by key, so its
index costs 8 bytes per key up to the largest one."""

# Values returned by BrokerCore.run().
RUN_TIMEOUT = 0  # max_wait elapsed
RUN_WOKEN = 1  # the wake fd became readable or a signal interrupted the poll
RUN_DROP = 2  # a message was dropped and stop_on_drop was set
RUN_EVENT = 3  # events were recorded and stop_on_event was set (see BrokerCore.events)
RUN_JOURNAL = 4  # journal entries or held replies wait (journal on): store them, then release_held()

# What BrokerCore.events() reports, by kind index (EV_* in _protocol.pxd).
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

# What BrokerCore.journal_take() reports, by kind index (J_* in _protocol.pxd).
JOURNAL_KINDS = ("submit", "start", "finish", "forget")


# -- The store's log (``--store-format log``), docs/ARCHITECTURE.md "The log store" --
# A file is LOG_MAGIC, then records: [body length: 4, CRC-32 of the body: 4] + body,
# all integers little-endian. A body is [kind (JOURNAL_KINDS index): 1, reply code: 1,
# zero: 2, request id: 16] and then, by kind:
#   submit: [attempts: 4, tries: 4 signed, timeout: f64 (< 0: none), frames: 4], frames
#   start:  [attempts: 4]
#   finish: [attempts: 4, tries: 4 signed, timeout: f64, finished: f64 (Unix time),
#            body frames: 4, payload frames: 4], body frames, then a dead request's payload
#   forget: nothing more
# and a frame is [length: 4] + bytes. log_records.py reads and writes them in
# Python; core/journal.pxi's encode() writes a turn's records in C.
LOG_MAGIC = b"FBLOG001"
LOG_RECORD_HEAD = 8  # body length, CRC-32
LOG_ENTRY_SIZE = 20  # kind, code, zero, request id
LOG_SUBMIT_SIZE = 40  # LOG_ENTRY_SIZE + attempts, tries, timeout, frames
LOG_START_SIZE = 24  # LOG_ENTRY_SIZE + attempts
LOG_FINISH_SIZE = 52  # LOG_ENTRY_SIZE + attempts, tries, timeout, finished, body frames, payload frames
LOG_FORGET_SIZE = 20
LOG_FRAME_HEAD = 4
LOG_MAX_BODY = (1 << 32) - 1 - LOG_RECORD_HEAD
"""The longest body a record's length can say: a change larger than this (a payload of
4 GiB) cannot be stored, and the broker stops rather than acknowledge it."""


# -- The generated declarations for compiled code ----------------------------------
PXD_PATH = Path(__file__).with_name("_protocol.pxd")

_SIGNATURES = ("WORKER_SIGNATURE", "CLIENT_SIGNATURE", "CLIENT_SIGNATURE_V2", "WORKER_SIGNATURE_V2")
# Integers that do not fit a C int go to C as unsigned macros.
_UNSIGNED = ("MAX_REQUEST_TIMEOUT_MS", "LOG_MAX_BODY")
_ENUM_PREFIXES = ("CMD_", "C_", "R_", "OPT_", "STATE_", "REJECT_", "DROP_", "RUN_", "LOG_")
_ENUM_NAMES = (
    "TASK_ID_SIZE",
    "SIGNATURE_SIZE",
    "MAX_FRAMES",
    "PEER_MAX_FRAMES",
    "MAX_CREDIT",
    "MIN_LIVENESS",
    "MAX_LIVENESS",
    "REQUEST_ID_SIZE",
    "OPTIONS_SIZE",
    "SUBMIT_RECORD_SIZE",
    "REPLY_RECORD_SIZE",
    "DEAD_RECORD_SIZE",
    "MAX_DEAD_LIST",
    "TASK_RECORD_SIZE",
    "ANSWER_RECORD_SIZE",
    "MAX_BATCH",
    "MAX_REQUEST_TRIES",
    "MAX_WAITERS",
    "RESULT_OVERHEAD",
    "RECV_BATCH",
    "HEAP_KEY_LIMIT",
    "EVENT_DATA_MAX",
    "EVENT_QUEUE",
)


def compiled_values() -> Dict[str, int]:
    """Every integer constant the compiled code is given, by its name in _protocol.pxd.

    A one-byte command becomes its integer; tuples of names become indexes (CNT_ for
    COUNTERS, EV_ for EVENT_KINDS, J_ for JOURNAL_KINDS) and their counts.
    """
    module = sys.modules[__name__]
    values: Dict[str, int] = {}
    for name in dir(module):
        value = getattr(module, name)
        if (
            name in _UNSIGNED
            or name in _ENUM_NAMES
            or (name.startswith(_ENUM_PREFIXES) and name not in ("REJECT_REASONS", "DROP_REASONS", "LOG_MAGIC"))
        ):
            if isinstance(value, bytes):
                assert len(value) == 1, name
                value = value[0]
            values[name] = value
    for prefix, names in (("CNT_", COUNTERS), ("EV_", EVENT_KINDS), ("J_", JOURNAL_KINDS)):
        for i, kind in enumerate(names):
            values[prefix + kind.upper()] = i
    values["N_COUNTERS"] = len(COUNTERS)
    values["N_GAUGES"] = len(GAUGES)
    values["N_LATENCY"] = len(LATENCY_BOUNDS) + 1  # one bucket per bound, then +Inf
    values["N_DROP_REASONS"] = len(DROP_REASONS)
    values["N_STATS"] = len(stats_fields())
    return values


def render_pxd() -> str:
    """The text of _protocol.pxd."""
    values = compiled_values()
    lines = [
        "# Generated from fastbroker/protocol.py by `python src/fastbroker/protocol.py`: do not edit.",
        "# The core checks at import that these values are protocol.py's (check_compiled).",
        "",
        "cdef extern from *:",
        '    """',
    ]
    for name in _SIGNATURES:
        lines.append(f'    #define FB_{name} "{getattr(sys.modules[__name__], name).decode("ascii")}"')
    for name in _UNSIGNED:
        lines.append(f"    #define FB_{name} {values[name]:#x}u")
    lines.append('    """')
    for name in _SIGNATURES:
        lines.append(f'    const char *{name} "FB_{name}"')
    for name in _UNSIGNED:
        lines.append(f'    const unsigned int {name} "FB_{name}"')
    lines += ["", "cdef enum:"]
    for name in sorted(v for v in values if v not in _UNSIGNED):
        lines.append(f"    {name} = {values[name]}")
    lines += [
        "",
        "",
        "cdef inline dict compiled_values():",
        '    """What this module was compiled with, for protocol.check_compiled."""',
        "    return {",
    ]
    for name in sorted(values):
        lines.append(f'        "{name}": {name},')
    lines += ["    }", "", "", "cdef inline tuple compiled_signatures():", "    return ("]
    for name in _SIGNATURES:
        lines.append(f"        {name}[:SIGNATURE_SIZE],")
    lines += ["    )", ""]
    return "\n".join(lines)


def check_compiled(values: Dict[str, int], signatures: Tuple[bytes, ...]) -> None:
    """Raise ImportError if compiled code was built from another version of this module."""
    expected = compiled_values()
    wrong = sorted(k for k in set(expected) | set(values) if expected.get(k) != values.get(k))
    if wrong or signatures != tuple(getattr(sys.modules[__name__], n) for n in _SIGNATURES):
        raise ImportError(
            "fastbroker/_protocol.pxd is stale (run `python src/fastbroker/protocol.py`, then rebuild): "
            + ", ".join(wrong or _SIGNATURES)
        )


def main(argv: list[str] | None = None) -> int:
    """Write _protocol.pxd, or with --check exit 1 if it is not current."""
    args = sys.argv[1:] if argv is None else argv
    text = render_pxd()
    if args == ["--check"]:
        current = PXD_PATH.read_text() if PXD_PATH.exists() else ""
        if current != text:
            print(f"{PXD_PATH} is stale: run python src/fastbroker/protocol.py", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python src/fastbroker/protocol.py [--check]", file=sys.stderr)
        return 2
    PXD_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
