"""Limits and backpressure, with a broker run through the CLI (``fastbroker broker``):
``--max-queue`` refuses requests beyond it at once, ``--max-message`` disconnects a
peer sending a bigger frame while the broker serves on, and the requests endpoint's
send high-water mark keeps a client that never reads its answers from growing the
broker (docs/PROTOCOL.md section 9)."""

from __future__ import annotations

import struct
import time
import uuid
from pathlib import Path
from typing import List

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fastbroker import Client, ReqClient, TaskAborted, Worker
from fastbroker.client.outcomes import Rejected
from fastbroker.protocol import (
    C_STATS,
    C_SUBMIT,
    CLIENT_SIGNATURE,
    OPT_NO_ACK,
    R_STATS,
    REJECT_QUEUE_FULL,
    decode_stats,
)
from fastbroker.server.broker import REQUESTS_RCVHWM, REQUESTS_SNDHWM
from rigs import wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""
HEARTBEAT = 0.2
MiB = 1 << 20
ALLOCATOR_SLACK = 24 * MiB
"""What a broker's resident memory may grow by beyond the bytes a test accounts for:
malloc arenas that keep freed blocks, libzmq's per-connection buffers, Python objects
(pure core) of the requests in flight. Far below the volumes the tests push through."""


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


@pytest.fixture
def cli_broker(procs, addrs, core_name):
    """Starts `fastbroker broker` with the options given; returns its process once it answers."""

    def start(*options: str):
        proc = procs.start(
            ["-v", "broker", "--core", core_name, "--heartbeat", str(HEARTBEAT), *options, *addrs], "broker"
        )
        stats(addrs[0])  # answers: it is up
        return proc

    return start


def stats(address: str) -> dict:
    """The broker's figures, asked over FBC01 STATS."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        rid = uuid.uuid4().bytes
        sock.send_multipart([CLIENT_SIGNATURE, C_STATS, rid])
        assert sock.poll(int(WAIT * 1000)), f"no STATS reply from {address}"
        frames = sock.recv_multipart()
        assert frames[:3] == [CLIENT_SIGNATURE, R_STATS, rid], frames[:3]
        return decode_stats(frames[3], frames[4])
    finally:
        sock.close()


def memory(pid: int) -> dict:
    """VmRSS (resident now) and VmHWM (the peak resident so far) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


def submit_frames(payload: bytes, ack: bool = True) -> List[bytes]:
    options = b"" if ack else struct.pack(">BII", OPT_NO_ACK, 0, 0)
    return [CLIENT_SIGNATURE, C_SUBMIT, uuid.uuid4().bytes, options, payload]


def flood(ctx: zmq.Context, address: str, count: int, payload: bytes) -> zmq.Socket:
    """A raw FBC01 DEALER that sends `count` SUBMITs (no ACCEPTED wanted) and never
    reads. Returned open: its owner closes it."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))  # a blocked send fails the test, not hangs it
    sock.connect(address)
    for _ in range(count):
        sock.send_multipart(submit_frames(payload, ack=False))
    return sock


class Recording(Worker):
    """Answers b"-" + data; a payload of digits N is answered with N bytes instead.
    Remembers the size of every payload it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: List[int] = []

    def process(self, data: bytes) -> bytes:
        self.sizes.append(len(data))
        return bytes(int(data)) if data.isdigit() else b"-" + data


def test_max_queue_rejects_beyond_it_at_once_and_memory_stays_bounded(cli_broker, addrs, ctx, procs):
    limit = 3
    broker = cli_broker("--max-queue", str(limit), "--retention-memory", "1M")
    with Client(addrs[0], ctx) as client:
        waiting = [client.submit(b"wait-%d" % i) for i in range(limit)]
        wait_until(lambda: stats(addrs[0])["queued"] == limit, timeout=WAIT, message="the queue to fill")
        with pytest.raises(Rejected) as refused:
            client.submit(b"one too many").result(WAIT)
        assert (refused.value.code, refused.value.reason) == (REJECT_QUEUE_FULL, "queue full")
        # A REQ client's only "no" is the empty answer; it comes at once, not after a timeout.
        with ReqClient(addrs[0], ctx, timeout=WAIT) as req:
            started = time.monotonic()
            with pytest.raises(TaskAborted):
                req.request(b"req too")
            assert time.monotonic() - started < WAIT / 2
        assert not any(f.done() for f in waiting)

        # A flood of refused requests costs nothing that stays: each is freed as it is
        # refused. What may sit in the broker at once is one client's read-ahead pipe
        # (REQUESTS_RCVHWM messages), while the broker catches up.
        before = memory(broker.pid)["VmRSS"]
        count, size = 8000, 16 * 1024
        sock = flood(ctx, addrs[0], count, b"x" * size)
        try:
            wait_until(
                lambda: stats(addrs[0])["rejected"] == 2 + count,
                timeout=WAIT,
                message=f"{count} rejections\n{procs.output()}",
            )
        finally:
            sock.close()
        figures = stats(addrs[0])
        assert (figures["queued"], figures["requests"]) == (limit, limit), figures
        grown = memory(broker.pid)["VmHWM"] - before
        bound = REQUESTS_RCVHWM * size + ALLOCATOR_SLACK
        assert grown < bound < count * size, (
            f"the broker grew by {grown >> 20} MiB for {count * size >> 20} MiB refused"
        )


def test_max_message_disconnects_the_sender_and_the_broker_serves_on(cli_broker, addrs, ctx, threads):
    limit = 64 * 1024
    cli_broker("--max-message", "64K")
    worker = threads(Recording(None, addrs[1], credit=1, heartbeat=HEARTBEAT))
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    monitor = big.get_monitor_socket()
    big.connect(addrs[0])
    try:
        big.send_multipart(submit_frames(b"b" * (limit + 1)))
        # libzmq closes the connection of a peer that sends a frame above the limit.
        deadline = time.monotonic() + WAIT
        events = []
        while zmq.EVENT_DISCONNECTED not in events and time.monotonic() < deadline:
            if monitor.poll(100):
                events.append(recv_monitor_message(monitor)["event"])
        assert zmq.EVENT_DISCONNECTED in events, "the broker did not disconnect the sender of a frame too big"
        assert not big.poll(0), "a reply to a message that should never have been read"
    finally:
        big.disable_monitor()
        monitor.close()
        big.close()
    # The broker serves on: a frame at the limit passes, as does every other client.
    with Client(addrs[0], ctx) as client:
        assert client.call(b"small", wait=WAIT) == b"-small"
        assert client.call(b"a" * (limit - 1), wait=WAIT) == b"-" + b"a" * (limit - 1)
    with ReqClient(addrs[0], ctx, timeout=WAIT) as req:
        assert req.request(b"req") == b"-req"
    assert worker.sizes == [5, limit - 1, 3]
    figures = stats(addrs[0])
    assert (figures["requests"], figures["answered"]) == (3, 3), figures


def test_a_client_that_never_reads_cannot_grow_the_broker(cli_broker, addrs, ctx, threads, procs):
    # Kept outcomes are bounded by their own option; 1M keeps them out of the count.
    broker = cli_broker("--retention-memory", "1M")
    threads(Recording(None, addrs[1], credit=8, heartbeat=HEARTBEAT))
    before = memory(broker.pid)["VmRSS"]
    count, size = 6000, 32 * 1024
    sock = flood(ctx, addrs[0], count, str(size).encode())
    try:
        # A well-behaved client is served meanwhile (behind the flood: the queue is a FIFO).
        with Client(addrs[0], ctx) as client:
            assert client.call(b"still here", wait=WAIT) == b"-still here"
        wait_until(
            lambda: stats(addrs[0])["answered"] == count + 1, timeout=WAIT, message=f"every answer\n{procs.output()}"
        )
    finally:
        sock.close()
    # Every answer was handed to the requests ROUTER; beyond REQUESTS_SNDHWM of them
    # queued for the client that does not read, the ROUTER dropped them.
    grown = memory(broker.pid)["VmHWM"] - before
    bound = REQUESTS_SNDHWM * size + ALLOCATOR_SLACK
    assert grown < bound < count * size, (
        f"the broker grew by {grown >> 20} MiB for {count * size >> 20} MiB of unread answers"
    )
    assert stats(addrs[0])["queued"] == 0
