"""The worker's side of cancellation (docs/PROTOCOL.md 4.12): FBW01 CANCEL from the
broker to a real ``fastbroker.Worker``.

Most tests play the broker themselves: a raw ROUTER socket bound on tcp 127.0.0.1
speaks FBW01 frames to a real ``Worker`` running in a thread of the test process
(real ZeroMQ peers on both sides, no mock). The end-to-end tests run a real
``Broker`` in a thread, a ``Worker`` process (``fastbroker worker
test_worker_cancel:CancelProbe``) and a raw DEALER client speaking FBC01
(PROTOCOL.md 10).

Jobs log their events to $FB_TEST_LOG (see workers_for_tests); a job waits at a
"gate" (a file the test creates) for as long as the test needs it held.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, List, Optional

import pytest
import zmq

from fastbroker import Broker, protocol, ReqWorker, Worker
from fastbroker.protocol import CLIENT_SIGNATURE, CMD_ANSWER, CMD_CANCEL, CMD_FAILED, CMD_HEARTBEAT, CMD_READY, CMD_TASK, WORKER_SIGNATURE

from conftest import wait_until
from workers_for_tests import LOG_ENV, log_event, read_log

WAIT = 10.0
"""Bound of every wait for something that should take well under a second."""

GATE_DIR_ENV = "FB_TEST_GATE_DIR"
JOB_LIMIT = 30.0
"""A gated or polling job gives up after this long, in case a test's teardown failed."""


# -- the job ------------------------------------------------------------------------


class JobCancelled(Exception):
    """What a polling job raises when it sees its cancellation."""


class CancelProbe(Worker):
    """Payload ``KIND:TAG``, logging "start" (and "cancelled-at-start" if
    ``cancelled()`` is already True then, which it must never be):

    - ``echo``: answers b"-" + data at once;
    - ``gate``: waits for the file $FB_TEST_GATE_DIR/TAG, without polling
      ``cancelled()``; then logs "saw-cancel" if ``cancelled()`` is True, "done",
      and answers b"-" + data;
    - ``poll``/``raise``: polls ``cancelled()`` every 5 ms; when it turns True, logs
      "saw-cancel" and returns b"stopped:" + data (``poll``) or raises
      JobCancelled (``raise``). Without a cancellation it answers after JOB_LIMIT.
    """

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        if self.cancelled():
            log_event("cancelled-at-start", data)
        kind, tag = data.split(b":", 1)
        deadline = time.monotonic() + JOB_LIMIT
        if kind == b"gate":
            gate = Path(os.environ[GATE_DIR_ENV]) / tag.decode()
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            if self.cancelled():
                log_event("saw-cancel", data)
        elif kind in (b"poll", b"raise"):
            while time.monotonic() < deadline:
                if self.cancelled():
                    log_event("saw-cancel", data)
                    if kind == b"raise":
                        raise JobCancelled(data.decode())
                    return b"stopped:" + data
                time.sleep(0.005)
        log_event("done", data)
        return b"-" + data


def events(log: Path, event: str, payload: str) -> int:
    return sum(1 for e in read_log(log) if e.event == event and e.payload == payload)


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """The job log and the gate directory, for jobs in this process and in children."""
    log = tmp_path / "jobs.log"
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(LOG_ENV, str(log))
    monkeypatch.setenv(GATE_DIR_ENV, str(gates))

    def open_gate(tag: str) -> None:
        (gates / tag).touch()

    return log, open_gate


# -- the test plays the broker --------------------------------------------------------


def tid(n: int) -> bytes:
    return b"CANCELTEST" + n.to_bytes(6, "big")


class FakeBroker:
    """A ROUTER bound on tcp 127.0.0.1 that speaks FBW01 to one worker."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.identity: Optional[bytes] = None
        self.got: List[List[bytes]] = []  # [command, body...] of every non-heartbeat message

    def send(self, command: bytes, *body: bytes) -> None:
        assert self.identity is not None
        self.sock.send_multipart([self.identity, b"", WORKER_SIGNATURE, command, *body])

    def recv(self, timeout: float = WAIT) -> List[bytes]:
        """The next message from the worker other than a HEARTBEAT, as [command, body...]."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                break
            frames = self.sock.recv_multipart()
            identity, rest = frames[0], frames[1:]
            assert rest[:2] == [b"", WORKER_SIGNATURE], frames
            if self.identity is None:
                self.identity = identity
            assert identity == self.identity, "the worker reconnected on a new socket"
            if rest[2] == CMD_HEARTBEAT:
                continue
            self.got.append(rest[2:])
            return rest[2:]
        pytest.fail(f"no message from the worker within {timeout} s; got so far: {self.got}")

    def expect_ready(self, credit: int) -> None:
        assert self.recv() == [CMD_READY, credit.to_bytes(4, "big")]


@pytest.fixture
def fake(ctx, job_env):
    """(FakeBroker, the running CancelProbe worker) with credit 1; the worker has
    sent READY. Teardown opens every gate the tests use, stops and closes the worker."""
    broker = FakeBroker(ctx)
    # A long silence limit: the fake broker does not heartbeat, and the tests are short.
    worker = CancelProbe(ctx, broker.address, credit=1, heartbeat=1.0, liveness=20)
    worker.stop_grace = 0.01
    thread = threading.Thread(target=worker.run, name="cancel-probe-worker", daemon=True)
    thread.start()
    try:
        broker.expect_ready(1)
        yield broker, worker
    finally:
        _, open_gate = job_env
        for tag in ("one", "running", "held"):
            open_gate(tag)
        worker.stop()
        thread.join(WAIT)
        assert not thread.is_alive(), "the worker did not stop"
        worker.close()


def test_cancel_of_a_queued_job_fails_it_at_once_and_it_never_runs(fake, job_env):
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:one")
    broker.send(CMD_TASK, tid(2), b"echo:two")  # beyond the credit: it waits for the only pool thread
    wait_until(lambda: events(log, "start", "gate:one"), WAIT, message="the gated job to start")

    broker.send(CMD_CANCEL, tid(2))
    # The gate is still closed, so the only pool thread is busy: this FAILED can
    # only come from the I/O loop, without running the job.
    assert broker.recv() == [CMD_FAILED, tid(2), b"Cancelled", b"cancelled by the client"]
    assert events(log, "done", "gate:one") == 0

    open_gate("one")
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:one"]
    # The pool runs its queue in order: had job 2 stayed queued it would run before 3.
    broker.send(CMD_TASK, tid(3), b"echo:three")
    assert broker.recv() == [CMD_ANSWER, tid(3), b"-echo:three"]
    assert events(log, "start", "echo:two") == 0, "the cancelled job ran"
    assert (worker.stats.cancelled, worker.stats.cancelled_unstarted) == (1, 1)
    assert worker.stats.received == 3 and worker.stats.answered == 2


@pytest.mark.parametrize("kind", ["poll", "raise"])
def test_a_polling_job_sees_its_cancellation_and_stops_early(fake, job_env, kind):
    broker, worker = fake
    log, _ = job_env
    data = f"{kind}:long".encode()
    broker.send(CMD_TASK, tid(1), data)
    wait_until(lambda: events(log, "start", data.decode()), WAIT, message="the polling job to start")
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
    assert events(log, "saw-cancel", data.decode()) == 1
    assert events(log, "cancelled-at-start", data.decode()) == 0
    assert (worker.stats.cancelled, worker.stats.cancelled_unstarted) == (1, 0)

    # The mark went with the job: a new job on the same thread is not cancelled.
    broker.send(CMD_TASK, tid(2), b"poll:next")
    wait_until(lambda: events(log, "start", "poll:next"), WAIT, message="the next job to start")
    broker.send(CMD_CANCEL, tid(2))
    assert broker.recv() == [CMD_ANSWER, tid(2), b"stopped:poll:next"]
    assert events(log, "cancelled-at-start", "poll:next") == 0


def test_a_running_job_that_ignores_cancel_is_still_answered(fake, job_env):
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:running")
    wait_until(lambda: events(log, "start", "gate:running"), WAIT, message="the gated job to start")
    broker.send(CMD_CANCEL, tid(1))
    # Let the worker read the CANCEL before the job ends (a heartbeat sent after it
    # would not prove it read it; its stats do).
    wait_until(lambda: worker.stats.cancelled == 1, WAIT, message="the worker to take the CANCEL")
    open_gate("running")
    # The broker needs this answer to free the credit, even though it drops it.
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:running"]
    assert events(log, "saw-cancel", "gate:running") == 1
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
    broker.send(CMD_TASK, tid(3), b"poll:third")
    wait_until(lambda: events(log, "start", "poll:third"), WAIT, message="the next job to start")
    broker.send(CMD_CANCEL, tid(3))
    assert broker.recv() == [CMD_ANSWER, tid(3), b"stopped:poll:third"]
    assert events(log, "cancelled-at-start", "poll:third") == 0


def test_cancel_of_a_task_id_held_twice_ends_both(fake, job_env):
    """A timed-out try still running here and a later try of the same job share an
    id (PROTOCOL.md 5): one CANCEL is for both."""
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:held")
    broker.send(CMD_TASK, tid(1), b"echo:again")
    wait_until(lambda: events(log, "start", "gate:held"), WAIT, message="the gated job to start")
    broker.send(CMD_CANCEL, tid(1))
    assert broker.recv() == [CMD_FAILED, tid(1), b"Cancelled", b"cancelled by the client"]
    wait_until(lambda: worker.stats.cancelled == 2, WAIT, message="the worker to take the CANCEL")
    open_gate("held")
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:held"]
    assert events(log, "saw-cancel", "gate:held") == 1
    assert events(log, "start", "echo:again") == 0


def test_cancelled_is_false_outside_fbw01_jobs(ctx):
    worker = ReqWorker(ctx, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    try:
        assert worker.cancelled() is False
    finally:
        worker.close()


# -- end to end: Broker + Worker process + FBC01 client ----------------------------------

PURE_READY = Path("/tmp/fb_pure_ready")
COMPILED_READY = Path("/tmp/fb_compiled_ready")
E2E_HEARTBEAT = 0.2
E2E_LIVENESS = 5


class BrokerThread:
    """A real Broker (the live core) serving in a thread."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.broker = Broker(ctx, None, None, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                             heartbeat=E2E_HEARTBEAT, liveness=E2E_LIVENESS)
        self.thread = threading.Thread(target=self.broker.run, name="broker", daemon=True)
        self.thread.start()

    def stop(self) -> dict:
        """Stop the loop; its stats, read once it has stopped."""
        self.broker.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the broker did not stop"
        return self.broker.stats()


@pytest.fixture
def broker_thread(ctx, core_name):
    marker = PURE_READY if core_name == "pure" else COMPILED_READY
    if not marker.exists():
        pytest.skip(f"the {core_name} core's FBC01 support is not ready ({marker} is missing)")
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
        ["-v", "worker", "test_worker_cancel:CancelProbe", workers_addr, "--credit", "1",
         "--heartbeat", str(E2E_HEARTBEAT), "--liveness", str(E2E_LIVENESS)],
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
        return events(log, "start", data)

    wait_until(started, WAIT, message="the job to start in the worker process")
    client.send(protocol.C_CANCEL, first)
    assert client.wait_for(lambda r: r[1] == first) == [protocol.R_CANCELLED, first]

    if kind == "gate":
        # The job does not poll, and checks cancelled() once the gate opens: open it
        # once the worker has taken the CANCEL (it logs that at -v).
        wait_until(lambda: _worker_took_cancel(worker), WAIT, message="the worker to log the CANCEL")
        open_gate("e2e")
    wait_until(lambda: events(log, "saw-cancel", data), WAIT, message="the job to see cancelled()")

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
    assert events(log, "cancelled-at-start", data) == 0
    stats = broker_thread.stop()
    assert stats["cancelled"] == 1 and stats["answered"] == 1, stats


def _worker_took_cancel(proc) -> bool:
    """The worker process logs (at -v, info) each CANCEL it takes for a running job."""
    return "cancelled by the client while running" in proc.stderr_path.read_text(errors="replace")
