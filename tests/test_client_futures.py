"""RequestFuture (client/futures.py): a concurrent.futures.Future whose Condition is made
only when someone waits, adds a callback or cancels. Everything a Future promises, with
the outcome set before or after a waiter came, from another thread, and through
concurrent.futures.wait and as_completed; and what it is for: one object for the
garbage collector where a plain Future makes eleven."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time

import pytest

from fastbroker.client.futures import RequestFuture

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


def test_an_outcome_set_before_anyone_waits_needs_no_condition():
    done, failed = RequestFuture(), RequestFuture()
    assert not done.done() and not done.cancelled() and not done.running()
    done.set_result(b"answer")
    error = ValueError("bad")
    failed.set_exception(error)
    assert done._made is None and failed._made is None
    assert done.done() and done.result() == b"answer" and done.exception() is None
    assert failed.done() and failed.exception() is error
    with pytest.raises(ValueError, match="bad"):
        failed.result(0)
    assert done._made is None and failed._made is None  # reading it made none either
    assert not done.cancel()  # over: cannot be cancelled
    with pytest.raises(concurrent.futures.InvalidStateError):
        done.set_result(b"again")
    with pytest.raises(concurrent.futures.InvalidStateError):
        failed.set_exception(ValueError("again"))
    assert done.result() == b"answer"


def test_a_waiter_in_another_thread_is_woken_by_the_outcome():
    future = RequestFuture()
    got = []
    waiter = threading.Thread(target=lambda: got.append(future.result(WAIT)))
    waiter.start()
    deadline = time.monotonic() + WAIT
    while future._made is None:  # the waiter made the Condition to wait on it
        assert time.monotonic() < deadline, "the waiter did not start waiting"
        time.sleep(0.001)  # the pace of a bounded poll of another thread's progress
    future.set_result(b"late")
    waiter.join(WAIT)
    assert got == [b"late"]


def test_result_with_a_timeout_and_nothing_set_raises_timeout():
    future = RequestFuture()
    with pytest.raises(concurrent.futures.TimeoutError):
        future.result(0.01)
    with pytest.raises(concurrent.futures.TimeoutError):
        future.exception(0.01)
    future.set_result(1)  # after a waiter gave up: the Future's own way, with the Condition
    assert future.result(0) == 1


def test_callbacks_before_and_after_the_outcome_run_once_each():
    calls = []
    future = RequestFuture()
    future.add_done_callback(lambda f: calls.append(("before", f.result())))
    future.set_result(7)
    future.add_done_callback(lambda f: calls.append(("after", f.result())))
    assert calls == [("before", 7), ("after", 7)]


def test_cancel_tells_the_client_once_and_refuses_a_later_outcome():
    told = []
    future = RequestFuture()
    future._on_cancel = told.append
    assert future.cancel() and future.cancelled() and future.done()
    assert future.cancel()  # cancelled already: True again, the client is not told twice
    assert told == [future]
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(0)
    with pytest.raises(concurrent.futures.InvalidStateError):
        future.set_result(b"too late")


def test_wait_and_as_completed_see_outcomes_set_before_and_after():
    early, late = RequestFuture(), RequestFuture()
    early.set_result(b"early")
    done, not_done = concurrent.futures.wait([early, late], timeout=0)
    assert done == {early} and not_done == {late}
    threading.Timer(0.05, late.set_result, args=(b"late",)).start()
    order = [f.result() for f in concurrent.futures.as_completed([early, late], timeout=WAIT)]
    assert order == [b"early", b"late"]
    done, not_done = concurrent.futures.wait([early, late], timeout=WAIT)
    assert done == {early, late} and not not_done


def test_outcomes_set_by_one_thread_while_another_reads_them_in_order():
    futures = [RequestFuture() for _ in range(2000)]

    def settle():
        for i, future in enumerate(futures):
            if i % 3:
                future.set_result(i)
            else:
                future.set_exception(KeyError(i))

    setter = threading.Thread(target=settle)
    setter.start()
    for i, future in enumerate(futures):
        if i % 3:
            assert future.result(WAIT) == i
        else:
            assert isinstance(future.exception(WAIT), KeyError)
    setter.join(WAIT)


def test_one_object_for_the_collector_where_a_plain_future_makes_many():
    def tracked_per_future(make) -> float:
        gc.collect()
        before = len(gc.get_objects())
        kept = [make() for _ in range(1000)]
        return (len(gc.get_objects()) - before - 1) / len(kept)

    assert tracked_per_future(RequestFuture) <= 1.5
    assert tracked_per_future(concurrent.futures.Future) >= 5  # what it saves, on this Python
