"""The worker's side of cancellation (docs/PROTOCOL.md 4.12): FBW01 CANCEL from the
broker to a real ``fastbroker.Worker``.

Most tests play the broker themselves: a raw ROUTER socket bound on tcp 127.0.0.1
speaks FBW01 frames to a real ``Worker`` running in a thread of the test process
(real ZeroMQ peers on both sides, no mock). The end-to-end tests run a real
``Broker`` in a thread, a ``Worker`` process (``fastbroker worker
workers_for_tests:CancelProbe``) and a raw DEALER client speaking FBC01
(PROTOCOL.md 10).

Jobs log their events to $FB_TEST_LOG (see workers_for_tests); a job waits at a
"gate" (a file the test creates) for as long as the test needs it held.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Callable, List

import pytest
import zmq

from fastbroker import Broker, ConfigError, ReqWorker, protocol
from fastbroker.protocol import CLIENT_SIGNATURE, CMD_ANSWER, CMD_CANCEL, CMD_FAILED, CMD_TASK, MAX_CREDIT
from rigs import FAKE_WAIT, FakeBroker, count_events, read_log, tid, wait_until

from workers_for_tests import GATE_DIR_ENV, JOB_LIMIT, LOG_ENV, CancelProbe

WAIT = FAKE_WAIT
"""Bound of every wait for something that should take well under a second."""


# -- the test plays the broker (rigs.FakeBroker, the `fake` fixture) -------------------------


def test_cancel_of_a_queued_job_fails_it_at_once_and_it_never_runs(fake, job_env):
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:one")
    broker.send(CMD_TASK, tid(2), b"echo:two")  # beyond the credit: it waits for the only pool thread
    wait_until(lambda: count_events(log, "start", "gate:one"), WAIT, message="the gated job to start")

    broker.send(CMD_CANCEL, tid(2))
    # The gate is still closed, so the only pool thread is busy: this FAILED can
    # only come from the I/O loop, without running the job.
    assert broker.recv() == [CMD_FAILED, tid(2), b"Cancelled", b"cancelled by the client"]
    assert count_events(log, "done", "gate:one") == 0

    open_gate("one")
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:one"]
    # The pool runs its queue in order: had job 2 stayed queued it would run before 3.
    broker.send(CMD_TASK, tid(3), b"echo:three")
    assert broker.recv() == [CMD_ANSWER, tid(3), b"-echo:three"]
    assert count_events(log, "start", "echo:two") == 0, "the cancelled job ran"
    assert (worker.stats.cancelled, worker.stats.cancelled_unstarted) == (1, 1)
    assert worker.stats.received == 3 and worker.stats.answered == 2


@pytest.mark.parametrize("kind", ["poll", "raise"])
def test_a_polling_job_sees_its_cancellation_and_stops_early(fake, job_env, kind):
    broker, worker = fake
    log, _ = job_env
    data = f"{kind}:long".encode()
    broker.send(CMD_TASK, tid(1), data)
    wait_until(lambda: count_events(log, "start", data.decode()), WAIT, message="the polling job to start")
    assert not worker.cancelled(), "cancelled() outside a job's thread must be False"

    started = time.monotonic()
    broker.send(CMD_CANCEL, tid(1))
    reply = broker.recv()
    took = time.monotonic() - started
    if kind == "poll":
        assert reply == [CMD_ANSWER, tid(1), b"stopped:" + data]
    else:
        assert reply == [CMD_FAILED, tid(1), b"JobCancelled", data]
    assert took < JOB_LIMIT / 3, "the job did not stop early"
    assert count_events(log, "saw-cancel", data.decode()) == 1
    assert count_events(log, "cancelled-at-start", data.decode()) == 0
    assert (worker.stats.cancelled, worker.stats.cancelled_unstarted) == (1, 0)

    # The mark went with the job: a new job on the same thread is not cancelled.
    broker.send(CMD_TASK, tid(2), b"poll:next")
    wait_until(lambda: count_events(log, "start", "poll:next"), WAIT, message="the next job to start")
    broker.send(CMD_CANCEL, tid(2))
    assert broker.recv() == [CMD_ANSWER, tid(2), b"stopped:poll:next"]
    assert count_events(log, "cancelled-at-start", "poll:next") == 0


def test_a_running_job_that_ignores_cancel_is_still_answered(fake, job_env):
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:running")
    wait_until(lambda: count_events(log, "start", "gate:running"), WAIT, message="the gated job to start")
    broker.send(CMD_CANCEL, tid(1))
    # Let the worker read the CANCEL before the job ends (a heartbeat sent after it
    # would not prove it read it; its stats do).
    wait_until(lambda: worker.stats.cancelled == 1, WAIT, message="the worker to take the CANCEL")
    open_gate("running")
    # The broker needs this answer to free the credit, even though it drops it.
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:running"]
    assert count_events(log, "saw-cancel", "gate:running") == 1
    assert worker.stats.cancelled_unstarted == 0


def test_cancel_for_a_job_not_in_hand_is_ignored(fake, job_env):
    broker, worker = fake
    log, _ = job_env
    broker.send(CMD_TASK, tid(1), b"echo:first")
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-echo:first"]
    broker.send(CMD_CANCEL, tid(1))  # just answered: it crossed the answer
    broker.send(CMD_CANCEL, tid(99))  # never seen
    broker.send(CMD_CANCEL)  # malformed: no task id
    broker.send(CMD_CANCEL, tid(98), b"extra")  # malformed: two body frames
    broker.send(CMD_TASK, tid(2), b"echo:second")
    # Nothing for the CANCELs (recv skips heartbeats only), and the worker keeps serving
    # on the same socket (recv checks the identity).
    assert broker.recv() == [CMD_ANSWER, tid(2), b"-echo:second"]
    assert worker.stats.cancelled == 0
    assert worker.stats.reconnects == 0
    assert worker.stats.ignored == 2  # the malformed two, counted
    broker.send(CMD_TASK, tid(3), b"poll:third")
    wait_until(lambda: count_events(log, "start", "poll:third"), WAIT, message="the next job to start")
    broker.send(CMD_CANCEL, tid(3))
    assert broker.recv() == [CMD_ANSWER, tid(3), b"stopped:poll:third"]
    assert count_events(log, "cancelled-at-start", "poll:third") == 0


def test_a_malformed_task_or_an_unknown_command_is_counted_and_ignored(fake, job_env):
    broker, worker = fake

    def send_raw(*frames: bytes) -> None:  # FakeBroker.send would make an FBW02 TASK right
        broker.sock.send_multipart([broker.identity, b"", broker.signature, *frames])

    if broker.signature == protocol.WORKER_SIGNATURE_V2:
        # Headers that do not match the frames: one record for two frames, a record
        # cut short, a record of 0 frames.
        send_raw(CMD_TASK, b"a", b"b", tid(1) + (1).to_bytes(2, "big"))
        send_raw(CMD_TASK, b"a", tid(1) + b"\x00")
        send_raw(CMD_TASK, tid(1) + (0).to_bytes(2, "big"))
        # More records than MAX_BATCH (PROTOCOL.md 13.2), each of one frame, all there.
        over = protocol.MAX_BATCH + 1
        send_raw(CMD_TASK, *[b"x"] * over, (tid(1) + (1).to_bytes(2, "big")) * over)
    else:
        send_raw(CMD_TASK)  # no task id
        send_raw(CMD_TASK)
        send_raw(CMD_TASK)
        send_raw(CMD_TASK, b"short", b"echo:x")  # a task id is 16 bytes
    send_raw(b"\x7f", b"from a newer broker")
    broker.send(CMD_TASK, tid(2), b"echo:good")
    # The good one is served on the same socket; none of the others started a job.
    assert broker.recv() == [CMD_ANSWER, tid(2), b"-echo:good"]
    assert (worker.stats.ignored, worker.stats.received, worker.stats.reconnects) == (5, 1, 0)


def test_cancel_of_a_task_id_held_twice_ends_both(fake, job_env):
    """A timed-out try still running here and a later try of the same job share an
    id (PROTOCOL.md 5): one CANCEL is for both."""
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:held")
    broker.send(CMD_TASK, tid(1), b"echo:again")
    wait_until(lambda: count_events(log, "start", "gate:held"), WAIT, message="the gated job to start")
    broker.send(CMD_CANCEL, tid(1))
    assert broker.recv() == [CMD_FAILED, tid(1), b"Cancelled", b"cancelled by the client"]
    wait_until(lambda: worker.stats.cancelled == 2, WAIT, message="the worker to take the CANCEL")
    open_gate("held")
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:held"]
    assert count_events(log, "saw-cancel", "gate:held") == 1
    assert count_events(log, "start", "echo:again") == 0


def _started(log) -> List[str]:
    return [e.payload for e in read_log(log) if e.event == "start"]


def test_prefetch_holds_jobs_beyond_credit_and_runs_them_one_at_a_time(ctx, job_env):
    log, open_gate = job_env
    broker = FakeBroker(ctx)
    worker = CancelProbe(ctx, broker.address, credit=1, prefetch=2, heartbeat=1.0, liveness=20)
    worker.stop_grace = 0.01
    thread = threading.Thread(target=worker.run, name="prefetch-worker", daemon=True)
    thread.start()
    try:
        broker.expect_ready(3)  # the broker's credit: credit + prefetch
        for n, tag in enumerate((b"p1", b"p2", b"p3")):
            broker.send(CMD_TASK, tid(n), b"gate:" + tag)
        wait_until(lambda: _started(log) == ["gate:p1"], timeout=WAIT, message="the first job to start")
        for n, tag in enumerate(("p1", "p2", "p3")):
            wait_until(lambda: len(_started(log)) == n + 1, timeout=WAIT, message=f"job {tag} to start")
            assert _started(log) == ["gate:p1", "gate:p2", "gate:p3"][: n + 1]  # one thread: one at a time
            open_gate(tag)
            assert broker.recv() == [CMD_ANSWER, tid(n), b"-gate:" + tag.encode()]
        assert worker.stats.received == 3
    finally:
        for tag in ("p1", "p2", "p3"):
            open_gate(tag)
        worker.stop()
        thread.join(WAIT)
        worker.close()


def test_prefetch_is_checked(ctx):
    with pytest.raises(ConfigError, match="prefetch"):
        CancelProbe(ctx, "tcp://127.0.0.1:1", prefetch=-1)
    with pytest.raises(ConfigError, match="credit \\+ prefetch"):
        CancelProbe(ctx, "tcp://127.0.0.1:1", credit=2, prefetch=MAX_CREDIT)


def test_cancelled_is_false_outside_fbw01_jobs(ctx):
    worker = ReqWorker(ctx, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    try:
        assert worker.cancelled() is False
    finally:
        worker.close()


# -- end to end: Broker + Worker process + FBC01 client ----------------------------------

E2E_HEARTBEAT = 0.2
E2E_LIVENESS = 5


class BrokerThread:
    """A real Broker (the live core) serving in a thread."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.broker = Broker(
            ctx,
            None,
            None,
            "tcp://127.0.0.1:*",
            "tcp://127.0.0.1:*",
            "tcp://127.0.0.1:*",
            heartbeat=E2E_HEARTBEAT,
            liveness=E2E_LIVENESS,
        )
        self.thread = threading.Thread(target=self.broker.run, name="broker", daemon=True)
        self.thread.start()

    def stop(self) -> dict:
        """Stop the loop; its stats, read once it has stopped."""
        self.broker.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the broker did not stop"
        return self.broker.stats()


@pytest.fixture
def broker_thread(ctx):
    """A real Broker on the live core, serving in a thread; stopped and closed at teardown."""
    running = BrokerThread(ctx)
    try:
        yield running
    finally:
        running.stop()
        running.broker.close()


class Client:
    """A raw FBC01 DEALER client; keeps every reply it receives, in order."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.replies: List[List[bytes]] = []  # [reply, id, body...]

    def send(self, command: bytes, rid: bytes, *body: bytes) -> None:
        self.sock.send_multipart([CLIENT_SIGNATURE, command, rid, *body])

    def wait_for(self, predicate: Callable[[List[bytes]], bool], timeout: float = WAIT) -> List[bytes]:
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                break
            frames = self.sock.recv_multipart()
            assert frames[0] == CLIENT_SIGNATURE, frames
            self.replies.append(frames[1:])
            if predicate(frames[1:]):
                return frames[1:]
        pytest.fail(f"no expected reply within {timeout} s; replies so far: {self.replies}")

    def about(self, rid: bytes) -> List[bytes]:
        return [r[0] for r in self.replies if r[1] == rid]


@pytest.mark.parametrize("kind", ["poll", "gate"])
def test_end_to_end_cancel_of_a_running_job(broker_thread, ctx, procs, job_env, kind):
    """SUBMIT, CANCEL while it runs: the client gets CANCELLED once and no OK even when
    the job ends; the job saw cancelled(); the worker's only credit is free again."""
    log, open_gate = job_env
    requests_addr, workers_addr, _ = broker_thread.broker.endpoints
    worker = procs.start(
        [
            "-v",
            "worker",
            "workers_for_tests:CancelProbe",
            workers_addr,
            "--credit",
            "1",
            "--heartbeat",
            str(E2E_HEARTBEAT),
            "--liveness",
            str(E2E_LIVENESS),
        ],
        "worker",
        # procs' environment was copied before job_env set these.
        env={LOG_ENV: os.environ[LOG_ENV], GATE_DIR_ENV: os.environ[GATE_DIR_ENV]},
    )
    client = Client(ctx, requests_addr)
    first, second = uuid.uuid4().bytes, uuid.uuid4().bytes
    data = f"{kind}:e2e"
    client.send(protocol.C_SUBMIT, first, b"", data.encode())
    assert client.wait_for(lambda r: True) == [protocol.R_ACCEPTED, first]

    def started():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited with {worker.returncode}\n{procs.output()}")
        return count_events(log, "start", data)

    wait_until(started, WAIT, message="the job to start in the worker process")
    client.send(protocol.C_CANCEL, first)
    assert client.wait_for(lambda r: r[1] == first) == [protocol.R_CANCELLED, first]

    if kind == "gate":
        # The job does not poll, and checks cancelled() once the gate opens: open it
        # once the worker has taken the CANCEL (it logs that at -v).
        wait_until(lambda: _worker_took_cancel(worker), WAIT, message="the worker to log the CANCEL")
        open_gate("e2e")
    wait_until(lambda: count_events(log, "saw-cancel", data), WAIT, message="the job to see cancelled()")

    # The next job can only run on this worker (credit 1) once the broker has freed
    # the cancelled job's credit on its ANSWER/FAILED; and the worker sends that
    # answer before the next one on one socket, so an OK for the cancelled request
    # would reach the client before the next request's OK.
    client.send(protocol.C_SUBMIT, second, b"", b"echo:next")
    client.wait_for(lambda r: r[1] == second and r[0] == protocol.R_OK)
    assert client.about(first) == [protocol.R_ACCEPTED, protocol.R_CANCELLED]
    assert client.about(second) == [protocol.R_ACCEPTED, protocol.R_OK]
    assert [r for r in client.replies if r[1] == second][-1] == [protocol.R_OK, second, b"-echo:next"]
    assert {e.pid for e in read_log(log) if e.event == "start"} == {worker.pid}
    assert count_events(log, "cancelled-at-start", data) == 0
    stats = broker_thread.stop()
    assert stats["cancelled"] == 1 and stats["answered"] == 1, stats


def _worker_took_cancel(proc) -> bool:
    """The worker process logs (at -v, info) each CANCEL it takes for a running job."""
    return "cancelled by the client while running" in proc.stderr_path.read_text(errors="replace")
