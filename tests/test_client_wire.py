"""The client's wire, both twins side by side (client/_wire.pyx, client/wire.py): whole
messages in and out of real sockets, the full-queue case, the socket's end. Both run in
every test run: the compiled one must behave exactly as the pure one it replaces."""

from __future__ import annotations

import pytest
import zmq

from fastbroker.client import _wire, wire
from rigs import wait_until

TWINS = [pytest.param(_wire, id="compiled"), pytest.param(wire, id="pure")]


@pytest.fixture
def pair(tmp_path):
    ctx = zmq.Context(1)
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
    b.bind(f"ipc://{tmp_path}/wire")
    a.connect(f"ipc://{tmp_path}/wire")  # a connecting DEALER queues at once: `a` sends
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


@pytest.mark.parametrize("twin", TWINS)
def test_messages_go_and_come_whole_in_order_up_to_the_limit(twin, pair):
    a, b = pair
    messages = [[b"one"], [b"", b"two", b"x" * 100_000], [b"three", b""], [bytes(range(256))]]
    for message in messages:
        assert twin.send_message(a, message) is True
    got: list = []
    sizes: list = []  # of each call's batch

    def receive() -> bool:
        batch = twin.recv_messages(b, 3)
        sizes.append(len(batch))
        got.extend(batch)
        return len(got) >= len(messages)

    wait_until(receive, message="the four messages")
    assert got == messages
    assert max(sizes) <= 3  # the limit: three at most in one call
    assert twin.recv_messages(b, 100) == []  # nothing waits: no blocking, no error


@pytest.mark.parametrize("twin", TWINS)
def test_frames_of_other_buffer_types_are_sent_as_their_bytes(twin, pair):
    a, b = pair
    assert twin.send_message(a, [bytearray(b"ab"), memoryview(b"cd")]) is True
    got: list = []
    wait_until(lambda: got.extend(twin.recv_messages(b, 10)) or got, message="the message")
    assert got == [[b"ab", b"cd"]]


@pytest.mark.parametrize("twin", TWINS)
def test_a_full_queue_sends_nothing_and_says_so(twin, tmp_path):
    ctx = zmq.Context(1)
    a = ctx.socket(zmq.DEALER)
    a.setsockopt(zmq.LINGER, 0)
    a.setsockopt(zmq.SNDHWM, 2)
    a.connect(f"ipc://{tmp_path}/nobody")  # no peer: the pipe fills at the mark
    try:
        sent = 0
        for _ in range(100):  # bounded: the mark is 2 (libzmq may allow a few more)
            if not twin.send_message(a, [b"head", b"body"]):
                break
            sent += 1
        assert 1 <= sent < 100
        assert twin.send_message(a, [b"head", b"body"]) is False
    finally:
        a.close(0)
        ctx.term()


@pytest.mark.parametrize("twin", TWINS)
def test_a_closed_socket_raises_instead_of_touching_freed_memory(twin, pair):
    a, b = pair
    a.close(0)
    with pytest.raises(zmq.ZMQError):
        twin.send_message(a, [b"x"])
    with pytest.raises(zmq.ZMQError):
        twin.recv_messages(a, 1)


@pytest.mark.parametrize("twin", TWINS)
def test_an_empty_message_is_refused(twin, pair):
    a, _ = pair
    with pytest.raises((ValueError, IndexError)):
        twin.send_message(a, [])


@pytest.mark.parametrize("twin", TWINS)
def test_a_call_takes_at_most_its_limit(twin):
    # inproc: a sent message is in the peer's queue when send returns, so the counts are exact.
    ctx = zmq.Context(1)
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        b.bind("inproc://limit")
        a.connect("inproc://limit")
        for i in range(5):
            assert twin.send_message(a, [b"m", b"%d" % i])
        assert twin.recv_messages(b, 3) == [[b"m", b"0"], [b"m", b"1"], [b"m", b"2"]]
        assert twin.recv_messages(b, 3) == [[b"m", b"3"], [b"m", b"4"]]
        assert twin.recv_messages(b, 3) == []
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
