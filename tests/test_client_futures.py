"""RequestFuture (client/futures.py): a concurrent.futures.Future whose Condition is made
only when someone waits, adds a callback or cancels. Everything a Future promises, with
the outcome set before or after a waiter came, from another thread, and through
concurrent.futures.wait and as_completed; and what it is for: one object for the
garbage collector where a plain Future makes eleven."""

from __future__ import annotations

import concurrent.futures
import gc
import subprocess
import sys
import threading
import time
import weakref

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


def test_a_failed_result_read_leaves_no_cycle_for_the_collector():
    # As Future's: the raise's frame must not hold the future (future -> exception ->
    # traceback -> frame -> future), or each failed future waits for a collection.
    gc.collect()
    gc.disable()
    try:
        future = RequestFuture()
        future.set_exception(ValueError("x"))
        with pytest.raises(ValueError):
            future.result()
        alive = weakref.ref(future)
        del future
        assert alive() is None  # freed by its count, no collection needed
    finally:
        gc.enable()


FINALIZER_IN_A_PASS = """
import gc, sys
from fastbroker.client.futures import RequestFuture

class Handle:
    # In a cycle: freed by a pass of the collector, whose finalizer cancels a future.
    def __init__(self, future):
        self.future, self.me = future, self

    def __del__(self):
        self.future.cancel()

for k in range(1, 17):  # the pass starts at each allocation in turn
    victim = RequestFuture()
    gc.collect()
    gc.disable()
    Handle(RequestFuture())
    gc.set_threshold(gc.get_count()[0] + k)
    gc.enable()
    victim.add_done_callback(lambda f: None)  # makes the victim's Condition
    gc.disable()
gc.set_threshold(700)
gc.enable()
print("done")
"""


def test_a_collector_pass_while_a_condition_is_made_does_not_deadlock(tmp_path):
    """A pass of the garbage collector can start at any allocation, and its finalizers
    can use futures: one starting while a future's Condition is being made, whose
    finalizer cancels another future, must not wait for the lock held by its own thread
    (11 of these 16 placements hung when the lock was plain and held over the making)."""
    script = tmp_path / "finalizer.py"
    script.write_text(FINALIZER_IN_A_PASS)
    try:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked: a finalizer waited for the lock its own thread held")
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stdout + result.stderr


def test_two_threads_cancelling_at_once_tell_the_client_once():
    futures = [RequestFuture() for _ in range(20000)]
    told: list = []
    for future in futures:
        future._on_cancel = told.append
    together = threading.Barrier(2)

    def cancel_each():
        for future in futures:
            together.wait(WAIT)  # both threads cancel the same future at the same moment
            assert future.cancel()

    threads = [threading.Thread(target=cancel_each) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3 * WAIT)
    assert len(told) == len(futures)  # each told once, by the call that cancelled it
