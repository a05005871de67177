"""ShardedBook without I/O (fastbroker.client.shards): where requests go, when a broker
is taken for down and what moves, how an id is looked for; the messages each broker's
book would send are collected, the brokers' replies written by the test."""

from __future__ import annotations

import concurrent.futures
from typing import List

from fastbroker._select import client_book
from fastbroker.client.outcomes import UnknownRequest
from fastbroker.client.protocol import submit_message
from fastbroker.client.shards import PROBE_ID, ShardedBook, home_shard, search_order
from fastbroker.protocol import (
    C_RESULT,
    C_STATS,
    C_SUBMIT,
    CLIENT_SIGNATURE,
    R_ACCEPTED,
    R_OK,
    R_UNKNOWN,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def deliver(future, value, exc) -> None:
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


def make(n: int, clock: Clock, failover_after: float = 3.0):
    sent: List[List[list]] = [[] for _ in range(n)]
    sharded = ShardedBook(deliver, 1.0, failover_after, clock)
    for k in range(n):
        sharded.add(client_book()[0].RequestBook(sent[k].append, deliver, 1.0, clock=clock))
    return sharded, sent


def rid_with_home(home: int, n: int, start: int = 0) -> bytes:
    """A request id whose home among n brokers is `home` (the first from `start` on)."""
    for i in range(start, start + 10_000):
        rid = i.to_bytes(16, "big")
        if home_shard(rid, n) == home:
            return rid
    raise AssertionError("no id found")


def submit(book: ShardedBook, rid: bytes) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    book.submit(rid, submit_message(rid, b"", [b"job"]), future, False)
    return future


def commands(messages: list) -> list:
    return [(m[1], m[2]) for m in messages]


def test_the_search_order_starts_at_the_home_and_wraps():
    rid = rid_with_home(2, 3)
    assert search_order(rid, 3) == [2, 0, 1]


def test_a_request_goes_to_its_home_broker():
    clock = Clock()
    book, sent = make(3, clock)
    rids = [rid_with_home(k, 3) for k in range(3)]
    for rid in rids:
        submit(book, rid)
    assert [commands(s) for s in sent] == [[(C_SUBMIT, rid)] for rid in rids]
    assert book.placed == {}


def test_a_silent_broker_is_down_its_requests_move_and_it_is_probed():
    clock = Clock()
    book, sent = make(2, clock, failover_after=3.0)
    rid = rid_with_home(1, 2)
    future = submit(book, rid)
    clock.now += 2.9
    book.tick()
    assert book.down == [None, None]  # not yet
    clock.now += 0.2
    book.tick()
    assert book.down[1] is not None and book.failovers == 1
    assert commands(sent[0]) == [(C_SUBMIT, rid)] and book.placed == {rid: 0}
    # Broker 0 answers it: the future gets the answer once.
    book.books[0].on_message([CLIENT_SIGNATURE, R_OK, rid, b"done"])
    assert future.result(0) == b"done"
    # New requests whose home is broker 1 go to broker 0 while it is down...
    other = rid_with_home(1, 2, start=1000)
    sent[0].clear()
    submit(book, other)
    assert commands(sent[0]) == [(C_SUBMIT, other)] and book.placed[other] == 0
    # ...and it is probed each check interval; its first word makes it live again.
    clock.now += 1.1
    book.tick()
    assert [m[1:3] for m in sent[1] if m[1] == C_STATS] == [[C_STATS, PROBE_ID]]
    book.books[1].on_message([CLIENT_SIGNATURE, R_ACCEPTED, PROBE_ID])
    book.tick()
    assert book.down == [None, None]
    # ...and home again once it is live.
    fresh = rid_with_home(1, 2, start=2000)
    sent[1].clear()
    submit(book, fresh)
    assert commands(sent[1]) == [(C_SUBMIT, fresh)] and fresh not in book.placed


def test_while_a_broker_is_down_the_loop_sleeps_until_its_next_probe():
    # The client's loop polls for next_check() seconds: a broker down must not make it
    # spin (the live brokers' probe times, never set, once counted as due at once).
    clock = Clock()
    book, _ = make(3, clock, failover_after=3.0)
    future = submit(book, rid_with_home(1, 3))
    clock.now += 3.0
    book.tick()
    assert book.down[1] is not None
    assert book.next_check() is not None and book.next_check() > 0.9  # the probe, check_interval (1 s) on
    clock.now += 0.5
    assert 0.4 < book.next_check() <= 0.5
    future.cancel()


def test_an_id_this_client_did_not_place_is_looked_for_in_order():
    clock = Clock()
    book, sent = make(3, clock)
    rid = rid_with_home(1, 3)
    future: concurrent.futures.Future = concurrent.futures.Future()
    book.watch(rid, future, False)
    assert commands(sent[1]) == [(C_RESULT, rid)] and sent[2] == [] and sent[0] == []
    book.books[1].on_message([CLIENT_SIGNATURE, R_UNKNOWN, rid])
    assert commands(sent[2]) == [(C_RESULT, rid)] and not future.done()
    book.books[2].on_message([CLIENT_SIGNATURE, R_UNKNOWN, rid])
    assert commands(sent[0]) == [(C_RESULT, rid)]
    book.books[0].on_message([CLIENT_SIGNATURE, R_UNKNOWN, rid])
    assert isinstance(future.exception(0), UnknownRequest)  # unknown everywhere
    second: concurrent.futures.Future = concurrent.futures.Future()
    book.watch(rid, second, False)
    book.books[1].on_message([CLIENT_SIGNATURE, R_UNKNOWN, rid])
    book.books[2].on_message([CLIENT_SIGNATURE, R_OK, rid, b"found"])
    assert second.result(0) == b"found"


def test_stats_sum_the_brokers_and_show_each():
    clock = Clock()
    book, _ = make(2, clock)
    for k in range(2):
        submit(book, rid_with_home(k, 2))
    figures = book.stats()
    assert figures["in_flight"] == 2 and figures["failovers"] == 0 and figures["down"] == 0
    assert [one["in_flight"] for one in figures["shards"]] == [1, 1]
