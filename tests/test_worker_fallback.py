"""A fastbroker.Worker speaks FBW02 by default, FBW01 against a broker without FBW02,
and ends up in FBW02 when started before its broker (docs/PROTOCOL.md section 13.4).

The broker without FBW02 is played by the test: a raw ROUTER that ignores every FBW02
message (as a broker of before drops it, unanswered) and speaks FBW01, heartbeats
included. The broker started late is a real Broker in a thread (rigs.BrokerRig).
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from fastbroker import ConfigError
from fastbroker.protocol import (
    CMD_ANSWER,
    CMD_EXTEND,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_TASK,
    R_FAILED,
    R_OK,
    WORKER_SIGNATURE as SIG,
    WORKER_SIGNATURE_V2 as SIG2,
)
from fastbroker.worker import wire
from rigs import FAKE_WAIT, BrokerRig, tid, wait_until

from workers_for_tests import DealerEcho

HEARTBEAT = 0.1  # the worker gives up on a silent connection after 3 of these


class OldBroker:
    """A ROUTER that speaks FBW01 only: FBW02 messages are counted and ignored."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.ignored: list = []  # [command, body...] of each FBW02 message
        self.identity = None
        self.last_beat = 0.0

    def recv(self, timeout: float = FAKE_WAIT) -> list:
        """The next FBW01 message other than HEARTBEAT, as [command, body...]."""
        got: list = []
        self.serve(lambda: got, got, timeout, "an FBW01 message")
        return got[0]

    def serve(self, done, got: list, timeout: float = FAKE_WAIT, what: str = "") -> None:
        """Read until done() is true: FBW02 messages go to ``ignored``, the first FBW01
        message other than HEARTBEAT to `got`; the worker that last spoke FBW01 gets a
        HEARTBEAT every HEARTBEAT meanwhile."""
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            if done():
                return
            now = time.monotonic()
            assert now < deadline, f"no {what} in {timeout} s; ignored {self.ignored}"
            if self.identity is not None and now - self.last_beat >= HEARTBEAT:
                self.sock.send_multipart([self.identity, b"", SIG, CMD_HEARTBEAT])
                self.last_beat = now
            if not self.sock.poll(int(HEARTBEAT * 500)):
                continue
            identity, *frames = self.sock.recv_multipart()
            if frames[1] == SIG2:
                self.ignored.append(frames[2:])
                continue
            assert frames[:2] == [b"", SIG], frames
            self.identity = identity
            if frames[2] != CMD_HEARTBEAT and not got:
                got.append(frames[2:])
        raise AssertionError("unreachable: the loop is bounded by its deadline")

    def send(self, command: bytes, *body: bytes) -> None:
        self.sock.send_multipart([self.identity, b"", SIG, command, *body])


def run_worker(worker):
    thread = threading.Thread(target=worker.run, name="fallback-worker", daemon=True)
    thread.start()
    return thread


def test_a_worker_falls_back_to_fbw01_against_a_broker_without_fbw02(ctx):
    broker = OldBroker(ctx)
    worker = DealerEcho(ctx, broker.address, credit=2, heartbeat=HEARTBEAT, liveness=3)
    worker.stop_grace = 0.01
    thread = run_worker(worker)
    try:
        # Its FBW02 READY went unanswered; the next connection speaks FBW01.
        assert broker.recv() == [CMD_READY, (2).to_bytes(4, "big")]
        assert [CMD_READY, (2).to_bytes(4, "big")] in broker.ignored
        assert worker.stats.reconnects >= 1
        broker.send(CMD_TASK, tid(1), b"one")
        assert broker.recv() == [CMD_ANSWER, tid(1), b"-one"]
        # The FBW02 offer on the heard connection (a second READY in FBW02, after the
        # first connection's READY and heartbeats) was ignored: it stays in FBW01.
        ready = [CMD_READY, (2).to_bytes(4, "big")]
        broker.serve(lambda: broker.ignored.count(ready) >= 2, [], what="the FBW02 offer")
        broker.send(CMD_TASK, tid(2), b"two")
        assert broker.recv() == [CMD_ANSWER, tid(2), b"-two"]
        assert worker.stats.protocol == 1
    finally:
        worker.stop()
        thread.join(FAKE_WAIT)
        worker.close()
    assert not thread.is_alive()


def test_a_worker_that_only_speaks_fbw01_never_tries_fbw02(ctx):
    broker = OldBroker(ctx)
    worker = DealerEcho(ctx, broker.address, heartbeat=HEARTBEAT, liveness=3, protocol=1)
    thread = run_worker(worker)
    try:
        assert broker.recv() == [CMD_READY, (1).to_bytes(4, "big")]
        broker.send(CMD_TASK, tid(1), b"x")
        assert broker.recv() == [CMD_ANSWER, tid(1), b"-x"]
        assert (broker.ignored, worker.stats.reconnects, worker.stats.protocol) == ([], 0, 1)
    finally:
        worker.stop()
        thread.join(FAKE_WAIT)
        worker.close()


def test_a_worker_started_before_its_broker_ends_up_in_fbw02(tmp_path):
    rig = BrokerRig(tmp_path)
    try:
        worker = rig.worker(DealerEcho, credit=4)
        # Nobody there: connections end silent, and the worker alternates protocols.
        wait_until(lambda: worker.stats.reconnects >= 2, FAKE_WAIT, message="two silent connections")
        rig.start_broker()
        client = rig.client()
        assert client.call(b"hello", wait=FAKE_WAIT) == b"-hello"
        wait_until(lambda: worker.stats.protocol == 2, FAKE_WAIT, message="the worker to speak FBW02")
        assert list(client.map([b"%d" % n for n in range(50)])) == [b"-%d" % n for n in range(50)]
    finally:
        rig.close()


@pytest.mark.parametrize("protocol", [0, 3, "2"])
def test_a_worker_protocol_other_than_1_or_2_is_a_config_error(ctx, protocol):
    with pytest.raises(ConfigError, match="protocol must be 1"):
        DealerEcho(ctx, "tcp://127.0.0.1:5", protocol=protocol)


def test_messages_waiting_are_rewritten_in_the_other_protocol():
    # What _use_protocol does to the outbox when the worker changes protocol.
    t1, t2 = tid(1), tid(2)
    batch = wire.AnswerBatch()
    batch.add(t1, R_OK, [b"a", b"b"])
    batch.add(t2, R_FAILED, [b"ValueError", b"bad"])
    (v2,) = batch.close()
    assert v2 == [b"", SIG2, CMD_ANSWER, t1 + R_OK + b"\x00\x02" + t2 + R_FAILED + b"\x00\x02", b"a", b"b"] + [
        b"ValueError",
        b"bad",
    ]
    assert wire.convert(v2, v2=False) == [
        [b"", SIG, CMD_ANSWER, t1, b"a", b"b"],
        [b"", SIG, CMD_FAILED, t2, b"ValueError", b"bad"],
    ]
    assert wire.convert(v2, v2=True) == [v2]
    assert wire.convert([b"", SIG, CMD_ANSWER, t1, b"x"], v2=True) == [
        [b"", SIG2, CMD_ANSWER, t1 + R_OK + b"\x00\x01", b"x"]
    ]
    extend = [b"", SIG, CMD_EXTEND, t1, b"\x00\x00\x00\x01"]
    assert wire.convert(extend, v2=True) == [[b"", SIG2, *extend[2:]]]
    # A TASK of two jobs, header last; a header that does not match is None.
    body = [b"p1", b"p2a", b"p2b", t1 + b"\x00\x01" + t2 + b"\x00\x02"]
    assert wire.split_tasks(body) == [(t1, [b"p1"]), (t2, [b"p2a", b"p2b"])]
    assert wire.split_tasks(body[1:]) is None
    assert wire.split_tasks([b"p", t1 + b"\x00\x00"]) is None
    assert wire.split_tasks([]) is None
