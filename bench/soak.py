"""Soak: a long run of hostile input against one broker, with a well-behaved client
and worker that must keep working.

    python -m bench.soak [--messages N] [--core compiled|pure] [--batch B]
                         [--rss-bound-mib M] [--seed S]      (from the repository root)

The broker runs in this process, in a thread (``fastbroker.Broker`` on tcp
127.0.0.1, heartbeat 0.2 s, attempt timeout 1 s, retention 0.5 s), so its
``stats()`` are read directly. The good worker is a ``fastbroker worker
bench.soak:SoakEcho`` process (it answers ``b"-" + payload``); the good client is a
``fastbroker.Client`` in this process that submits one job per batch and checks
every answer. A crowd of raw sockets (``Crowd``: DEALER, REQ, PUSH, some with 1- or
255-byte routing ids, some opened for one message and closed) sends the hostile
mix (``hostile_message``) to all three endpoints, in batches, and reacts to what
the broker sends it (fake workers answer, fail, garble or ignore their TASKs).

Memory: RSS of this process (the broker's thread, the client and the crowd) is read
from /proc/self/status: "before" after a warm-up of the same mix (so allocator
arenas and libzmq buffers have reached their working size), then every batch
(peak), then "after" once the crowd is closed, the queue has drained (a last good
job is answered) and kept outcomes have expired. The run fails (exit 1) if the
broker thread died, a good job did not get its right answer, or after - before
exceeds ``--rss-bound-mib`` (default 32 MiB: over 10^6 messages, a leak of more
than ~34 bytes per message on average).

``hostile_message`` takes a *chooser*: anything with ``randrange(n)`` and
``randbytes(n)``, e.g. ``random.Random``; tests/test_hostile_input.py passes one
backed by hypothesis, so the soak and the fuzz test send the same mix.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import zmq

from fastbroker import protocol
from fastbroker.worker.base import Worker

REQUESTS, WORKERS, ANSWERS = "requests", "workers", "answers"
FBW, FBC, FBC2 = protocol.WORKER_SIGNATURE, protocol.CLIENT_SIGNATURE, protocol.CLIENT_SIGNATURE_V2
FBW2 = protocol.WORKER_SIGNATURE_V2
HUGE = 64 * 1024
"""Size of the "huge" frames of the mix: big enough that a leak of them shows in RSS."""
GOOD_PREFIX = b"good:"
REPO_ROOT = Path(__file__).resolve().parents[1]


class Chooser(Protocol):
    def randrange(self, n: int) -> int: ...

    def randbytes(self, n: int) -> bytes: ...


class Message(NamedTuple):
    endpoint: str  # REQUESTS, WORKERS or ANSWERS
    kind: int  # zmq.DEALER, zmq.REQ or zmq.PUSH
    frames: List[bytes]
    fresh: bool  # sent on a new socket, closed at once (connection churn)


# -- the mix ---------------------------------------------------------------------------

# Request ids that repeat, so duplicate SUBMITs, STATUS, RESULT and CANCEL hit live
# requests and kept outcomes (and fill waiter lists).
POOL_IDS = [bytes([0xA0 + i]) * protocol.REQUEST_ID_SIZE for i in range(8)]
BAD_ID_SIZES = [0, 1, 15, 17, 255, 4096, HUGE]


def pick(c: Chooser, seq: Sequence):
    return seq[c.randrange(len(seq))]


def weighted(c: Chooser, table: Sequence[Tuple[int, Callable]]):
    n = c.randrange(sum(w for w, _ in table))
    for w, fn in table:
        if n < w:
            return fn
        n -= w
    raise AssertionError("unreachable")


def u32(n: int) -> bytes:
    return struct.pack(">I", n & 0xFFFFFFFF)


def junk(c: Chooser) -> bytes:
    """One frame of anything, biased towards what the parsers look at."""
    k = c.randrange(20)
    if k < 3:
        return b""
    if k < 8:
        return c.randbytes(c.randrange(40))
    if k < 10:
        return pick(c, [FBW, FBC, FBC2, b"FBW02", b"FBC0", b"fbc01", FBC + b"\x00"])
    if k < 13:
        return bytes([c.randrange(256)])
    if k < 15:
        return request_id(c)
    if k < 17:
        return options(c)
    if k < 19:
        return u32(c.randrange(1 << 32) if c.randrange(2) else c.randrange(70000))
    # One frame in a hundred is huge; the others here are a few hundred bytes.
    return big(c) if c.randrange(5) == 0 else c.randbytes(100 + c.randrange(900))


def big(c: Chooser) -> bytes:
    # A few random bytes repeated: cheap to draw, yet not all one value.
    return (c.randbytes(8) * (HUGE // 8))[: HUGE - c.randrange(64)]


def request_id(c: Chooser) -> bytes:
    k = c.randrange(8)
    if k < 3:
        return pick(c, POOL_IDS)
    if k < 6:
        return c.randbytes(protocol.REQUEST_ID_SIZE)
    size = pick(c, BAD_ID_SIZES)
    return big(c)[:size] if size > 64 else c.randbytes(size)


def options(c: Chooser) -> bytes:
    """An options frame: empty, valid, or out of range (flags, timeout, length)."""
    k = c.randrange(10)
    timeout = pick(c, [0, 1, 50, 1000, protocol.MAX_REQUEST_TIMEOUT_MS])
    tries = pick(c, [0, 1, 2, 5, protocol.MAX_REQUEST_TRIES, protocol.MAX_REQUEST_TRIES + 1, 0xFFFFFFFF])
    if k < 2:
        return b""
    if k < 6:
        return bytes([c.randrange(2)]) + u32(timeout) + u32(tries)
    if k < 7:  # unknown flag bits
        return bytes([2 + c.randrange(254)]) + u32(timeout) + u32(tries)
    if k < 8:  # timeout above the maximum
        return bytes([c.randrange(2)]) + u32(protocol.MAX_REQUEST_TIMEOUT_MS + 1 + c.randrange(2)) + u32(tries)
    return c.randbytes(pick(c, [1, 4, 8, 10, 16, 100]))  # wrong length


def payload(c: Chooser, lo: int = 1) -> List[bytes]:
    return [junk(c) for _ in range(lo + c.randrange(3))]


def fbc_command(c: Chooser) -> bytes:
    k = c.randrange(10)
    if k < 8:
        return pick(c, [protocol.C_SUBMIT, protocol.C_STATUS, protocol.C_RESULT, protocol.C_CANCEL])
    return pick(c, [b"", b"\x00", b"\x05", b"\x06", b"\x11", b"\xff", b"\x01\x01"])


def m_submit(c: Chooser) -> Message:
    # Mostly well formed, with 0-3 payload frames (0: reason 11).
    frames = [FBC, protocol.C_SUBMIT, request_id(c), options(c)] + [junk(c) for _ in range(c.randrange(4))]
    return Message(REQUESTS, zmq.DEALER, frames, c.randrange(64) == 0)


def m_query(c: Chooser) -> Message:
    frames = [FBC, pick(c, [protocol.C_STATUS, protocol.C_RESULT, protocol.C_CANCEL]), request_id(c)]
    if c.randrange(4) == 0:
        frames += payload(c)  # a body after the id: reason 11
    return Message(REQUESTS, zmq.DEALER, frames, c.randrange(64) == 0)


def m_batch(c: Chooser) -> Message:
    """An FBC02 SUBMIT of 1-4 requests: records with ids of the pool or random, options
    in and out of range, and a frame count that mostly matches its frames (else the
    whole message is dropped, reason 13); now and then a header of random bytes."""
    header, frames = b"", []
    for _ in range(1 + c.randrange(4)):
        opts = options(c)
        if len(opts) != protocol.OPTIONS_SIZE:
            opts = bytes(protocol.OPTIONS_SIZE)
        body = payload(c)
        count = len(body) if c.randrange(8) else pick(c, [0, len(body) + 1, 0xFFFF])
        header += pick(c, [pick(c, POOL_IDS), c.randbytes(protocol.REQUEST_ID_SIZE)]) + opts + count.to_bytes(2, "big")
        frames += body
    if c.randrange(16) == 0:
        header = c.randbytes(pick(c, [0, 1, 26, 28, 54]))
    return Message(REQUESTS, zmq.DEALER, [FBC2, protocol.C_SUBMIT, header, *frames], c.randrange(64) == 0)


def m_fbc_garbled(c: Chooser) -> Message:
    frames = [pick(c, [FBC, FBC, FBC2, b"fbc01", b"FBC0"])]
    frames += [fbc_command(c)] if c.randrange(5) else []
    frames += [junk(c) for _ in range(c.randrange(5))]
    return Message(REQUESTS, zmq.DEALER, frames, False)


def m_original_request(c: Chooser) -> Message:
    k = c.randrange(4)
    if k == 0:  # from a REQ socket: the delimiter is its own
        return Message(REQUESTS, zmq.REQ, payload(c), c.randrange(8) == 0)
    if k == 1:
        return Message(REQUESTS, zmq.DEALER, [b""] + payload(c), False)
    if k == 2:
        return Message(REQUESTS, zmq.DEALER, [b""], False)  # no payload: reason 1
    return Message(REQUESTS, zmq.DEALER, [junk(c) or b"x"] + payload(c, 0), False)  # no delimiter: reason 0


def m_random(c: Chooser) -> Message:
    endpoint = pick(c, [REQUESTS, WORKERS, ANSWERS])
    kind = zmq.PUSH if endpoint == ANSWERS else zmq.DEALER
    return Message(endpoint, kind, [junk(c) for _ in range(1 + c.randrange(8))], c.randrange(64) == 0)


def m_too_many_frames(c: Chooser) -> Message:
    endpoint = pick(c, [REQUESTS, WORKERS, ANSWERS])
    n = protocol.MAX_FRAMES + pick(c, [-2, -1, 0, 1, 2, 100])
    head = [b""] if endpoint != ANSWERS else []
    if endpoint == REQUESTS and c.randrange(2):
        head = [FBC, protocol.C_SUBMIT, c.randbytes(16), b""]
    frames = head + [b"f"] * (n - len(head))
    return Message(endpoint, zmq.PUSH if endpoint == ANSWERS else zmq.DEALER, frames, False)


def credit(c: Chooser) -> bytes:
    k = c.randrange(8)
    if k < 4:
        return u32(pick(c, [0, 1, 2, 16, protocol.MAX_CREDIT]))
    if k < 6:
        return u32(pick(c, [protocol.MAX_CREDIT + 1, 0xFFFFFFFF]))
    return c.randbytes(pick(c, [0, 1, 3, 5, 8]))


def m_fbw(c: Chooser) -> Message:
    k = c.randrange(12)
    cmd = {
        0: protocol.CMD_READY,
        1: protocol.CMD_READY,
        2: protocol.CMD_HEARTBEAT,
        3: protocol.CMD_DISCONNECT,
        4: protocol.CMD_ANSWER,
        5: protocol.CMD_ANSWER,
        6: protocol.CMD_FAILED,
        7: protocol.CMD_FAILED,
        8: protocol.CMD_EXTEND,
    }.get(k)
    if cmd is None:  # unknown commands, a TASK or CANCEL from a worker, multi-byte
        cmd = pick(c, [b"", b"\x00", protocol.CMD_TASK, protocol.CMD_CANCEL, protocol.CMD_RETURN, b"\x7f", b"\x01\x00"])
    if cmd == protocol.CMD_READY:
        body = [credit(c)] + ([junk(c)] if c.randrange(6) == 0 else [])
    elif cmd in (protocol.CMD_HEARTBEAT, protocol.CMD_DISCONNECT):
        body = [] if c.randrange(3) else payload(c)
    elif cmd == protocol.CMD_ANSWER:
        # Ids no live task has: random, wrong size, none; answer frames 0-2.
        body = [pick(c, [c.randbytes(16), c.randbytes(pick(c, [0, 5, 15, 17]))])] + [
            junk(c) for _ in range(c.randrange(3))
        ]
        body = body if c.randrange(8) else []
    elif cmd == protocol.CMD_FAILED:
        body = [c.randbytes(pick(c, [16, 16, 3]))] + [junk(c) for _ in range(c.randrange(4))]
    elif cmd == protocol.CMD_EXTEND:
        # Ids no live task has, milliseconds of 4 bytes or not.
        body = [c.randbytes(pick(c, [16, 16, 5]))]
        if c.randrange(4):
            body.append(c.randbytes(pick(c, [4, 4, 0, 3])))
    else:
        body = [junk(c) for _ in range(c.randrange(3))]
    sig = pick(c, [FBW, FBW2]) if c.randrange(8) else pick(c, [b"FBW03", b"fbw01", b"", FBC])
    if sig == FBW2 and cmd == protocol.CMD_ANSWER:
        body = fbw2_answer(c)
    head = [b""] if c.randrange(10) else []  # no delimiter: reason 2
    return Message(WORKERS, zmq.DEALER, head + [sig, cmd] + body, c.randrange(64) == 0)


def fbw2_answer(c: Chooser) -> List[bytes]:
    """An FBW02 ANSWER's body: 0-4 records (ids no live task has, outcomes right or
    not, frame counts 0-3) and frames that match the header, or not (one more or one
    fewer), or no header at all."""
    if c.randrange(10) == 0:
        return []
    records, frames = [], []
    for _ in range(c.randrange(5)):
        count = c.randrange(4)
        code = pick(c, [protocol.R_OK, protocol.R_OK, protocol.R_FAILED, b"\x00", b"\x99"])
        rid = c.randbytes(16) if c.randrange(8) else c.randbytes(pick(c, [15, 17]))
        records.append(rid + code + struct.pack(">H", count))
        frames += [junk(c) for _ in range(count)]
    k = c.randrange(8)
    if k == 0:
        frames.append(b"one more")
    elif k == 1 and frames:
        frames.pop()
    return [b"".join(records)] + frames


def m_original_ready(c: Chooser) -> Message:
    k = c.randrange(4)
    if k == 0:
        return Message(WORKERS, zmq.REQ, [junk(c) or b"ready"], c.randrange(8) == 0)
    if k == 1:
        return Message(WORKERS, zmq.DEALER, [b"", pick(c, [b"ready", FBW, b""])], c.randrange(8) == 0)
    if k == 2:
        return Message(WORKERS, zmq.DEALER, [b""], False)  # nothing after the delimiter
    return Message(WORKERS, zmq.REQ, payload(c, 2), False)  # two or more body frames


def m_push_answer(c: Chooser) -> Message:
    frames = [pick(c, [c.randbytes(16), c.randbytes(pick(c, [0, 8, 15, 17])), junk(c)])]
    frames += [junk(c) for _ in range(c.randrange(4))]
    return Message(ANSWERS, zmq.PUSH, frames, c.randrange(32) == 0)


MIX: List[Tuple[int, Callable[[Chooser], Message]]] = [
    (14, m_submit),
    (10, m_query),
    (6, m_fbc_garbled),
    (8, m_batch),
    (6, m_original_request),
    (8, m_random),
    (16, m_fbw),
    (4, m_original_ready),
    (6, m_push_answer),
]
"""Weights of the message kinds (the frames inside each are random too). Messages
that create work for the good worker (valid new requests) are about a tenth."""

RARE_TOO_MANY = 1000
"""One message in this many has about MAX_FRAMES frames (slow to send, so rare)."""


def hostile_message(c: Chooser) -> Message:
    if c.randrange(RARE_TOO_MANY) == 0:
        return m_too_many_frames(c)
    return weighted(c, MIX)(c)


# -- the crowd of raw sockets --------------------------------------------------------------


class Crowd:
    """Raw sockets of every kind on the three endpoints. ``send`` sends a Message on a
    long-lived socket of its kind (or a new one, closed at once, if ``fresh``);
    ``react`` reads what the broker sent back (bounded) and has the fake workers
    answer, fail, garble or ignore their TASKs; ``close`` answers the original-protocol
    TASKs still held (so none stays running until its timeout) and closes every socket.

    Fake workers answer only with the right answer (``b"-" + payload`` for one
    frame), so a good client's job that lands on a fake still gets the right
    answer; they never forge task ids of the right epoch and size (any worker may
    answer any live task, by protocol, so a forged ANSWER could be wrong without
    being a broker bug)."""

    SEND_TIMEOUT_MS = 10_000
    HWM = 200

    def __init__(self, ctx: zmq.Context, endpoints: Dict[str, str], seed: int = 0) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.rng = random.Random(seed)
        self.sent = 0
        self.received = 0
        self.fresh_sockets = 0
        self.held: List[Tuple[bytes, List[bytes]]] = []  # original-protocol tasks not yet answered
        self.pool: Dict[Tuple[str, int], List[zmq.Socket]] = {}
        for endpoint in (REQUESTS, WORKERS):
            self.pool[(endpoint, zmq.DEALER)] = [
                self._socket(endpoint, zmq.DEALER),
                self._socket(endpoint, zmq.DEALER, self._routing_id(1)),
                self._socket(endpoint, zmq.DEALER, self._routing_id(255)),
            ]
            self.pool[(endpoint, zmq.REQ)] = [self._socket(endpoint, zmq.REQ)]
        self.pusher = self._socket(ANSWERS, zmq.PUSH)
        self.pool[(ANSWERS, zmq.PUSH)] = [self.pusher]
        self.all = [s for group in self.pool.values() for s in group]
        self.readable = [s for s in self.all if s.type != zmq.PUSH]

    def _routing_id(self, size: int) -> bytes:
        # Non-zero first byte (libzmq reserves it) and unique per crowd.
        return bytes([1 + self.rng.randrange(255)]) + self.rng.randbytes(size - 1)

    def _socket(self, endpoint: str, kind: int, routing_id: Optional[bytes] = None, linger: int = 0) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, linger)
        s.setsockopt(zmq.SNDHWM, self.HWM)
        s.setsockopt(zmq.RCVHWM, self.HWM)
        s.setsockopt(zmq.SNDTIMEO, self.SEND_TIMEOUT_MS)
        if kind == zmq.REQ:
            s.setsockopt(zmq.REQ_RELAXED, 1)  # send again without waiting for a reply
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(self.endpoints[endpoint])
        return s

    def send(self, m: Message) -> None:
        if m.fresh:
            # Linger so the message is still delivered after close().
            s = self._socket(m.endpoint, m.kind, linger=200)
            try:
                s.send_multipart(m.frames)
            finally:
                s.close()
            self.fresh_sockets += 1
        else:
            group = self.pool[(m.endpoint, m.kind)]
            # zmq.Again after SEND_TIMEOUT_MS: the broker stopped reading.
            group[self.rng.randrange(len(group))].send_multipart(m.frames)
        self.sent += 1

    def react(self, max_messages: int = 2000, quiet: float = 0.0, max_wait: float = 1.0) -> None:
        """Read and act on up to `max_messages` of what the broker sent. With `quiet`
        (seconds), keep reading until nothing came for that long (at most `max_wait`
        in all): right after a burst the broker has not yet dispatched it, and a fake
        worker that reads its TASKs only at the next burst has often lost its session
        by then (its own garbage ended it), so FAILED reports and answers from fakes
        would depend on how fast the broker happened to be."""
        budget = max_messages
        deadline = time.monotonic() + max_wait
        while budget > 0:
            for s in self.readable:
                while budget > 0:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:
                        if exc.errno == zmq.EFSM:  # a REQ socket that has sent nothing yet
                            break
                        raise
                    budget -= 1
                    self.received += 1
                    self._on_message(s, frames)
            wait = min(quiet, deadline - time.monotonic())
            if wait <= 0 or not zmq.select(self.readable, [], [], wait)[0]:
                break
        if self.held and self.rng.randrange(2):
            for task_id, data in self.held:
                self.pusher.send_multipart([task_id, echo(data)])
            self.held.clear()

    def _on_message(self, s: zmq.Socket, frames: List[bytes]) -> None:
        if s.type == zmq.DEALER and s in self.pool[(WORKERS, zmq.DEALER)]:
            if len(frames) >= 4 and frames[:3] == [b"", FBW, protocol.CMD_TASK]:
                self._fake_fbw_worker(s, frames[3], frames[4:])
            elif len(frames) >= 5 and frames[:3] == [b"", FBW2, protocol.CMD_TASK]:
                self._fake_fbw2_worker(s, frames[3:-1], frames[-1])
            elif len(frames) >= 2 and frames[0] == b"" and len(frames[1]) == protocol.TASK_ID_SIZE:
                self.held.append((frames[1], frames[2:]))  # an original-protocol TASK
        elif s.type == zmq.REQ and s in self.pool[(WORKERS, zmq.REQ)] and frames:
            if len(frames[0]) == protocol.TASK_ID_SIZE:
                self.held.append((frames[0], frames[1:]))

    def _fake_fbw_worker(self, s: zmq.Socket, task_id: bytes, data: List[bytes]) -> None:
        k = self.rng.randrange(8)
        head = [b"", FBW]
        if k < 3:
            s.send_multipart(head + [protocol.CMD_ANSWER, task_id, echo(data)])
        elif k < 5:
            s.send_multipart(head + [protocol.CMD_FAILED, task_id, b"HostileError", b"no"])
        elif k == 5:  # garbled: no answer frame, a short id, FAILED with two frames
            s.send_multipart(
                pick(
                    self.rng,
                    [
                        head + [protocol.CMD_ANSWER, task_id],
                        head + [protocol.CMD_ANSWER, task_id[:-1], b"x"],
                        head + [protocol.CMD_FAILED, task_id, b"two frames"],
                    ],
                )
            )
        # else: ignore it (the attempt times out, or the fake is taken for dead)

    def _fake_fbw2_worker(self, s: zmq.Socket, payload: List[bytes], header: bytes) -> None:
        """An FBW02 TASK: each job answered right, FAILED or ignored, in one ANSWER
        (sometimes garbled: a record's frame count one too many)."""
        records, frames = [], []
        for at in range(0, len(header) - len(header) % 18, 18):
            task_id, count = header[at : at + 16], int.from_bytes(header[at + 16 : at + 18], "big")
            data, payload = payload[:count], payload[count:]
            k = self.rng.randrange(6)
            if k < 3:
                records.append(task_id + protocol.R_OK + b"\x00\x01")
                frames.append(echo(data))
            elif k < 5:
                records.append(task_id + protocol.R_FAILED + b"\x00\x02")
                frames += [b"HostileError", b"no"]
        if records:
            if self.rng.randrange(8) == 0:
                records[0] = records[0][:17] + b"\x00\x05"  # the frames no longer add up: all dropped
            s.send_multipart([b"", FBW2, protocol.CMD_ANSWER, b"".join(records), *frames])

    def close(self, grace: float = 0.3) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.react()
            for task_id, data in self.held:
                self.pusher.send_multipart([task_id, echo(data)])
            self.held.clear()
            time.sleep(0.01)
        for s in self.all:
            s.close(linger=0 if s is not self.pusher else 500)


def echo(data: List[bytes]) -> bytes:
    """The right answer (that of SoakEcho / DealerEcho) to a payload."""
    return b"-" + b"".join(data)


class SoakEcho(Worker):
    """The soak's well-behaved worker: ``b"-" + payload``."""

    def process(self, data: bytes) -> bytes:
        return b"-" + data


def rss_bytes(pid: Optional[int] = None) -> int:
    """VmRSS of a process (default: this one), in bytes."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in {path}")


# -- the soak run ------------------------------------------------------------------------------


class GoodClient:
    """A fastbroker.Client that submits numbered jobs and checks each answer."""

    def __init__(self, address: str, ctx: zmq.Context) -> None:
        from fastbroker import Client

        self.client = Client(address, ctx, check_interval=1.0)
        self.pending: List[Tuple[bytes, object]] = []
        self.completed = 0
        self.failures: List[str] = []
        self._n = 0

    def submit(self) -> None:
        self._n += 1
        data = GOOD_PREFIX + str(self._n).encode()
        self.pending.append((data, self.client.submit(data)))

    def collect(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        still = []
        for data, future in self.pending:
            try:
                answer = future.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                still.append((data, future))
                continue
            except Exception as exc:  # an outcome other than OK
                self.failures.append(f"{data!r}: {type(exc).__name__}: {exc}")
                continue
            if answer == b"-" + data:
                self.completed += 1
            else:
                self.failures.append(f"{data!r}: wrong answer {answer[:60]!r}")
        self.pending = still

    def close(self) -> None:
        self.client.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="hostile messages to send (default: 1,000,000)")
    parser.add_argument("--core", choices=["compiled", "pure"], default="compiled")
    parser.add_argument(
        "--batch", type=int, default=1000, help="messages between two reactions and good jobs (default: 1000)"
    )
    parser.add_argument(
        "--warmup", type=int, default=50_000, help="messages of the warm-up before RSS 'before' (default: 50,000)"
    )
    parser.add_argument("--rss-bound-mib", type=float, default=32.0, help="most RSS growth allowed, MiB (default: 32)")
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument(
        "--max-seconds", type=float, default=1800.0, help="give up (exit 1) after this long (default: 1800)"
    )
    args = parser.parse_args(argv)

    from fastbroker import Broker

    ctx = zmq.Context()
    addr = "tcp://127.0.0.1:*"
    broker = Broker(
        ctx,
        1.0,
        None,
        addr,
        addr,
        addr,
        core=args.core,
        heartbeat=0.2,
        liveness=3,
        retention=0.5,
        retention_bytes=4 << 20,
    )
    endpoints = dict(zip((REQUESTS, WORKERS, ANSWERS), broker.endpoints))
    crashed: List[BaseException] = []

    def serve() -> None:
        try:
            broker.run()
        except BaseException as exc:  # reported below: the broker died
            crashed.append(exc)
            raise

    thread = threading.Thread(target=serve, name="broker", daemon=True)
    thread.start()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env["FASTBROKER_PURE"] = "1" if args.core == "pure" else "0"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastbroker",
            "worker",
            "bench.soak:SoakEcho",
            endpoints[WORKERS],
            "--credit",
            "8",
            "--heartbeat",
            "0.2",
            "--liveness",
            "3",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    good = GoodClient(endpoints[REQUESTS], ctx)
    rng = random.Random(args.seed)
    started = time.monotonic()
    failed: List[str] = []
    peak = 0

    def alive() -> bool:
        return thread.is_alive() and not crashed

    def run_mix(crowd: Crowd, n: int) -> None:
        nonlocal peak
        sent = 0
        while sent < n and alive():
            if time.monotonic() - started > args.max_seconds:
                raise TimeoutError(f"--max-seconds {args.max_seconds} passed")
            for _ in range(min(args.batch, n - sent)):
                crowd.send(hostile_message(rng))
                sent += 1
            crowd.react()
            good.submit()
            good.collect()
            peak = max(peak, rss_bytes())

    def settle(crowd: Crowd) -> None:
        """Close the crowd; wait until the queue has drained (a last good job and all the
        earlier ones are answered) and kept outcomes and dead fakes have expired."""
        crowd.close()
        good.submit()
        good.collect(wait=60.0)
        if good.pending:
            failed.append(f"{len(good.pending)} good job(s) without an outcome after 60 s")
        # Requests whose attempt went to a fake REQ-protocol worker that closed its
        # socket stay running until their deadline (docs/PROTOCOL.md section 6): up
        # to MAX_REQUEST_TIMEOUT_MS for those that asked for it. So `running` need
        # not reach 0; what matters is that it stays small (printed at the end).
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            s = broker.stats()
            if s["retained"] == 0 and s["workers"] <= 1 and s["queued"] == 0 and s["running"] == 0:
                break
            time.sleep(0.1)
        time.sleep(0.5)

    try:
        try:
            good.client.call(b"ping", wait=30.0)
        except Exception as exc:
            print(f"soak: the good worker did not answer a first job: {exc!r}", file=sys.stderr)
            return 1
        warm = Crowd(ctx, endpoints, seed=args.seed + 1)
        run_mix(warm, args.warmup)
        settle(warm)
        before = rss_bytes()
        stats_before = broker.stats()
        crowd = Crowd(ctx, endpoints, seed=args.seed + 2)
        t0 = time.monotonic()
        run_mix(crowd, args.messages)
        duration = time.monotonic() - t0
        sent = crowd.sent
        settle(crowd)
        after = rss_bytes()
        stats = broker.stats()
    except (TimeoutError, zmq.Again) as exc:
        print(f"soak: FAILED: {exc!r} (broker alive: {alive()})", file=sys.stderr)
        return 1
    finally:
        survived = alive()
        good.close()
        broker.stop()
        thread.join(10)
        try:
            broker.close()
        except Exception:
            pass
        worker.kill()
        worker.wait(10)
        ctx.destroy(linger=0)

    failed += good.failures[:20]
    if not survived:
        failed.append(f"the broker thread died: {crashed!r}")
    growth = after - before
    bound = int(args.rss_bound_mib * (1 << 20))
    if growth > bound:
        failed.append(f"RSS grew by {growth / (1 << 20):.1f} MiB, more than the bound {args.rss_bound_mib} MiB")

    mib = 1 << 20
    print(f"core:               {args.core}")
    print(
        f"messages sent:      {sent:,} (+{args.warmup:,} warm-up), fresh sockets: {crowd.fresh_sockets:,}, "
        f"messages received by the crowd: {crowd.received:,}"
    )
    print(f"duration:           {duration:.1f} s, {sent / duration:,.0f} messages/s")
    print(
        f"RSS (whole process: broker thread, client, crowd): before {before / mib:.1f} MiB, "
        f"after {after / mib:.1f} MiB ({growth / mib:+.1f} MiB), peak {peak / mib:.1f} MiB; bound +{args.rss_bound_mib:g} MiB"
    )
    print(
        f"good client:        {good.completed:,} jobs completed with the right answer, {len(good.failures)} wrong or failed"
    )
    delta = {k: stats[k] - stats_before[k] for k in protocol.COUNTERS if k in stats and k in stats_before}
    print("counters (soak only): " + ", ".join(f"{k}={v:,}" for k, v in delta.items() if v))
    print("gauges at the end:  " + ", ".join(f"{k}={stats[k]:,}" for k in protocol.GAUGES if k in stats))
    print("drops (whole run):")
    for reason, count in sorted(stats["drops"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:>10,}  {reason}")
    if failed:
        for line in failed:
            print(f"soak: FAILED: {line}", file=sys.stderr)
        return 1
    print("soak: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
