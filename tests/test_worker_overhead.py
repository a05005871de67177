"""What the cheaper per-job path of ``fastbroker.Worker`` must still do.

The loop receives a message frame by frame (``Frame.more``) and asks the socket
whether another one is waiting instead of waiting for ``zmq.Again``; it sends
frame by frame; it drains the wake pipe only when a poll saw it readable; jobs go
to the threads of a ``JobPool`` instead of a ThreadPoolExecutor. These tests hold
each of those to what the old path did: whole messages both ways (empty, many and
large frames, several messages in one batch), an idle loop that sleeps, a job
withdrawn by CANCEL that never runs, job threads started as needed and ended with
the pool, and an interpreter that still exits while a pool is left running.

The worker tests play the broker with rigs.FakeBroker (a raw ROUTER on tcp
127.0.0.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

import fastbroker
from fastbroker import Worker
from fastbroker.protocol import CMD_ANSWER, CMD_TASK
from fastbroker.worker.session import JobPool
from rigs import FAKE_WAIT as WAIT, FakeBroker, tid, wait_until


class Echo(Worker):
    """Answers a job's payload frames unchanged."""

    def process_multipart(self, frames: List[bytes]) -> Sequence[bytes]:
        return list(frames)


class RunningWorker:
    """An Echo worker running in a thread against a FakeBroker; remembers the
    thread's native id (for its CPU time in /proc)."""

    def __init__(self, ctx, credit: int) -> None:
        self.broker = FakeBroker(ctx)
        self.worker = Echo(ctx, self.broker.address, credit=credit, heartbeat=1.0, liveness=20)
        self.worker.stop_grace = 0.01
        self.native_id = 0
        started = threading.Event()

        def run() -> None:
            self.native_id = threading.get_native_id()
            started.set()
            self.worker.run()

        self.thread = threading.Thread(target=run, name="overhead-test-worker", daemon=True)
        self.thread.start()
        assert started.wait(WAIT)
        self.broker.expect_ready(credit)

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the worker did not stop"
        self.worker.close()


@pytest.fixture
def running(ctx):
    made: List[RunningWorker] = []

    def start(credit: int) -> RunningWorker:
        made.append(RunningWorker(ctx, credit))
        return made[-1]

    yield start
    for r in made:
        r.close()


def job_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastbroker-job")]


def test_a_batch_of_tasks_with_odd_frames_comes_back_whole(running):
    r = running(credit=4)
    payloads: Dict[bytes, List[bytes]] = {
        tid(1): [b""],
        tid(2): [b"a", b"", b"c"],
        tid(3): [bytes(range(256)) * 4096],  # 1 MiB
        tid(4): [b"%d" % i for i in range(50)],
    }
    for task_id, frames in payloads.items():  # back to back: one receive takes several
        r.broker.send(CMD_TASK, task_id, *frames)
    answers = {}
    for _ in payloads:
        command, task_id, *frames = r.broker.recv()
        assert command == CMD_ANSWER
        answers[task_id] = frames
    assert answers == payloads
    assert (r.worker.stats.received, r.worker.stats.answered, r.worker.stats.failed) == (4, 4, 0)
    assert len(job_threads()) <= 4


def test_job_threads_end_with_the_worker(running):
    r = running(credit=2)
    for n in range(1, 6):
        r.broker.send(CMD_TASK, tid(n), b"job %d" % n)
        assert r.broker.recv() == [CMD_ANSWER, tid(n), b"job %d" % n]
    # One job at a time: one thread was enough.
    assert len(job_threads()) == 1
    r.close()
    assert job_threads() == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_an_idle_worker_sleeps_in_its_poll(running):
    """After a job (its thread wrote to the wake pipe), the loop must not spin: it
    drains the pipe once and sleeps until the next heartbeat is due."""
    r = running(credit=1)
    r.broker.send(CMD_TASK, tid(1), b"wake the loop")
    assert r.broker.recv() == [CMD_ANSWER, tid(1), b"wake the loop"]

    def cpu() -> float:
        with open(f"/proc/self/task/{r.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    # The point is an idle second: nothing is sent to the worker, so there is no
    # condition to wait for; its CPU time over the second is what is measured.
    time.sleep(1.0)
    # A spinning loop would take most of a core; a sleeping one a few ms (CPU time,
    # not wall time: a busy machine does not make this flaky).
    assert cpu() - before < 0.25


# -- JobPool -------------------------------------------------------------------------


def test_job_pool_starts_threads_as_needed_and_withdraws_only_waiting_jobs():
    gate = threading.Event()
    ran: List[int] = []

    def run(number: int, task_id: bytes, payload: List[bytes]) -> None:
        ran.append(number)
        assert gate.wait(WAIT)

    pool = JobPool(2, run, "fastbroker-job-test")
    try:
        pool.submit(1, b"t1", [b"p"])
        assert len(pool.threads) == 1  # the first job starts one
        wait_until(lambda: ran == [1], WAIT, message="job 1 to start")
        pool.submit(2, b"t2", [b"p"])
        pool.submit(3, b"t3", [b"p"])
        assert len(pool.threads) == 1  # more only when pace() sees the jobs wait
        # Job 1 blocks its thread: once job 2 has waited stuck_after, the
        # loop's pace() adds a thread, then another (up to the size only).
        for _ in range(3):
            time.sleep(pool.stuck_after * 2)
            pool.pace(time.monotonic())
        assert len(pool.threads) == 2  # never more than its size
        wait_until(lambda: ran == [1, 2], WAIT, message="job 2 to start")
        assert not pool.withdraw(1), "a running job cannot be withdrawn"
        assert pool.withdraw(3), "a waiting job can"
        assert not pool.withdraw(3), "only once"
        pool.submit(4, b"t4", [b"p"])
        assert len(pool.threads) == 2
    finally:
        gate.set()
        pool.shutdown(wait=True)
    assert sorted(ran) == [1, 2, 4]
    assert not any(t.is_alive() for t in pool.threads)
    with pytest.raises(RuntimeError):
        pool.submit(5, b"t5", [b"p"])


def test_job_pool_adds_a_thread_only_when_its_threads_stop_keeping_up():
    """pace() adds a thread when a job has waited ``stuck_after`` for one; not while
    the oldest waiting job is younger (quick jobs: one thread takes them as they come,
    and more would only fight for the GIL)."""
    gate = threading.Event()
    ran: List[int] = []

    def run(number: int, task_id: bytes, payload: List[bytes]) -> None:
        ran.append(number)
        if number == 0:
            assert gate.wait(WAIT)

    pool = JobPool(8, run, "fastbroker-job-test")
    try:
        pool.submit(0, b"t0", [])
        wait_until(lambda: ran == [0], WAIT, message="job 0 to start")
        pool.submit(1, b"t1", [])  # waits: the one thread is in job 0
        came = pool.waiting[1][2]
        pool.pace(came + pool.stuck_after / 2)
        assert len(pool.threads) == 1, "job 1 has waited less than stuck_after"
        pool.last_pace = 0.0  # pace() looks again at once
        pool.pace(came + pool.stuck_after * 2)
        assert len(pool.threads) == 2, "job 1 waited stuck_after: one more thread"
        wait_until(lambda: 1 in ran, WAIT, message="job 1 to run on the new thread")
        pool.last_pace = 0.0
        pool.pace(time.monotonic() + 1.0)
        assert len(pool.threads) == 2, "nothing waits: no thread added"
    finally:
        gate.set()
        pool.shutdown(wait=True)
    assert sorted(ran) == [0, 1]


def test_job_pool_runs_or_withdraws_each_job_exactly_once():
    """Threads take jobs while the caller withdraws them: each job either ran or
    was withdrawn (withdraw said True), never both, never neither."""
    ran: List[int] = []
    pool = JobPool(3, lambda number, task_id, payload: ran.append(number), "fastbroker-job-test")
    withdrawn = set()
    try:
        for number in range(2000):
            pool.submit(number, b"t", [])
            if number % 2 and pool.withdraw(number - 1):
                withdrawn.add(number - 1)
    finally:
        pool.shutdown(wait=True)
    assert len(ran) == len(set(ran))
    assert set(ran) | withdrawn == set(range(2000))
    assert not set(ran) & withdrawn


def test_a_pool_left_running_lets_the_interpreter_exit_after_its_job(tmp_path):
    """As with a ThreadPoolExecutor: at exit, the pool's threads finish the job they
    hold and end (they are not daemons; an idle one must not keep the process)."""
    done = tmp_path / "done"
    script = textwrap.dedent(f"""
        import threading
        import time
        from fastbroker.worker.session import JobPool

        started = threading.Event()

        def run(number, task_id, payload):
            started.set()
            time.sleep(0.3)  # the job in hand when the interpreter exits: it must last past the exit
            open({str(done)!r}, "w").close()

        pool = JobPool(2, run, "fastbroker-job")
        pool.submit(1, b"t", [])
        pool.submit(2, b"t", [])
        pool.submit(3, b"t", [])
        assert started.wait(20), "no job started"
        # no shutdown(): the interpreter exits with the pool running a job
    """)
    src = str(Path(fastbroker.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=30, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert done.exists(), "the job in hand was not finished"
