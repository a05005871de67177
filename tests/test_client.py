"""fastbroker.Client and AsyncClient (FBC01, docs/PROTOCOL.md section 10) against a
real Broker run in a thread, with real DEALER workers (threads or processes).

The first tests drive the RequestBook (the compiled one, or the pure twin under
FASTBROKER_PURE) directly: it is the logic both
clients share (routing replies by id, the lazy pirate), and it does no I/O."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import struct
import threading
import time
import uuid
from typing import List

import pytest
import zmq
import zmq.asyncio

import fastbroker
from fastbroker import AsyncClient, BrokerError, Client, ConfigError, Status, Worker
from fastbroker._select import client_book
from fastbroker.client.protocol import decode_replies, decode_reply, encode_options
from fastbroker.protocol import (
    C_CANCEL,
    C_RESULT,
    C_STATUS,
    C_SUBMIT,
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    MAX_REQUEST_TIMEOUT_MS,
    R_ACCEPTED,
    R_CANCELLED,
    R_FAILED,
    R_OK,
    R_REJECTED,
    R_REPLIES,
    R_STATUS,
    R_TIMED_OUT,
    R_UNKNOWN,
    SUBMIT_RECORD_SIZE,
)
from fastbroker.server.metrics import request_stats
from rigs import BrokerRig, runs, wait_until

from workers_for_tests import DealerEcho, DealerFailer, DealerGated

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


# -- the shared logic, without sockets ---------------------------------------------------


def test_options_frame_is_empty_for_defaults_and_9_bytes_otherwise():
    assert encode_options() == b""
    assert encode_options(1.5, 3) == struct.pack(">BII", 0, 1500, 3)
    assert encode_options(ack=False) == struct.pack(">BII", 1, 0, 0)
    assert encode_options(0.0001) == struct.pack(">BII", 0, 1, 0)  # never 0: that is "the broker's"
    assert encode_options(MAX_REQUEST_TIMEOUT_MS / 1000) == struct.pack(">BII", 0, MAX_REQUEST_TIMEOUT_MS, 0)


@pytest.mark.parametrize(
    "timeout, tries, expected",
    [
        (0, None, "timeout must be above 0"),
        (-1, None, "timeout must be above 0"),
        (float("nan"), None, "timeout must be above 0"),
        (MAX_REQUEST_TIMEOUT_MS / 1000 + 1, None, "at most"),
        ("soon", None, "number of seconds"),
        (None, 0, "tries must be between 1"),
        (None, 1.5, "whole number"),
        (None, True, "whole number"),
        (None, 2_000_000, "tries must be between 1"),
    ],
)
def test_bad_options_fail_in_the_client_with_config_error(timeout, tries, expected):
    with pytest.raises(ConfigError, match=expected):
        encode_options(timeout, tries)


def test_decode_replies():
    rid = uuid.uuid4().bytes
    ok = decode_reply([CLIENT_SIGNATURE, R_OK, rid, b"a", b"b"])
    assert ok.request_id == rid and ok.frames == [b"a", b"b"] and ok.error is None and ok.is_outcome
    failed = decode_reply([CLIENT_SIGNATURE, R_FAILED, rid, b"ValueError", "bad \u00e9".encode()])
    assert isinstance(failed.error, fastbroker.TaskFailed)
    assert (failed.error.type_name, failed.error.message) == ("ValueError", "bad \u00e9")
    assert isinstance(decode_reply([CLIENT_SIGNATURE, R_TIMED_OUT, rid]).error, fastbroker.TaskTimedOut)
    assert isinstance(decode_reply([CLIENT_SIGNATURE, R_CANCELLED, rid]).error, fastbroker.TaskCancelled)
    rejected = decode_reply([CLIENT_SIGNATURE, R_REJECTED, rid, b"\x01", b"bad options"])
    assert isinstance(rejected.error, fastbroker.Rejected) and (rejected.error.code, rejected.error.reason) == (
        1,
        "bad options",
    )
    status = decode_reply([CLIENT_SIGNATURE, R_STATUS, rid, b"\x02", struct.pack(">I", 2), struct.pack(">I", 3)])
    assert status.status == Status("running", 2, 3)
    assert status.status.describe() == "running (attempt 2 of 3)"
    unlimited = decode_reply([CLIENT_SIGNATURE, R_STATUS, rid, b"\x01", struct.pack(">I", 0), struct.pack(">I", 0)])
    assert unlimited.status == Status("queued", 0, None)
    assert decode_reply([CLIENT_SIGNATURE, R_UNKNOWN, rid]).status == Status("unknown")
    # Malformed: no signature, short id, no answer frame, bad STATUS body, unknown kind.
    for frames in (
        [b"FBC02", R_OK, rid, b"x"],
        [CLIENT_SIGNATURE, R_OK, rid[:15], b"x"],
        [CLIENT_SIGNATURE, R_OK, rid],
        [CLIENT_SIGNATURE, R_STATUS, rid, b"\x02"],
        [CLIENT_SIGNATURE, R_STATUS, rid, b"\x09", b"\0\0\0\0", b"\0\0\0\0"],
        [CLIENT_SIGNATURE, b"\x99", rid],
    ):
        assert decode_reply(frames) is None, frames


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Book:
    """A RequestBook with recorded sends and deliveries."""

    def __init__(self, check_interval: float = 1.0, check_batch: int = 1000, **window) -> None:
        self.sent: List[List[bytes]] = []
        self.delivered: dict = {}
        self.clock = FakeClock()
        self.book = client_book()[0].RequestBook(
            self.sent.append, self._deliver, check_interval, clock=self.clock, check_batch=check_batch, **window
        )

    def _deliver(self, future, value, exc):
        assert future not in self.delivered, "a future was told twice"
        self.delivered[future] = exc if exc is not None else value

    def reply(self, kind: bytes, rid: bytes, *body: bytes):
        return self.book.on_message([CLIENT_SIGNATURE, kind, rid, *body])


def test_book_routes_outcomes_by_id_and_ignores_duplicates():
    b = Book()
    r1, r2 = uuid.uuid4().bytes, uuid.uuid4().bytes
    m1 = [CLIENT_SIGNATURE, C_SUBMIT, r1, b"", b"one"]
    b.book.submit(r1, m1, "f1", False)
    b.book.submit(r2, [CLIENT_SIGNATURE, C_SUBMIT, r2, b"", b"a", b"b"], "f2", True)
    assert b.sent[0] == m1 and len(b.sent) == 2
    b.reply(R_ACCEPTED, r1)
    b.reply(R_OK, r2, b"x", b"y")
    b.reply(R_OK, r1, b"x", b"y")
    assert b.delivered == {"f1": b"xy", "f2": [b"x", b"y"]}
    b.reply(R_OK, r1, b"again")  # a duplicate outcome: nobody waits for it any more
    b.reply(R_FAILED, r1, b"E", b"m")
    assert b.delivered == {"f1": b"xy", "f2": [b"x", b"y"]}
    assert b.book.pending == 0
    r3 = uuid.uuid4().bytes
    b.book.submit(r3, [CLIENT_SIGNATURE, C_SUBMIT, r3, b"\xff" * 9, b"x"], "f3", False)
    b.reply(R_REJECTED, r3, b"\x01", b"bad options")
    assert isinstance(b.delivered["f3"], fastbroker.Rejected) and b.delivered["f3"].code == 1


def test_book_lazy_pirate_result_then_resubmit_or_result():
    b = Book(check_interval=1.0)
    lost, done, running = (uuid.uuid4().bytes for _ in range(3))
    messages = {rid: [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", rid] for rid in (lost, done, running)}
    for rid in (lost, done, running):
        b.book.submit(rid, messages[rid], rid, False)
    b.sent.clear()
    b.clock.now += 0.9
    assert b.book.tick() == 0 and b.sent == []  # not silent long enough
    assert b.book.next_check() == pytest.approx(0.1)
    b.clock.now += 0.1
    assert b.book.tick() == 3
    # RESULT, not STATUS: it also makes this socket a waiter of a request still running.
    assert b.sent == [[CLIENT_SIGNATURE, C_RESULT, rid] for rid in (lost, done, running)]
    b.sent.clear()
    b.reply(R_UNKNOWN, lost)  # the broker lost it: the same SUBMIT again
    b.reply(R_STATUS, done, b"\x03", struct.pack(">I", 1), struct.pack(">I", 0))  # its outcome went astray: RESULT
    b.reply(R_STATUS, running, b"\x02", struct.pack(">I", 1), struct.pack(">I", 0))  # nothing to do
    assert b.sent == [messages[lost], [CLIENT_SIGNATURE, C_RESULT, done]]
    assert b.book.resubmitted == 1
    # A reply restarts the silence: no check until check_interval has passed again.
    assert b.book.tick() == 0
    b.reply(R_OK, done, b"ok")
    assert b.delivered == {done: b"ok"}


def test_book_checks_at_most_a_batch_per_round_and_reaches_every_id():
    b = Book(check_interval=1.0, check_batch=3)
    ids = [uuid.uuid4().bytes for _ in range(7)]
    for rid in ids:
        b.book.submit(rid, [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"x"], rid, False)
    asked = []
    for _ in range(3):
        b.sent.clear()
        b.clock.now += 1.0
        assert b.book.tick() == 3
        asked += [m[2] for m in b.sent]
    assert set(asked) == set(ids)  # 9 queries over 3 rounds reached all 7 ids


def test_book_status_queries_unknown_result_and_cancel():
    b = Book()
    rid = uuid.uuid4().bytes
    b.book.query(rid, FakeFuture("q"))
    b.book.watch(rid, "w", False)
    assert b.sent == [[CLIENT_SIGNATURE, C_STATUS, rid], [CLIENT_SIGNATURE, C_RESULT, rid]]
    b.reply(R_UNKNOWN, rid)
    # The STATUS query gets "unknown"; the RESULT cannot be re-submitted: UnknownRequest.
    assert [type(v).__name__ for v in b.delivered.values()] == ["Status", "UnknownRequest"]
    # CANCEL of a pending request: an UNKNOWN then means it will never run.
    other = uuid.uuid4().bytes
    b.book.submit(other, [CLIENT_SIGNATURE, C_SUBMIT, other, b"", b"x"], "f", False)
    b.book.cancel(other)
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_CANCEL, other]
    b.reply(R_UNKNOWN, other)
    assert isinstance(b.delivered["f"], fastbroker.TaskCancelled)


def _submit(b: Book, payload: bytes = b"x") -> bytes:
    rid = uuid.uuid4().bytes
    b.book.submit(rid, [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", payload], rid, False)
    return rid


def test_book_window_holds_requests_beyond_it_and_sends_them_in_order_as_outcomes_come():
    b = Book(window=3)
    ids = [_submit(b) for _ in range(10)]
    assert [m[2] for m in b.sent] == ids[:3]
    assert b.book.stats() == {
        "in_flight": 3,
        "in_flight_bytes": 3,
        "queued": 7,
        "checks": 0,
        "refetched": 0,
        "resubmitted": 0,
        "protocol": 1,
    }
    b.reply(R_ACCEPTED, ids[0])
    assert len(b.sent) == 3  # ACCEPTED frees nothing: the outcome is still due
    for done, rid in enumerate(ids):
        b.reply(R_OK, rid, b"ok")
        assert b.book.in_flight == min(3, 10 - done - 1)
        assert b.book.in_flight + b.book.queued == 10 - done - 1
    assert [m[2] for m in b.sent] == ids  # each sent once, in submission order
    assert b.delivered == dict.fromkeys(ids, b"ok")


def test_book_window_bytes_bounds_the_payload_in_flight_but_never_blocks_a_lone_large_request():
    b = Book(window=100, window_bytes=10)
    big, small1, small2 = _submit(b, b"x" * 25), _submit(b, b"y" * 4), _submit(b, b"z" * 4)
    assert [m[2] for m in b.sent] == [big]  # alone in flight, though above the bound
    b.reply(R_OK, big, b"ok")
    assert [m[2] for m in b.sent] == [big, small1, small2]
    assert b.book.in_flight_bytes == 8


def test_book_held_request_cancelled_or_forgotten_never_reaches_the_broker():
    b = Book(window=1)
    first, held, dropped = _submit(b), _submit(b), _submit(b)
    b.book.cancel(held)  # by id: CANCELLED at once; CANCEL still goes (the id may be another client's)
    assert isinstance(b.delivered[held], fastbroker.TaskCancelled)
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_CANCEL, held]
    b.book.forget(dropped, dropped, True)  # its future was cancelled: nothing to tell the broker
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_CANCEL, held]
    assert b.book.queued == 0
    b.reply(R_OK, first, b"ok")
    assert [m[1] for m in b.sent] == [C_SUBMIT, C_CANCEL]  # neither held request was ever sent
    assert b.book.in_flight == 0 and b.book.pending == 0


def test_book_lazy_pirate_checks_only_what_is_in_flight_and_counts_refetched():
    b = Book(window=2, check_interval=1.0)
    ids = [_submit(b) for _ in range(5)]
    b.sent.clear()
    b.clock.now += 1.0
    assert b.book.tick() == 2
    assert b.sent == [[CLIENT_SIGNATURE, C_RESULT, rid] for rid in ids[:2]]
    b.reply(R_OK, ids[0], b"ok")  # the outcome the RESULT fetched
    assert b.book.stats()["refetched"] == 1 and b.book.stats()["checks"] == 2
    b.reply(R_UNKNOWN, ids[4])  # about a held id (a status() of it): no resubmission
    assert b.book.resubmitted == 0 and b.sent[-1][2] == ids[2]


def test_book_v2_gathers_the_submits_of_a_turn_into_fbc02_batches_and_reads_replies():
    pending = []
    b = Book(window=4, v2=True, on_pending=lambda: pending.append(1))
    ids = [_submit(b, b"p%d" % i) for i in range(6)]
    assert b.sent == [] and pending == [1]  # gathered; the loop was told once
    assert b.book.flush_submits() == 1
    [message] = b.sent
    assert message[:2] == [CLIENT_SIGNATURE_V2, C_SUBMIT]
    header = message[2]
    assert len(header) == 4 * SUBMIT_RECORD_SIZE  # the window: 4 of 6
    assert [header[i : i + 16] for i in range(0, len(header), SUBMIT_RECORD_SIZE)] == ids[:4]
    assert message[3:] == [b"p0", b"p1", b"p2", b"p3"]
    # One REPLIES message: two ACCEPTED, an OK (2 frames), a FAILED.
    records = [(ids[0], R_ACCEPTED, []), (ids[1], R_ACCEPTED, []), (ids[0], R_OK, [b"a", b"b"])]
    records.append((ids[1], R_FAILED, [b"ValueError", b"bad"]))
    head = b"".join(rid + code + len(body).to_bytes(2, "big") for rid, code, body in records)
    b.book.on_message([CLIENT_SIGNATURE_V2, R_REPLIES, head, *(f for r in records for f in r[2])])
    assert b.delivered[ids[0]] == b"ab" and isinstance(b.delivered[ids[1]], fastbroker.TaskFailed)
    assert b.book.heard_v2
    b.sent.clear()
    assert b.book.flush_submits() == 1  # the two outcomes let two held requests in
    assert b.sent[0][3:] == [b"p4", b"p5"]


def test_book_v2_sends_gathered_submits_before_a_later_fbc01_command():
    # The broker must see a request before a STATUS or CANCEL about it: a STATUS sent
    # ahead of its request's batch found it UNKNOWN (seen in `make demo`).
    b = Book()
    b.book.v2 = True
    rid, _ = _submit(b, b"job"), _submit(b, b"other")
    b.book.query(rid, FakeFuture("q"))
    b.book.cancel(rid)
    assert [m[:2] for m in b.sent] == [
        [CLIENT_SIGNATURE_V2, C_SUBMIT],
        [CLIENT_SIGNATURE, C_STATUS],
        [CLIENT_SIGNATURE, C_CANCEL],
    ]
    assert b.book.flush_submits() == 0  # nothing left to send


def test_book_v2_sends_a_lone_request_as_fbc01():
    # A single call() costs what it did before FBC02: one request is not a batch.
    b = Book()
    b.book.v2 = True
    rid = _submit(b, b"job")
    assert b.book.flush_submits() == 1
    assert b.sent == [[CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"job"]]


def test_book_v2_falls_back_to_fbc01_when_the_broker_never_spoke_fbc02():
    b = Book(check_interval=1.0)
    b.book.v2 = True
    rid, other = _submit(b, b"job"), _submit(b, b"other")
    b.book.flush_submits()
    assert b.sent[0][0] == CLIENT_SIGNATURE_V2
    b.sent.clear()
    b.clock.now += 1.0
    assert b.book.tick() == 2  # silence: RESULT (FBC01) for both
    b.reply(R_UNKNOWN, rid)  # an FBC01 broker dropped the batch
    assert not b.book.v2 and b.book.stats()["protocol"] == 1
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"job"]  # submitted again, FBC01
    b.reply(R_UNKNOWN, other)
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_SUBMIT, other, b"", b"other"]
    b.reply(R_OK, rid, b"done")
    assert b.delivered[rid] == b"done"


def test_book_v2_does_not_fall_back_once_the_broker_spoke_fbc02():
    b = Book(check_interval=1.0)
    b.book.v2 = True
    rid, other = _submit(b, b"job"), _submit(b, b"other")
    b.book.flush_submits()
    head = rid + R_ACCEPTED + b"\0\0"
    b.book.on_message([CLIENT_SIGNATURE_V2, R_REPLIES, head])
    b.reply(R_UNKNOWN, rid)  # the broker restarted without a store: lost, not FBC01
    b.reply(R_UNKNOWN, other)
    assert b.book.v2 and b.book.resubmitted == 2
    assert b.book.flush_submits() == 1 and b.sent[-1][0] == CLIENT_SIGNATURE_V2


@pytest.mark.parametrize("how", ["fbc02-lone-frame", "fbc02-two-frames", "fbc01", "failed"])
def test_book_an_id_waited_for_by_several_futures_tells_each_the_way_it_asked(how: str):
    # The first future of an id lives in its entry, the others beside it: each gets the
    # outcome once, as frames or joined as it asked, whichever of them was forgotten.
    b = Book()
    b.book.v2 = True
    rid = uuid.uuid4().bytes
    b.book.submit(rid, [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"job"], "first", False)
    b.book.watch(rid, "frames", True)
    b.book.submit(rid, [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"job"], "joined", False)
    b.book.watch(rid, "dropped", True)
    b.book.forget(rid, "first", False)  # the first one goes: the next takes its place
    b.book.forget(rid, "dropped", False)
    assert b.book.pending == 1  # (its SUBMIT went before the first RESULT)
    body = [b"a"] if how == "fbc02-lone-frame" else [b"a", b"b"]
    if how == "failed":
        b.reply(R_FAILED, rid, b"ValueError", b"bad")
        assert sorted(b.delivered) == ["frames", "joined"]
        assert all(isinstance(v, fastbroker.TaskFailed) for v in b.delivered.values())
    elif how == "fbc01":
        b.reply(R_OK, rid, *body)
        assert b.delivered == {"frames": body, "joined": b"".join(body)}
    else:
        head = rid + R_OK + len(body).to_bytes(2, "big")
        b.book.on_message([CLIENT_SIGNATURE_V2, R_REPLIES, head, *body])
        assert b.delivered == {"frames": body, "joined": b"".join(body)}
    assert b.book.pending == 0 and b.book.in_flight == 0
    b.reply(R_OK, rid, b"again")  # nobody waits any more
    assert len(b.delivered) == 2


def test_book_a_watched_id_submitted_while_held_counts_its_payload_in_the_window():
    b = Book(window=1)
    first = _submit(b)
    rid = uuid.uuid4().bytes
    b.book.watch(rid, "watching", False)  # held behind `first`
    b.book.submit(rid, [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"x" * 1000], "submitted", False)
    assert b.book.in_flight_bytes == 1
    b.reply(R_OK, first, b"ok")  # lets it in: its SUBMIT goes, its payload in the window
    assert b.sent[-1] == [CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"x" * 1000]
    assert b.book.in_flight_bytes == 1000
    b.reply(R_OK, rid, b"done")
    assert b.book.in_flight_bytes == 0 and b.delivered["watching"] == b.delivered["submitted"] == b"done"


@pytest.mark.parametrize("module", ["fastbroker.client._book", "fastbroker.client.book"], ids=["compiled", "pure"])
def test_book_entries_made_by_hand_fail_cleanly(module: str):
    # Entry is the submit command callers hand the I/O thread: one made by hand with a
    # tuple message, or a foreign object among its futures, raises (the compiled one
    # read both unchecked).
    entry_type = importlib.import_module(module).Entry
    rid = uuid.uuid4().bytes
    entry = entry_type(rid, (CLIENT_SIGNATURE, C_SUBMIT, rid, b"", b"payload"), "f", False)
    assert entry.size == 7 and entry.waiters() == [("f", False)]
    entry.others = [("g", True)]
    with pytest.raises((TypeError, AttributeError)):
        entry.waiters()
    with pytest.raises((TypeError, AttributeError)):
        entry.drop("f")


def test_book_forgetting_every_future_of_an_id_drops_it_and_cancels_once():
    b = Book()
    rid = _submit(b)
    b.book.watch(rid, "second", False)
    b.book.forget(rid, rid, True)  # another still waits: the request stays
    assert b.book.pending == 1 and b.sent[-1][1] == C_CANCEL  # CANCELLED goes to "second"
    b.reply(R_CANCELLED, rid)
    assert isinstance(b.delivered["second"], fastbroker.TaskCancelled) and b.book.pending == 0
    again = _submit(b)
    b.book.watch(again, "second", False)
    b.book.forget(again, "second", False)
    b.book.forget(again, again, False)
    assert b.book.pending == 0 and b.book.in_flight == 0 and again not in b.delivered


def test_decode_replies_refuses_a_header_that_does_not_match_its_frames():
    rid = uuid.uuid4().bytes
    ok = rid + R_OK + b"\0\1"
    assert decode_replies([CLIENT_SIGNATURE_V2, R_REPLIES, ok, b"x"])[0].frames == [b"x"]
    for frames in (
        [CLIENT_SIGNATURE_V2, R_REPLIES, ok],  # a frame short
        [CLIENT_SIGNATURE_V2, R_REPLIES, ok, b"x", b"y"],  # a frame over
        [CLIENT_SIGNATURE_V2, R_REPLIES, ok[:-1], b"x"],  # not a whole record
        [CLIENT_SIGNATURE_V2, R_REPLIES, b""],
        [CLIENT_SIGNATURE_V2, R_OK, ok, b"x"],
    ):
        assert decode_replies(frames) is None, frames


def fake_fbc01_broker(ctx):
    """A ROUTER on tcp 127.0.0.1 that plays a broker of before FBC02: it drops FBC02
    messages (as such a broker does), answers RESULT with UNKNOWN and SUBMIT with OK."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    seen = []

    def serve(stop):
        for _ in range(10_000):
            if stop.is_set():
                return
            if not sock.poll(50):
                continue
            identity, *frames = sock.recv_multipart()
            seen.append(frames[:2])
            if frames[0] != CLIENT_SIGNATURE:
                continue
            if frames[1] == C_RESULT:
                sock.send_multipart([identity, CLIENT_SIGNATURE, R_UNKNOWN, frames[2]])
            elif frames[1] == C_SUBMIT:
                sock.send_multipart([identity, CLIENT_SIGNATURE, R_OK, frames[2], b"re:" + frames[4]])

    return sock, seen, serve


@pytest.mark.parametrize("protocol", [2, 1])
def test_client_against_a_broker_without_fbc02(protocol):
    ctx = zmq.Context()
    sock, seen, serve = fake_fbc01_broker(ctx)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(stop,))
    thread.start()
    try:
        with Client(sock.getsockopt_string(zmq.LAST_ENDPOINT), check_interval=0.2, protocol=protocol) as client:
            # Two at once: a batch (a lone request would go as FBC01 anyway).
            futures = client.submit_many([b"a", b"b"])
            assert [f.result(WAIT) for f in futures] == [b"re:a", b"re:b"]
            assert client.stats()["protocol"] == 1
    finally:
        stop.set()
        thread.join(WAIT)
        sock.close()
        ctx.term()
    if protocol == 2:  # FBC02 first, dropped; RESULT for both; then FBC01
        assert seen[0] == [CLIENT_SIGNATURE_V2, C_SUBMIT]
        assert sorted(seen[1:]) == sorted([[CLIENT_SIGNATURE, C_RESULT]] * 2 + [[CLIENT_SIGNATURE, C_SUBMIT]] * 2)
    else:
        assert seen == [[CLIENT_SIGNATURE, C_SUBMIT]] * 2


def test_client_speaks_fbc02_to_the_broker_by_default(rig):
    rig.start_broker()
    rig.worker(DealerEcho, credit=4)
    client = rig.client()
    assert [f.result(WAIT) for f in client.submit_many([b"a", b"b", b"c"])] == [b"-a", b"-b", b"-c"]
    assert client.stats()["protocol"] == 2 and client._book.heard_v2
    with pytest.raises(ConfigError, match="protocol"):
        Client(rig.address, protocol=3)


class FakeFuture(str):
    def done(self) -> bool:
        return False


# -- a broker in a thread, workers in threads ---------------------------------------------


@pytest.fixture
def rig(tmp_path, gate):
    """A rigs.BrokerRig (a Broker in a thread, Worker threads, Clients), closed after the gate opens."""
    r = BrokerRig(tmp_path)
    yield r
    gate.touch()
    r.close()


@pytest.fixture(params=["ipc", "tcp"])
def any_rig(request, tmp_path, gate):
    """A BrokerRig on ipc, then on tcp 127.0.0.1."""
    r = BrokerRig(tmp_path, transport=request.param)
    yield r
    gate.touch()
    r.close()


def broker_figures(address: str) -> dict:
    """The broker's STATS, asked on a socket of its own (a snapshot from its loop)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        figures = request_stats(sock, WAIT)
        assert figures is not None, "no STATS reply"
        return figures
    finally:
        sock.close()


BURST = 3000


def test_a_burst_of_submits_loses_no_reply_and_keeps_the_window(any_rig):
    # Before flow control, the client sent every SUBMIT at once and the broker dropped
    # the replies beyond its high-water mark (ipc: 2,000 submits ran at ~1k jobs/s).
    any_rig.start_broker()
    any_rig.worker(DealerEcho, credit=64)
    client = any_rig.client(window=100)
    futures = [client.submit(b"%d" % i) for i in range(BURST)]
    most = 0
    deadline = time.monotonic() + WAIT
    while not all(f.done() for f in futures[-50:]):
        assert time.monotonic() < deadline, f"{sum(f.done() for f in futures)} of {BURST} done"
        figures = broker_figures(any_rig.address)
        most = max(most, figures["queued"] + figures["running"])
        assert figures["queued"] + figures["running"] <= 100, figures  # the window, at the broker
    assert [f.result(WAIT) for f in futures] == [b"-%d" % i for i in range(BURST)]
    assert most > 0  # the polls saw the burst
    figures = broker_figures(any_rig.address)
    assert (figures["replies_dropped"], figures["replies_unroutable"]) == (0, 0), figures
    assert client.stats() == {
        "in_flight": 0,
        "in_flight_bytes": 0,
        "queued": 0,
        "checks": 0,
        "refetched": 0,
        "resubmitted": 0,
        "protocol": 2,
    }


def test_submit_many_and_map_stream_in_order(rig):
    rig.start_broker()
    rig.worker(DealerEcho, credit=8)
    client = rig.client(window=16)
    futures = client.submit_many([b"a", [b"b", b"c"]], tries=2)
    assert [f.result(WAIT) for f in futures] == [b"-a", [b"-bc"]]
    assert client.submit_many([]) == []
    taken = []

    def source():
        for i in range(500):
            taken.append(i)
            yield b"%d" % i

    answers = client.map(source())
    for i, answer in enumerate(answers):
        assert answer == b"-%d" % i
        # map takes from the iterable only as answers come: bounded memory, any length.
        assert len(taken) <= i + 1 + 16
    assert len(taken) == 500


def test_call_returns_the_answer(rig, log_path):
    rig.start_broker()
    rig.worker(DealerEcho)
    client = rig.client()
    assert client.call(b"hello", wait=WAIT) == b"-hello"
    future = client.submit([b"a", b"b"])
    assert len(future.request_id) == 16
    assert future.result(WAIT) == [b"-ab"]  # frames in: frames out
    rid = uuid.uuid4().bytes
    assert client.submit(b"mine", request_id=rid).result(WAIT) == b"-mine"
    assert client.status(rid) == Status("done", 1, None)
    assert client.status(uuid.uuid4().bytes) == Status("unknown")


def test_without_ack_requests_still_complete(rig):
    rig.start_broker()
    rig.worker(DealerEcho)
    client = rig.client(ack=False, timeout=5, tries=2)
    assert [client.submit(b"%d" % i) for i in range(20)][-1].result(WAIT) == b"-19"
    assert client.call(b"x", wait=WAIT) == b"-x"


def test_per_request_timeout_is_honoured_while_default_requests_succeed(rig, log_path):
    # No broker timeout: only the request's own timeout can end its attempt.
    rig.start_broker(timeout=None)
    rig.worker(DealerGated, credit=4)
    client = rig.client()
    started = time.monotonic()
    short = client.submit(b"0:gated-short", timeout=0.2, tries=1)
    # A default request may take longer than 0.2 s and still succeed.
    slow = client.submit(b"0.5:default")
    with pytest.raises(fastbroker.TaskTimedOut):
        short.result(WAIT)
    assert time.monotonic() - started < WAIT / 2
    assert slow.result(WAIT) == b"-0.5:default"
    assert runs(log_path, "0:gated-short") != [] and runs(log_path, "0.5:default", "done") != []


@pytest.mark.parametrize("tries", [1, 3])
def test_per_request_tries_are_exact(rig, log_path, tries):
    rig.start_broker(tries=None)  # unlimited at the broker: only the request's tries stop it
    rig.worker(DealerFailer)
    client = rig.client()
    with pytest.raises(fastbroker.TaskFailed) as info:
        client.call(b"doomed", tries=tries, wait=WAIT)
    assert len(runs(log_path, "doomed")) == tries
    assert info.value.type_name == "Dropped"
    assert "doomed" in info.value.message


def test_client_default_tries_apply_to_every_request(rig, log_path):
    rig.start_broker()
    rig.worker(DealerFailer)
    client = rig.client(tries=2)
    for n in range(2):
        with pytest.raises(fastbroker.TaskFailed):
            client.call(b"doomed-%d" % n, wait=WAIT)
        assert len(runs(log_path, f"doomed-{n}")) == 2


def test_every_attempt_timing_out_ends_in_task_timed_out(rig, log_path):
    rig.start_broker()
    rig.worker(DealerGated, credit=4)
    client = rig.client()
    with pytest.raises(fastbroker.TaskTimedOut):
        client.call(b"0:gated-stuck", timeout=0.2, tries=2, wait=WAIT)
    assert len(runs(log_path, "0:gated-stuck")) == 2


def test_cancelling_a_queued_request_means_it_never_runs(rig, log_path, gate):
    rig.start_broker()
    rig.worker(DealerGated, credit=1)
    client = rig.client()
    blocker = client.submit(b"0:gated-blocker")
    wait_until(lambda: runs(log_path, "0:gated-blocker"), timeout=WAIT, message="the worker to take the blocker")
    queued = client.submit(b"0:queued")
    wait_until(
        lambda: client.status(queued.request_id).state == "queued", timeout=WAIT, message="the request to be queued"
    )
    assert queued.cancel()
    wait_until(
        lambda: client.status(queued.request_id).state in ("done", "unknown"),
        timeout=WAIT,
        message="the broker to cancel it",
    )
    gate.touch()
    assert blocker.result(WAIT) == b"-0:gated-blocker"
    # The worker is free again and takes the next job, not the cancelled one.
    assert client.call(b"0:after", wait=WAIT) == b"-0:after"
    assert runs(log_path, "0:queued") == []
    rig.stop_workers()
    assert rig.stop_broker()["cancelled"] == 1


def test_cancel_by_id_of_a_running_request_gives_task_cancelled(rig, log_path):
    rig.start_broker()
    rig.worker(DealerGated, credit=2)
    client = rig.client()
    future = client.submit(b"0:gated-running")
    wait_until(lambda: runs(log_path, "0:gated-running"), timeout=WAIT, message="the job to start")
    assert client.status(future.request_id) == Status("running", 1, None)
    other = rig.client()
    other.cancel(future.request_id)  # another client may cancel it by id
    with pytest.raises(fastbroker.TaskCancelled):
        future.result(WAIT)


def test_a_thousand_futures_from_four_threads(rig, procs):
    rig.start_broker()
    for n in range(2):
        procs.start(["worker", "workers_for_tests:DealerEcho", rig.addrs[1], "--credit", "8"], f"echo-{n}")
    client = rig.client()
    futures: dict = {}
    errors: list = []

    def submit(t: int) -> None:
        try:
            for i in range(250):
                payload = b"%d-%d" % (t, i)
                futures[payload] = client.submit(payload)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not errors and len(futures) == 1000
    done, not_done = concurrent.futures.wait(futures.values(), timeout=WAIT)
    assert not not_done, f"{len(not_done)} requests unanswered\n{procs.output()}"
    for payload, future in futures.items():
        assert future.result() == b"-" + payload
    assert len({f.request_id for f in futures.values()}) == 1000


def test_async_client_gather_status_and_map(rig, log_path):
    rig.start_broker()
    rig.worker(DealerEcho, credit=4)

    async def main():
        async with AsyncClient(rig.address, check_interval=0.5) as client:
            answers = await asyncio.gather(*(client.submit(b"%d" % i) for i in range(200)))
            assert answers == [b"-%d" % i for i in range(200)]
            assert await client.call([b"x", b"y"], wait=WAIT) == [b"-xy"]
            future = client.submit(b"z")
            assert await future == b"-z"
            assert await client.status(future.request_id) == Status("done", 1, None)
            assert await client.result(future.request_id) == b"-z"
            assert [a async for a in client.map((b"m%d" % i for i in range(20)), window=4)] == [
                b"-m%d" % i for i in range(20)
            ]
            with pytest.raises(fastbroker.UnknownRequest):
                await client.result(uuid.uuid4().bytes)
            # Closing cancels the reader before it can read this one's answer.
            pending = client.submit(b"pending-at-close")
        with pytest.raises(BrokerError, match="client closed"):
            await pending

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_async_client_answers_come_without_the_lazy_pirate(rig):
    """Through a real broker, with the lazy pirate a minute away (check_interval): every
    answer must come from the reader's own wake-ups, the client sending past its asyncio
    socket (the case where that could lose a wake-up is made on purpose below). 300
    calls one after the other, each waiting for its answer, then bursts."""
    rig.start_broker()
    rig.worker(DealerEcho, credit=4)

    async def main():
        async with AsyncClient(rig.address, check_interval=60.0) as client:
            for i in range(300):
                assert await client.call(b"%d" % i) == b"-%d" % i
            for _ in range(5):
                answers = await asyncio.gather(*client.submit_many([b"%d" % i for i in range(500)]))
                assert answers == [b"-%d" % i for i in range(500)]
            assert client.stats()["refetched"] == 0

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_async_sends_wait_in_order_while_the_socket_is_full():
    """The AsyncClient's sender keeps what a full socket cannot take, in order, and a
    task sends it as room comes (inproc, high-water marks of 1, a reader that starts
    late)."""
    from fastbroker.client.asyncio import _Sender

    async def main():
        context = zmq.asyncio.Context()
        receiver = context.socket(zmq.PULL)
        receiver.set_hwm(1)
        receiver.bind("inproc://full")
        socket = context.socket(zmq.PUSH)
        socket.set_hwm(1)
        socket.connect("inproc://full")
        sender = _Sender(socket)
        try:
            messages = [[b"%d" % i, b"x" * i] for i in range(50)]
            for frames in messages:
                sender.send(frames)
            assert sender.outbox and sender.draining is not None  # the socket is full
            got = [await asyncio.wait_for(receiver.recv_multipart(), WAIT) for _ in messages]
            assert got == messages
            deadline = time.monotonic() + WAIT
            while sender.draining is not None:
                assert time.monotonic() < deadline, "the sending task did not end"
                await asyncio.sleep(0.01)  # the pace of a bounded poll; the task must run
            assert not sender.outbox
        finally:
            await sender.close()
            socket.close(0)
            receiver.close(0)
            context.term()

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


def test_async_sender_has_the_socket_look_again_after_a_send():
    """What the sender's own test above cannot make happen on purpose: a message arrives
    while the event loop is busy, and a send past pyzmq (libzmq reads the socket's
    commands then) takes the signal that would have woken a poll of the socket. The
    sender has the asyncio socket look again after each send: the poll wakes."""
    from fastbroker.client.asyncio import _Sender

    async def main():
        context = zmq.asyncio.Context()
        router = context.socket(zmq.PAIR)  # the broker's end
        router.bind("inproc://look-again")
        socket = context.socket(zmq.PAIR)
        socket.connect("inproc://look-again")
        sender = _Sender(socket)
        try:
            sender.send([b"hello"])
            assert await asyncio.wait_for(router.recv_multipart(), WAIT) == [b"hello"]
            polled = socket.poll(timeout=None, flags=zmq.POLLIN)
            await asyncio.sleep(0.01)  # the poll is waiting for the socket's signal
            await router.send_multipart([b"answer"])
            time.sleep(0.05)  # the loop is busy: the answer arrives, its signal waits
            sender.send([b"more"])  # libzmq reads the socket's commands (and the signal)
            assert await asyncio.wait_for(polled, 5.0) & zmq.POLLIN
            assert await asyncio.wait_for(socket.recv_multipart(), WAIT) == [b"answer"]
        finally:
            await sender.close()
            socket.close(0)
            router.close(0)
            context.term()

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


def test_async_map_of_an_async_iterable_ends_when_the_client_closes_meanwhile(tmp_path):
    """Closed by another task while the map awaits its iterable's next item: the map
    raises BrokerError("client closed"), it does not submit to a closed client and wait
    for an answer that cannot come."""

    async def main():
        client = AsyncClient(f"ipc://{tmp_path}/nobody")  # no broker: nothing is ever answered

        async def payloads():
            await asyncio.sleep(0.2)  # the next item comes slowly (a stream)
            for i in range(5):
                yield b"%d" % i

        async def consume():
            return [answer async for answer in client.map(payloads())]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(BrokerError, match="client closed"):
            await asyncio.wait_for(task, WAIT)

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


def test_async_client_closed_by_a_failed_reader_still_releases_its_sockets(tmp_path):
    """The reader task, failing, closes the client for its callers (pending futures get
    BrokerError); close() afterwards must still close the sockets."""

    async def main():
        client = AsyncClient(f"ipc://{tmp_path}/nobody", check_interval=0.05)

        def broken_tick():
            raise RuntimeError("a bug in the book")

        client._book.tick = broken_tick
        future = client.submit(b"x")
        with pytest.raises(BrokerError, match="client closed"):
            await asyncio.wait_for(future, WAIT)
        assert client.closed
        await client.close()
        assert all(socket.closed for socket in client._sockets)

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


def test_async_client_timeout_and_cancel(rig, log_path):
    rig.start_broker()
    rig.worker(DealerGated, credit=4)

    async def main():
        async with AsyncClient(rig.address) as client:
            with pytest.raises(fastbroker.TaskTimedOut):
                await client.call(b"0:gated-too-slow", timeout=0.2, tries=1, wait=WAIT)
            future = client.submit(b"0:gated-cancelled")
            deadline = time.monotonic() + WAIT
            while not runs(log_path, "0:gated-cancelled"):
                assert time.monotonic() < deadline, "the job did not start"
                # The pace of a bounded poll of the job log (written by a worker thread);
                # a blocking wait_until here would stall the client's event loop.
                await asyncio.sleep(0.01)
            assert future.cancel()  # cancels the running request at the broker too
            while (await client.status(future.request_id)).state != "done":
                assert time.monotonic() < deadline, "the broker did not cancel the request"
                await asyncio.sleep(0.01)  # the pace of a bounded poll of the broker's STATUS
            with pytest.raises(fastbroker.TaskCancelled):
                await client.result(future.request_id)
            with pytest.raises(TimeoutError):
                await client.call(b"0:gated-waited-for", wait=0.1)

    asyncio.run(asyncio.wait_for(main(), WAIT))


class Concurrency(Worker):
    """Records the most jobs it ran at once; ``SECONDS:TAG`` sleeps, answers b"-" + data."""

    lock = threading.Lock()
    running = 0
    peak = 0

    def process(self, data: bytes) -> bytes:
        cls = type(self)
        with cls.lock:
            cls.running += 1
            cls.peak = max(cls.peak, cls.running)
        try:
            time.sleep(float(data.split(b":", 1)[0]))  # the job's length is the point: overlaps are counted
        finally:
            with cls.lock:
                cls.running -= 1
        return b"-" + data


def test_map_keeps_input_order_and_at_most_window_in_flight(rig, capsys):
    rig.start_broker()
    rig.worker(Concurrency, credit=16)  # room for far more than the window
    client = rig.client()
    # Later inputs finish first: the order of the answers is the input's, not completion's.
    payloads = [b"%.2f:%d" % (0.05 * (3 - i % 3), i) for i in range(12)]
    Concurrency.peak = 0
    answers = list(client.map(payloads, window=3, progress=True))
    assert answers == [b"-" + p for p in payloads]
    assert Concurrency.peak == 3
    err = capsys.readouterr().err
    assert "12/12" in err and "/s" in err


class FailsBad(Worker):
    """Raises for payloads that start with b"bad"; answers b"-" + data otherwise."""

    def process(self, data: bytes) -> bytes:
        if data.startswith(b"bad"):
            raise ValueError(data.decode())
        return b"-" + data


def test_map_raises_the_first_failure_when_it_reaches_it(rig):
    rig.start_broker()
    rig.worker(FailsBad, credit=4)
    client = rig.client()
    with pytest.raises(ConfigError):
        client.map([b"a"], window=0)
    results = client.map([b"ok-1", b"bad-2", b"ok-3", b"bad-4"], window=4, tries=1)
    assert next(results) == b"-ok-1"
    with pytest.raises(fastbroker.TaskFailed, match="bad-2"):
        next(results)
    with pytest.raises(StopIteration):
        next(results)


def test_map_stopped_early_cancels_what_it_has_in_flight(rig, log_path, gate):
    rig.start_broker()
    rig.worker(DealerGated, credit=3)
    client = rig.client()
    results = client.map([b"0:first", b"0:gated-map-a", b"0:gated-map-b"], window=3)
    assert next(results) == b"-0:first"
    wait_until(
        lambda: runs(log_path, "0:gated-map-a") and runs(log_path, "0:gated-map-b"),
        timeout=WAIT,
        message="both gated jobs to start",
    )
    results.close()  # the caller stops iterating: the two running jobs are cancelled
    wait_until(lambda: rig.broker.stats()["cancelled"] == 2, timeout=WAIT, message="two CANCELs at the broker")
    wait_until(lambda: client.stats()["in_flight"] == 0, timeout=WAIT, message="the client to forget them")
    gate.touch()


def test_async_map_keeps_input_order_and_at_most_window_in_flight(rig):
    rig.start_broker()
    rig.worker(Concurrency, credit=16)
    payloads = [b"%.2f:%d" % (0.05 * (3 - i % 3), i) for i in range(12)]
    Concurrency.peak = 0

    async def main():
        async with AsyncClient(rig.address) as client:
            return [answer async for answer in client.map(payloads, window=3)]

    assert asyncio.run(asyncio.wait_for(main(), WAIT)) == [b"-" + p for p in payloads]
    assert Concurrency.peak == 3


def test_async_map_raises_the_first_failure_when_it_reaches_it(rig):
    rig.start_broker()
    rig.worker(FailsBad, credit=4)

    async def main():
        async with AsyncClient(rig.address) as client:
            results = client.map([b"ok-1", b"bad-2", b"ok-3"], window=4, tries=1)
            assert await results.__anext__() == b"-ok-1"
            with pytest.raises(fastbroker.TaskFailed, match="bad-2"):
                await results.__anext__()
            with pytest.raises(StopAsyncIteration):
                await results.__anext__()

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_async_map_stopped_early_and_a_wait_given_up_cancel_at_the_broker(rig, log_path, gate):
    """What the map has in flight when its caller stops iterating, and a request whose
    awaiting was given up (``asyncio.wait_for`` cancels its future), are cancelled at
    the broker: the future's cancel() tells the client, not only the map's end."""
    rig.start_broker()
    rig.worker(DealerGated, credit=3)

    async def until(condition, message):
        deadline = time.monotonic() + WAIT
        while not condition():
            assert time.monotonic() < deadline, message
            await asyncio.sleep(0.01)  # the pace of a bounded poll; the client's loop must run

    async def main():
        async with AsyncClient(rig.address) as client:
            results = client.map([b"0:first", b"0:gated-amap-a", b"0:gated-amap-b"], window=3)
            assert await results.__anext__() == b"-0:first"
            await until(lambda: runs(log_path, "0:gated-amap-a") and runs(log_path, "0:gated-amap-b"), "two jobs")
            await results.aclose()
            await until(lambda: rig.broker.stats()["cancelled"] == 2, "two CANCELs at the broker")
            future = client.submit(b"0:gated-awaited")
            await until(lambda: runs(log_path, "0:gated-awaited"), "the job to start")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(future, 0.05)
            assert future.cancelled()
            await until(lambda: rig.broker.stats()["cancelled"] == 3, "a third CANCEL at the broker")
            await until(lambda: client.stats()["in_flight"] == 0, "the client to forget them")

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))  # beyond the waits inside: their messages say what failed
    gate.touch()


def test_result_of_an_id_after_the_client_restarted(rig, log_path, gate):
    rig.start_broker()
    rig.worker(DealerGated)
    first = Client(rig.address)
    future = first.submit(b"0:gated-outlives-its-client")
    wait_until(lambda: runs(log_path, "0:gated-outlives-its-client"), timeout=WAIT, message="the job to start")
    first.close()
    with pytest.raises(BrokerError, match="client closed"):
        future.result(0)
    with pytest.raises(BrokerError, match="client closed"):
        first.submit(b"too late")
    second = rig.client()
    outcome = second.result(future.request_id)
    assert second.status(future.request_id).state == "running"
    gate.touch()
    assert outcome.result(WAIT) == b"-0:gated-outlives-its-client"
    # Kept at the broker: a third client can still ask for it.
    assert rig.client().result(future.request_id.hex()).result(WAIT) == b"-0:gated-outlives-its-client"
    with pytest.raises(fastbroker.UnknownRequest):
        second.result(uuid.uuid4()).result(WAIT)


def test_lazy_pirate_resubmits_what_a_restarted_broker_lost(rig, log_path):
    rig.start_broker()
    client = rig.client(check_interval=0.2)
    future = client.submit(b"survivor")
    # No worker: the request waits in the first broker's queue...
    wait_until(
        lambda: client.status(future.request_id).state == "queued", timeout=WAIT, message="the request to be queued"
    )
    rig.stop_broker()  # ...which is lost with it (an in-memory broker)
    rig.start_broker()
    rig.worker(DealerEcho)
    assert future.result(WAIT) == b"-survivor"
    assert runs(log_path, "survivor") != []
    rig.stop_workers()
    # The new broker got it once, by the re-submit.
    assert rig.stop_broker()["requests"] == 1


def test_call_wait_and_status_time_out_without_a_broker(tmp_path):
    with Client(f"ipc://{tmp_path}/nobody", check_interval=0.05) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            client.call(b"x", wait=0.3)
        with pytest.raises(TimeoutError):
            client.status(uuid.uuid4().bytes, wait=0.2)
        assert time.monotonic() - started < WAIT
        pending = client.submit(b"y")
    with pytest.raises(BrokerError, match="client closed"):
        pending.result(WAIT)


def test_bad_arguments_fail_at_once():
    with pytest.raises(ConfigError, match="timeout"):
        Client("ipc:///tmp/x", timeout=0)
    with pytest.raises(ConfigError, match="check_interval"):
        Client("ipc:///tmp/x", check_interval=0)
    with pytest.raises(ConfigError, match="cannot connect"):
        Client("nowhere")
    with Client("ipc:///tmp/fb-nobody-listens") as client:
        with pytest.raises(ConfigError, match="tries"):
            client.submit(b"x", tries=0)
        with pytest.raises(ConfigError, match="16 bytes"):
            client.submit(b"x", request_id=b"short")
        with pytest.raises(TypeError):
            client.submit("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            client.submit([])


def test_a_submit_does_not_overtake_a_command_queued_before_it(rig, procs):
    """submit() adds to the batch of submits the I/O thread has not taken yet, unless
    another command was queued after that batch: a cancel(id) then a submit() of that
    id must reach the broker in that order (the other way round, the CANCEL would cancel
    the request it was meant to precede)."""
    rig.start_broker()
    procs.start(["worker", "workers_for_tests:DealerEcho", rig.addrs[1], "--credit", "8"], "echo")
    client = rig.client()
    answers = []
    for i in range(200):
        request_id = uuid.uuid4().bytes
        answers.append(client.submit(b"before-%d" % i))  # opens a batch
        client.cancel(request_id)  # an id the broker does not know yet
        answers.append(client.submit(b"after-%d" % i, request_id=request_id))
    got = [f.result(WAIT) for f in answers]
    assert got == [b"-" + p for i in range(200) for p in (b"before-%d" % i, b"after-%d" % i)]


def test_a_bad_payload_in_a_map_raises_and_the_client_goes_on(rig, procs):
    """Both clients' maps make their batches in one call (client/handoff.py): a payload
    that is not bytes raises from the iteration, and the requests of that batch made
    before it are not left waiting in the client."""
    rig.start_broker()
    procs.start(["worker", "workers_for_tests:DealerEcho", rig.addrs[1], "--credit", "8"], "echo")
    client = rig.client()
    with pytest.raises(TypeError, match="not str"):
        list(client.map([b"a", b"b", "text"]))  # type: ignore[list-item]
    assert list(client.map([b"c", b"d"])) == [b"-c", b"-d"]
    assert client.stats()["queued"] == 0

    async def run() -> None:
        async with AsyncClient(rig.addrs[0]) as aclient:
            with pytest.raises(TypeError, match="not str"):
                async for _ in aclient.map([b"a", "text"]):  # type: ignore[list-item]
                    pass
            assert [a async for a in aclient.map([b"e"])] == [b"-e"]

    asyncio.run(asyncio.wait_for(run(), WAIT))


def test_a_default_changed_to_a_bad_value_is_refused_by_the_next_submit():
    """The client's default options are encoded once; the cache compares the defaults'
    objects, not their values (True == 1)."""
    with Client("ipc:///tmp/fb-nobody-listens", timeout=1) as client:
        assert client._options(None, None) == encode_options(1, None, True)
        client.timeout = True  # type: ignore[assignment]
        with pytest.raises(ConfigError, match="timeout"):
            client.submit(b"x")
        client.timeout = 2.5
        assert client._options(None, None) == encode_options(2.5, None, True)


@pytest.mark.parametrize("book_module", ["fastbroker.client._book", "fastbroker.client.book"], ids=["compiled", "pure"])
def test_a_book_left_with_requests_by_an_owner_dropped_is_collected(book_module):
    """client -> book -> entry -> future -> the client's cancel hook is a cycle: the
    collector must be able to free it (an AsyncClient never closed leaves one)."""
    import gc
    import importlib
    import weakref

    from fastbroker.client.futures import RequestFuture

    class Owner:
        def __init__(self) -> None:
            self.book = importlib.import_module(book_module).RequestBook(lambda m: None, lambda f, v, e: None, 2.0)

        def on_cancel(self, future: RequestFuture) -> None:
            pass

    owner = Owner()
    for i in range(3):
        rid = b"%016d" % i
        owner.book.submit(rid, [b"s", b"k", rid, b"", b"p"], RequestFuture(rid, owner.on_cancel), False)
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None
