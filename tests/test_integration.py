"""A real broker process, real worker processes, real sockets (tcp on 127.0.0.1
and ipc in a temp dir), real SIGKILL; plus one in-process run over inproc://.

The broker is started with ``-v`` and binds tcp to port ``*`` (the system picks
free ports); the test reads the endpoints it got from its "broker on ..." log
line. A broker is ready for a test once a REQ request through it is answered.
Workers log what they run to a file (see workers_for_tests), which tells which
process ran which job and how many times.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
import uuid
from typing import List, NamedTuple

import pytest
import zmq

from fastbroker import Broker, ReqClient, Worker
from fastbroker.protocol import DROP_REASONS
from rigs import Processes, concurrent_requests, read_log, request, runs, wait_until

from workers_for_tests import EXTRA_DELAY_ENV, LOG_ENV, Echo, OriginalTestClient

TRANSPORTS = ["tcp", "ipc"]
WAIT = 20.0
"""Bound of every wait for something that should take milliseconds (the machine is shared)."""

ENDPOINTS_RE = re.compile(r"broker on requests=(\S+) workers=(\S+) answers=(\S+) .*core=(\w+)\)")


class RunningBroker(NamedTuple):
    proc: object
    requests: str
    workers: str
    answers: str


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "jobs.log"


def start_broker(
    procs: Processes, transport: str, core_name: str, *options: str, verbosity: str = "-v"
) -> RunningBroker:
    if transport == "ipc":
        addrs = [f"ipc://{procs.directory}/{name}" for name in ("req", "wrk", "ans")]
    else:
        addrs = ["tcp://127.0.0.1:*"] * 3
    proc = procs.start([verbosity, "broker", *options, *addrs], "broker")

    def endpoints():
        if proc.poll() is not None:
            pytest.fail(f"the broker exited with {proc.returncode}\n{procs.output()}")
        return ENDPOINTS_RE.search(proc.stderr_path.read_text(errors="replace"))

    match = wait_until(endpoints, timeout=WAIT, message="the broker's 'broker on' log line")
    assert match.group(4) == core_name, "the broker process runs another core than the one under test"
    return RunningBroker(proc, match.group(1), match.group(2), match.group(3))


def start_worker(procs: Processes, broker: RunningBroker, cls: str, log_path, name: str, **env: str):
    env = {LOG_ENV: str(log_path), **env}
    return procs.start(["worker", f"workers_for_tests:{cls}", broker.workers, broker.answers], name, env=env)


class PendingRequest:
    """A request sent from its own REQ socket; the answer is collected later."""

    def __init__(self, ctx: zmq.Context, address: str, frames: List[bytes]) -> None:
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.sock.send_multipart(frames)

    def answer(self, wait: float = WAIT) -> List[bytes]:
        try:
            if not self.sock.poll(int(wait * 1000)):
                pytest.fail(f"no answer within {wait} s")
            return self.sock.recv_multipart()
        finally:
            self.sock.close()


def warm_up(ctx, broker: RunningBroker, pids, log_path, procs: Processes, payload_format: str) -> None:
    """Send requests, one at a time, until each process in `pids` has run one
    (so all are connected). Bounded by WAIT seconds and 1000 requests."""
    sent = iter(range(1000))

    def all_served() -> bool:
        n = next(sent, None)
        if n is None:
            pytest.fail(f"not every worker ran a job in 1000 requests: {pids}\n{read_log(log_path)}\n{procs.output()}")
        payload = payload_format.format(n).encode()
        assert request(ctx, broker.requests, [payload], WAIT) == [b"-" + payload]
        return set(pids) <= {e.pid for e in read_log(log_path)}

    # Between two requests wait_until pauses 20 ms: a worker process may still be starting up.
    wait_until(
        all_served,
        timeout=WAIT,
        interval=0.02,
        message=lambda: f"every worker to run a job: {pids}\n{read_log(log_path)}\n{procs.output()}",
    )


def assert_alive(broker: RunningBroker, procs: Processes) -> None:
    assert broker.proc.poll() is None, f"the broker died\n{procs.output()}"


# -- dispatch on demand ------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_worker_gets_jobs_only_when_it_asks(transport, procs, ctx, log_path, core_name):
    slow_delay = 0.6
    broker = start_broker(procs, transport, core_name)
    slow = start_worker(procs, broker, "Slow", log_path, "slow", **{EXTRA_DELAY_ENV: str(slow_delay)})
    fast = start_worker(procs, broker, "Slow", log_path, "fast")

    # Ready: requests answered until both workers have run one (both are connected).
    warm_up(ctx, broker, {slow.pid, fast.pid}, log_path, procs, "0:warm-{}")

    # 4 clients keep a request each in flight: the queue is never empty for long, so
    # a broker pushing jobs to workers that did not ask would load the slow one.
    n_clients, per_client = 4, 6
    answers, errors = concurrent_requests(
        ctx,
        broker.requests,
        [[f"0.02:job-{c}-{i}".encode() for i in range(per_client)] for c in range(n_clients)],
        WAIT,
    )
    assert not errors, f"{errors}\n{procs.output()}"
    jobs = n_clients * per_client
    assert len(answers) == jobs
    assert all(answer == [b"-" + payload] for payload, answer in answers.items()), answers

    starts = [e for e in read_log(log_path) if e.event == "start" and e.payload.startswith("0.02:job-")]
    assert sorted(e.payload for e in starts) == sorted(p.decode() for p in answers), "each job runs exactly once"
    by_slow = [e for e in starts if e.pid == slow.pid]
    by_fast = [e for e in starts if e.pid == fast.pid]
    assert len(by_slow) + len(by_fast) == jobs
    # The slow worker asked, so it got a job; but each job it holds costs it 0.6 s
    # while the fast worker drains the queue in a fraction of that.
    assert 1 <= len(by_slow) <= jobs // 4, f"slow worker ran {len(by_slow)} of {jobs} jobs"
    assert len(by_fast) >= jobs - jobs // 4
    assert_alive(broker, procs)


# -- timeouts, tries, killed workers ------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timed_out_job_completes_on_another_worker(transport, procs, ctx, log_path, core_name):
    broker = start_broker(procs, transport, core_name, "-T", "0.3", "-t", "5")
    hung = start_worker(procs, broker, "Hang", log_path, "hang")
    pending = PendingRequest(ctx, broker.requests, [b"job-timeout"])
    wait_until(lambda: runs(log_path, "job-timeout"), timeout=WAIT, message="the hanging worker to take the job")
    assert runs(log_path, "job-timeout") == [hung.pid]

    echo = start_worker(procs, broker, "Echo", log_path, "echo")
    assert pending.answer() == [b"-job-timeout"]
    # (More than one attempt on the echo worker only if one answer took over 0.3 s.)
    first, *retries = runs(log_path, "job-timeout")
    assert first == hung.pid and retries and set(retries) == {echo.pid}
    assert hung.poll() is None, "the hanging worker is still busy with the first attempt"
    assert_alive(broker, procs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tries_exhausted_client_gets_one_empty_frame(transport, procs, ctx, log_path, core_name):
    broker = start_broker(procs, transport, core_name, "-T", "0.3", "-t", "2")
    dropper = start_worker(procs, broker, "Dropper", log_path, "dropper")
    assert request(ctx, broker.requests, [b"doomed"], WAIT) == [b""]
    # Two tries, both by the only worker (it asks again after each failure).
    assert runs(log_path, "doomed") == [dropper.pid, dropper.pid]

    # The broker goes on: the next request is tried again, twice, and aborted too.
    assert request(ctx, broker.requests, [b"doomed-2", b"second frame"], WAIT) == [b""]
    assert runs(log_path, "doomed-2second_frame") == [dropper.pid, dropper.pid]
    assert_alive(broker, procs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_job_of_sigkilled_worker_completes_on_another(transport, procs, ctx, log_path, core_name):
    broker = start_broker(procs, transport, core_name, "-T", "0.3", "-t", "3")
    victim = start_worker(procs, broker, "Slow", log_path, "victim")
    pending = PendingRequest(ctx, broker.requests, [b"30:job-kill"])
    wait_until(lambda: runs(log_path, "30:job-kill"), timeout=WAIT, message="the victim to take the job")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(WAIT) == -signal.SIGKILL

    echo = start_worker(procs, broker, "Echo", log_path, "echo")
    assert pending.answer() == [b"-30:job-kill"]
    first, *retries = runs(log_path, "30:job-kill")
    assert first == victim.pid and retries and set(retries) == {echo.pid}
    # And the broker serves on with the worker that is left.
    assert request(ctx, broker.requests, [b"after"], WAIT) == [b"-after"]
    assert_alive(broker, procs)


# -- malformed input -------------------------------------------------------------------


def _raw_garbage(address: str) -> None:
    """Bytes that are not ZMTP at all, straight to a tcp or ipc endpoint."""
    if address.startswith("tcp://"):
        host, port = address[len("tcp://") :].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(address[len("ipc://") :])
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_malformed_messages_on_every_endpoint_are_dropped(transport, procs, ctx, log_path, core_name):
    # -vv: the broker logs each message it drops, so the test knows they arrived.
    broker = start_broker(procs, transport, core_name, "-T", "0.3", "-t", "3", verbosity="-vv")
    start_worker(procs, broker, "Echo", log_path, "echo")
    assert request(ctx, broker.requests, [b"before"], WAIT) == [b"-before"]

    sockets = []

    def raw(kind: int, address: str) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(address)
        sockets.append(sock)
        return sock

    client = raw(zmq.DEALER, broker.requests)
    ready = raw(zmq.DEALER, broker.workers)
    two_frame_req = raw(zmq.REQ, broker.workers)
    answers = raw(zmq.PUSH, broker.answers)
    malformed = [
        (client, [b"no delimiter"], "request without an empty delimiter frame"),
        (client, [b""], "request without payload frames"),
        (client, [b""] + [b"x"] * 5000, "message with too many frames"),
        (ready, [b"ready without delimiter"], "worker ready message without an empty delimiter frame"),
        (ready, [b"", b"two", b"frames"], "worker ready message with other than one body frame"),
        (ready, [b""], "worker ready message with other than one body frame"),
        (two_frame_req, [b"requesting", b"task"], "worker ready message with other than one body frame"),
        (answers, [b"only one frame"], "answer with fewer than two frames"),
        (answers, [b"short id", b"answer"], "answer whose task id is malformed"),
        (answers, [b"\0" * 16, b"answer to nothing"], "answer for an unknown or already answered task"),
        (ready, [b"", b"FBW01", b"\x7f"], "worker message with an unknown command"),
        (ready, [b"", b"FBW01", b"\x01"], "worker command with the wrong frames"),
        (client, [b"FBC01", b"\x09", b"\0" * 16], "client message with an unknown command or the wrong frames"),
        (client, [b"FBC01", b"\x02", b"short id"], "client message whose request id is not 16 bytes"),
        (client, [b"FBC02", b"\x01", b"\0" * 27, b"p"], "client batch whose header does not match its frames"),
        (ready, [b"", b"FBW02", b"\x03", b"\0" * 19, b"a"], "worker batch whose header does not match its frames"),
    ]
    assert {reason for _, _, reason in malformed} == {r for r in DROP_REASONS if "memory" not in r}
    log_text = lambda: broker.proc.stderr_path.read_text(errors="replace")  # noqa: E731
    # One at a time: the test sees each one dropped (the broker logs it at debug level).
    for sock, frames, reason in malformed:
        seen = log_text().count(reason)
        sock.send_multipart(frames)
        wait_until(
            lambda: log_text().count(reason) > seen, timeout=WAIT, message=f"the broker to drop {frames[:3]}: {reason}"
        )
    assert_alive(broker, procs)

    # Sockets of the wrong type fail the ZMTP handshake; bytes that are not ZMTP at all.
    try:
        raw(zmq.PUSH, broker.requests).send(b"push to a router", zmq.NOBLOCK)
    except zmq.Again:
        pass
    raw(zmq.PULL, broker.workers)
    raw(zmq.ROUTER, broker.answers)
    for address in (broker.requests, broker.workers, broker.answers):
        _raw_garbage(address)

    # A worker that said it is ready and left: the broker sends around it.
    ghost = ctx.socket(zmq.DEALER)
    ghost.connect(broker.workers)
    ghost.send_multipart([b"", b"ready"])
    ghost.close(linger=2000)

    for sock in sockets:
        sock.close(0)
    for n in range(5):
        assert request(ctx, broker.requests, [f"after-{n}".encode()], WAIT) == [f"-after-{n}".encode()]
    # A two-frame request goes through whole.
    assert request(ctx, broker.requests, [b"multi", b"part"], WAIT) == [b"-multipart"]
    assert_alive(broker, procs)
    assert "Traceback" not in broker.proc.stderr_path.read_text(errors="replace")


# -- the original peers ----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_original_client_and_workers(transport, procs, ctx, log_path, core_name):
    broker = start_broker(procs, transport, core_name, "-T", "0.3", "-t", "10")
    env = {LOG_ENV: str(log_path)}
    # One original worker drops half its jobs (as testworker.py did at random), one none.
    dropping = procs.start(
        ["original-worker", broker.workers, broker.answers, "0.5", "2010"],
        "orig-drop",
        env=env,
        module="workers_for_tests",
    )
    reliable = procs.start(
        ["original-worker", broker.workers, broker.answers, "0", "1"], "orig-ok", env=env, module="workers_for_tests"
    )
    # Ready: requests answered until both workers have taken one. With seed 2010 the
    # dropping worker drops its first job: that one is re-sent after its timeout.
    warm_up(ctx, broker, {dropping.pid, reliable.pid}, log_path, procs, "{}")

    clients = [OriginalTestClient(ctx, broker.requests, n, count=10, wait=WAIT) for n in range(1, 4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(WAIT * c.count)
    for c in clients:
        assert c.error is None, f"{c.error}\n{procs.output()}"
        assert len(c.results) == c.count
        for sent, answer in c.results:
            assert answer == b"-" + sent
    events = read_log(log_path)
    assert {e.pid for e in events} == {dropping.pid, reliable.pid}, "both original workers served"
    dropped = [e.payload for e in events if e.event == "drop"]
    assert dropped and all(e.pid == dropping.pid for e in events if e.event == "drop")
    # Every dropped job was re-sent and answered (checked above), so it ran again.
    for payload in dropped:
        assert len(runs(log_path, payload)) >= 2
    assert_alive(broker, procs)


# -- many clients at once ----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_concurrent_clients_each_answered_once(transport, procs, ctx, log_path, core_name):
    broker = start_broker(procs, transport, core_name)
    workers = [start_worker(procs, broker, "Echo", log_path, f"echo-{n}") for n in range(2)]
    assert request(ctx, broker.requests, [b"ready?"], WAIT) == [b"-ready?"]

    n_threads, per_thread = 8, 25
    payloads = [[f"c{t}-{i}".encode() for i in range(per_thread)] for t in range(n_threads)]
    answers, errors = concurrent_requests(ctx, broker.requests, payloads, WAIT)
    assert not errors, f"{errors}\n{procs.output()}"
    assert answers == {p: [b"-" + p] for client in payloads for p in client}
    # No timeout is set, so each job ran exactly once, on one of the two workers.
    started = [e for e in read_log(log_path) if e.event == "start" and e.payload.startswith("c")]
    assert sorted(e.payload for e in started) == sorted(
        f"c{t}-{i}" for t in range(n_threads) for i in range(per_thread)
    )
    assert {e.pid for e in started} <= {w.pid for w in workers}
    assert_alive(broker, procs)


# -- in process, over inproc:// -------------------------------------------------------------


class _Upper(Worker):
    def process_multipart(self, frames):
        return [f.upper() for f in frames] + [b"%d" % len(frames)]


def test_inproc_broker_and_worker_threads_share_a_context(core_name):
    context = zmq.Context()
    name = uuid.uuid4().hex
    addrs = [f"inproc://{name}-{role}" for role in ("requests", "workers", "answers")]
    threads = []
    broker = Broker(context, 5.0, 3, *addrs)
    workers = [Echo(context, addrs[1], addrs[2]), _Upper(context, addrs[1], addrs[2])]
    try:
        assert broker.core_name == core_name
        assert broker.endpoints == tuple(addrs)
        threads.append(threading.Thread(target=broker.run, name="broker"))
        threads += [threading.Thread(target=w.run, name="worker") for w in workers]
        for t in threads:
            t.start()
        with ReqClient(addrs[0], context, timeout=WAIT) as client:
            seen = set()
            for n in range(40):
                answer = client.request_multipart([b"ab", b"c%d" % n])
                assert answer in ([b"-abc%d" % n], [b"AB", b"C%d" % n, b"2"])
                seen.add(len(answer))
        assert seen == {1, 3}, "both workers served"
    finally:
        for w in workers:
            w.stop()
        broker.stop()
        for t in threads:
            t.join(WAIT)
        stats = broker.stats()  # read once the loop has stopped
        for w in workers:
            w.close()
        broker.close()
        context.term()
    assert not any(t.is_alive() for t in threads)
    assert stats["requests"] == stats["answered"] == stats["dispatched"] == 40
    assert stats["dropped"] == stats["timeouts"] == 0


def test_debug_log_names_every_dropped_message(caplog):
    # Several drops handled in one loop turn are all logged (an earlier Broker.run
    # logged only the core's last_drop, the last reason of the turn).
    context = zmq.Context()
    name = uuid.uuid4().hex
    addrs = [f"inproc://{name}-{role}" for role in ("requests", "workers", "answers")]
    caplog.set_level(logging.DEBUG, logger="fastbroker.broker")
    broker = Broker(context, 5.0, 3, *addrs)
    push = context.socket(zmq.PUSH)
    push.connect(addrs[2])
    thread = threading.Thread(target=broker.run, name="broker")
    reasons = [
        "answer with fewer than two frames",
        "answer whose task id is malformed",
        "answer for an unknown or already answered task",
    ]
    logged = lambda: [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]  # noqa: E731
    try:
        # Three malformed answers are in the (inproc) pipe before the loop starts:
        # its first turn takes them all.
        push.send_multipart([b"only one frame"])
        push.send_multipart([b"short id", b"answer"])
        push.send_multipart([b"\0" * 16, b"answer to nothing"])
        thread.start()
        wait_until(logged, timeout=WAIT, message="a drop logged")
    finally:
        broker.stop()
        if thread.is_alive():
            thread.join(WAIT)
        push.close(0)
        stats = broker.stats()
        broker.close()
        context.term()
    assert stats["dropped"] == 3
    assert stats["drops"] == dict.fromkeys(reasons, 1)
    for reason in reasons:
        assert len([m for m in logged() if m.endswith(reason)]) == 1, logged()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_dead_dealer_workers_job_is_requeued_when_its_connection_closes(transport, procs, ctx, log_path, core_name):
    # Heartbeats of 10 s and liveness 3: by silence alone the broker would take the dead
    # worker for dead after 30 s, and no attempt timeout plays a part (-T 600). Its
    # connection closing (the process is SIGKILLed) must be enough: the broker's monitor
    # of the workers socket sees a disconnection, and a HEARTBEAT to every worker finds
    # the one whose connection is gone (ROUTER_MANDATORY).
    slow = ("--heartbeat", "10", "--liveness", "3")
    broker = start_broker(procs, transport, core_name, "-T", "600", *slow)
    env = {LOG_ENV: str(log_path)}
    victim = procs.start(["worker", "workers_for_tests:DealerSlow", broker.workers, *slow], "victim", env=env)
    pending = PendingRequest(ctx, broker.requests, [b"60:job-dies"])
    wait_until(lambda: runs(log_path, "60:job-dies"), timeout=WAIT, message="the victim to take the job")
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(WAIT) == -signal.SIGKILL
    echo = procs.start(["worker", "workers_for_tests:DealerEcho", broker.workers, *slow], "echo", env=env)
    # Well under the 30 s of silence: only the closed connection can have told it.
    assert pending.answer(wait=15.0) == [b"-60:job-dies"]
    assert time.monotonic() - killed_at < 30.0
    assert runs(log_path, "60:job-dies") == [victim.pid, echo.pid]
    assert_alive(broker, procs)
