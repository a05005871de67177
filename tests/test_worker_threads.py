"""How many job threads a fastbroker.Worker runs (both sessions): as many as its jobs
need, up to its credit. Quick jobs are taken by one thread as they come (more would
only fight for the GIL); jobs that block (sleep, I/O) get a thread each, up to the
credit, within milliseconds. A real broker, worker and client over ipc."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Tuple

import pytest

from fastbroker import Broker, Client, Worker
from rigs import wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""
CREDIT = 32


class Recorder(Worker):
    """Notes the thread of every job and how many ran at once; a payload b"sleep"
    sleeps 0.3 s (a job that blocks), b"nap" 0.5 ms, b"wait" 2 ms, any other is
    answered at once."""

    lock = threading.Lock()
    threads: set = set()
    running = 0
    peak = 0

    def process(self, data: bytes) -> bytes:
        with Recorder.lock:
            Recorder.threads.add(threading.get_ident())
            Recorder.running += 1
            Recorder.peak = max(Recorder.peak, Recorder.running)
        try:
            if data == b"sleep":
                time.sleep(0.3)
            elif data == b"nap":
                time.sleep(0.0005)
            elif data == b"wait":
                time.sleep(0.002)
            return data
        finally:
            with Recorder.lock:
                Recorder.running -= 1


@contextlib.contextmanager
def serving(tmp_path, credit: int) -> Iterator[Tuple[Broker, Recorder]]:
    """A broker and a Recorder worker with `credit`, each running in a thread."""
    broker = Broker(None, None, None, *(f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")))
    bthread = threading.Thread(target=broker.run, name="broker")
    bthread.start()
    Recorder.threads, Recorder.running, Recorder.peak = set(), 0, 0
    worker = Recorder(None, broker.endpoints[1], credit=credit)
    wthread = threading.Thread(target=worker.run, name="worker")
    wthread.start()
    try:
        yield broker, worker
    finally:
        worker.stop()
        wthread.join(WAIT)
        worker.close()
        broker.stop()
        bthread.join(WAIT)
        broker.close()
    assert not wthread.is_alive() and not bthread.is_alive()


@pytest.fixture
def served(tmp_path) -> Iterator[Tuple[Broker, Recorder]]:
    with serving(tmp_path, CREDIT) as pair:
        yield pair


def test_quick_jobs_are_run_by_a_few_threads(served):
    broker, _ = served
    payloads = [b"%d" % i for i in range(3000)]
    with Client(broker.endpoints[0]) as client:
        assert list(client.map(payloads)) == payloads
    # Before, every batch of jobs that found the threads busy started more, up to the
    # credit (32 threads, all fighting for the GIL). A thread is added only when a job
    # has waited a millisecond (10 ms for the pure session) for one: on a loaded machine
    # that happens now and then (a thread descheduled), each time doubling what is added,
    # hence the margin.
    assert len(Recorder.threads) <= CREDIT // 2, f"{len(Recorder.threads)} job threads for quick jobs"


def test_jobs_that_block_get_a_thread_each_up_to_the_credit(served):
    broker, worker = served
    with Client(broker.endpoints[0]) as client:
        futures = client.submit_many([b"sleep"] * CREDIT)
        # All run at once: each blocks its thread, so the loop adds threads (one, then
        # twice as many each time a job has waited again) until the credit.
        wait_until(lambda: Recorder.peak == CREDIT, timeout=WAIT, message=f"peak {Recorder.peak} of {CREDIT}")
        assert [f.result(WAIT) for f in futures] == [b"sleep"] * CREDIT
    assert len(Recorder.threads) == CREDIT


def test_short_waits_get_threads_too(served):
    """Jobs that block for less than the pacing's threshold (0.5 ms each, 400 at once,
    the credit's worth in hand): one thread would run them one after the other while
    the others wait (16 ms for the last); the jobs' waiting time, not the threads'
    pace, is what adds threads."""
    broker, _ = served
    with Client(broker.endpoints[0]) as client:
        futures = client.submit_many([b"nap"] * 400)
        assert [f.result(WAIT) for f in futures] == [b"nap"] * 400
    assert Recorder.peak >= 4, f"at most {Recorder.peak} at once"


def test_a_small_credit_of_jobs_that_block_runs_them_together(tmp_path):
    """Credit 4, jobs of 2 ms: the oldest waiting one waits at most 6 ms, under the
    pure session's GIL-proof threshold (10 ms); that jobs block (their time is spent
    off the CPU) is what lets it add threads after 1 ms anyway (the compiled session's
    threshold is 1 ms always)."""
    with serving(tmp_path, 4) as (broker, _):
        with Client(broker.endpoints[0]) as client:
            futures = client.submit_many([b"wait"] * 200)
            assert [f.result(WAIT) for f in futures] == [b"wait"] * 200
    assert Recorder.peak >= 3, f"at most {Recorder.peak} at once"
