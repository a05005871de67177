"""The sync Client's hand-over between its callers and its I/O thread (client/handoff.py
and its compiled twin, client/_handoff.pxi in client/_book.pyx): each test runs on both,
whatever FASTBROKER_PURE says, so that they keep the same behaviour."""

from __future__ import annotations

import concurrent.futures
import importlib
import os
import threading
import uuid
from collections import deque

import pytest

from fastbroker import ConfigError
from fastbroker.client.futures import RequestFuture
from fastbroker.protocol import C_SUBMIT, CLIENT_SIGNATURE
from rigs import wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


@pytest.fixture(params=["fastbroker.client._book", "fastbroker.client.handoff"], ids=["compiled", "pure"])
def handoff(request):
    return importlib.import_module(request.param)  # the compiled one is built by `make install`


def test_an_outcome_delivered_before_anyone_waits_makes_no_condition(handoff):
    done, failed = RequestFuture(b"1" * 16), RequestFuture(b"2" * 16)
    handoff.deliver(done, b"answer", None)
    error = ValueError("bad")
    handoff.deliver(failed, None, error)
    assert done._made is None and failed._made is None
    assert done.result(0) == b"answer" and failed.exception(0) is error
    handoff.deliver(done, b"again", None)  # told once: a second outcome is ignored
    assert done.result(0) == b"answer"


def test_a_cancelled_future_keeps_its_cancellation(handoff):
    told = []
    future = RequestFuture(b"1" * 16, told.append)
    assert future.cancel()
    handoff.deliver(future, b"too late", None)
    assert future.cancelled() and told == [future]


def test_a_future_waited_for_in_another_thread_is_woken(handoff):
    future = RequestFuture()
    got = []
    waiter = threading.Thread(target=lambda: got.append(future.result(WAIT)))
    waiter.start()
    # The waiter made the Condition to wait on it.
    wait_until(lambda: future._made is not None, timeout=WAIT, interval=0.001, message="the waiter to wait")
    handoff.deliver(future, b"late", None)
    waiter.join(WAIT)
    assert got == [b"late"]


def test_outcomes_delivered_by_one_thread_while_another_reads_them_in_order(handoff):
    """The compiled deliver settles a future without RequestFuture's lock: a reader that
    makes the Condition meanwhile must still see every outcome (or be woken by it)."""
    futures = [RequestFuture() for _ in range(3000)]

    def settle():
        for i, future in enumerate(futures):
            handoff.deliver(future, i, None if i % 3 else KeyError(i))

    setter = threading.Thread(target=settle)
    setter.start()
    for i, future in enumerate(futures):
        if i % 3:
            assert future.result(WAIT) == i
        else:
            assert isinstance(future.exception(WAIT), KeyError)
    setter.join(WAIT)


def test_a_map_slot_is_resolved_once_and_wakes_the_map(handoff):
    slot = handoff.MapSlot(b"1" * 16)
    event = threading.Event()
    assert not slot.done and slot.request_id == b"1" * 16
    timer = threading.Timer(0.05, handoff.deliver, args=(slot, b"answer", None))
    timer.start()
    assert slot.result(event) == b"answer"  # waited for the I/O thread's deliver
    timer.join(WAIT)
    handoff.deliver(slot, b"again", None)
    assert slot.done and slot.result(event) == b"answer"
    failed = handoff.MapSlot(b"2" * 16)
    failed.resolve(None, KeyError("x"))
    with pytest.raises(KeyError):
        failed.result(event)


def test_submit_commands_carry_the_fbc01_submit_message(handoff):
    rid = b"r" * 16
    sink = object()

    def fields(command):
        return command.request_id, command.message, command.future, command.multipart, command.size

    assert fields(handoff.submit_command(b"one", b"opts", rid, sink)) == (
        rid,
        [CLIENT_SIGNATURE, C_SUBMIT, rid, b"opts", b"one"],
        sink,
        False,
        3,
    )
    assert fields(handoff.submit_command([b"a", bytearray(b"bc")], b"", rid, sink)) == (
        rid,
        [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"a", b"bc"],
        sink,
        True,
        3,
    )
    assert handoff.submit_command(memoryview(b"mv"), b"", rid, sink).message[-1] == b"mv"
    with pytest.raises(TypeError, match="not str"):
        handoff.submit_command("text", b"", rid, sink)
    with pytest.raises(ValueError, match="at least one"):
        handoff.submit_command([], b"", rid, sink)


def test_a_book_takes_only_entries_as_submit_commands(handoff):
    book = importlib.import_module(handoff.__name__.replace("handoff", "book")).RequestBook(
        lambda m: None, lambda f, v, e: None, 2.0
    )
    good = handoff.submit_command(b"p", b"", b"r" * 16, "sink")
    with pytest.raises(TypeError):
        book.submit_many([good, ("submit", b"s" * 16, [], "sink", False)])
    assert book.holds(b"r" * 16) and not book.holds(b"s" * 16)


def test_submit_request_gives_a_future_with_the_id_and_the_cancel_hook(handoff):
    told = []
    given = uuid.UUID(int=7)
    command, future = handoff.submit_request(b"p", b"", str(given), told.append)
    assert type(future) is RequestFuture and future.request_id == given.bytes == command.request_id
    assert command.future is future and future._made is None
    future.cancel()
    assert told == [future]
    _, fresh = handoff.submit_request(b"p", b"", None, told.append)
    assert uuid.UUID(bytes=fresh.request_id).version == 4
    with pytest.raises(ConfigError, match="16 bytes"):
        handoff.submit_request(b"p", b"", b"short", told.append)


def test_map_commands_take_at_most_room_and_say_when_the_source_ended(handoff):
    source = iter([b"%d" % i for i in range(5)])
    in_flight: deque = deque()
    commands, ended = handoff.map_commands(source, 3, b"", in_flight)
    assert not ended and len(commands) == 3 and len(in_flight) == 3
    assert [c.message[-1] for c in commands] == [b"0", b"1", b"2"]
    assert [c.future for c in commands] == list(in_flight)
    assert all(
        type(slot) is handoff.MapSlot and c.request_id == slot.request_id for c, slot in zip(commands, in_flight)
    )
    commands, ended = handoff.map_commands(source, 3, b"", in_flight)
    assert ended and [c.message[-1] for c in commands] == [b"3", b"4"] and len(in_flight) == 5
    ids = [slot.request_id for slot in in_flight]
    assert len(set(ids)) == 5 and all(uuid.UUID(bytes=i).version == 4 for i in ids)
    assert handoff.map_commands(iter(()), 3, b"", in_flight) == ([], True)


def test_ids_drawn_across_blocks_are_all_different(handoff):
    # Three blocks of ID_BATCH ids and more: a refill never hands out an id twice.
    in_flight: deque = deque()
    handoff.map_commands(iter([b""] * 3500), 3500, b"", in_flight)
    assert len({slot.request_id for slot in in_flight}) == 3500


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_does_not_hand_out_its_parents_next_ids(handoff):
    in_flight: deque = deque()
    handoff.map_commands(iter([b""]), 1, b"", in_flight)  # the parent's block is drawn
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out at once
        try:
            child: deque = deque()
            handoff.map_commands(iter([b""]), 1, b"", child)
            os.write(write_end, child[0].request_id)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 16)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    handoff.map_commands(iter([b""]), 1, b"", in_flight)
    assert len(child_id) == 16 and child_id != in_flight[1].request_id


def test_a_plain_future_is_resolved_the_futures_way(handoff):
    future: concurrent.futures.Future = concurrent.futures.Future()
    handoff.deliver(future, b"x", None)
    assert future.result(0) == b"x"
    handoff.deliver(future, b"y", None)  # resolved already: left as it is
    assert future.result(0) == b"x"


def test_a_batch_whose_payload_raises_leaves_no_slot_to_cancel(handoff):
    in_flight: deque = deque()
    with pytest.raises(TypeError, match="not str"):
        handoff.map_commands(iter([b"a", b"b", "text", b"d"]), 4, b"", in_flight)
    assert not in_flight  # the client never got them: nothing for the map to cancel

    def broken():
        yield b"a"
        raise KeyError("the source failed")

    with pytest.raises(KeyError):
        handoff.map_commands(broken(), 4, b"", in_flight)
    assert not in_flight
