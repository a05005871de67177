"""The path a Python user runs, in pytest-benchmark: ``Client.map`` in this process, a
broker process (``python -m fastbroker broker --core compiled``) and a worker process
running a ``fastbroker.Worker`` subclass (``python -m fastbroker worker
bench.test_user_path:Echo --credit 64``), over ipc; beside the reference the issues
measure it against, a bare pyzmq echo in the same run: a DEALER in this process with
256 messages in flight and a ROUTER echo loop in a process of its own, one message per
job, Python both ends; and the same echo with one message in flight, the floor of the
``--credit 1`` rows (a round trip per job).

    pytest bench/test_user_path.py --benchmark-only --benchmark-group-by=group

Each benchmark sends N jobs of 16 bytes (FASTBROKER_USER_N [20000]) per round
(FASTBROKER_BENCH_ROUNDS [5]); extra_info has jobs/s, the ratio to the bare echo's rate
of the same run (issue 14's target for the user path: >= 1.5x with FBC02), and the CPU
per job of each process over every round (warm-up included): this one (the client,
every thread), the broker and the worker (or the echo server).
Rows: ``fbc02-fbw02`` is what a user gets by default (client and worker batch);
``fbc02-fbw01`` and ``fbc01-fbw01`` the same client and worker with ``protocol=1``;
``fbc02-fbw02-credit1`` the default protocols with ``--credit 1`` (one job at a time in the
worker: the round trip per job); ``fbc02-fbw02-pure`` the default with the broker's pure
core; the ``-prefetch`` rows give the worker ``--prefetch 64`` (jobs queued in it beyond the
64 running); the ``-pure-session`` rows run the worker's pure-Python session
(FASTBROKER_PURE=1 in the worker process only) instead of its compiled one (issue 15). The
broker and worker processes are started again for each row that needs another core,
worker protocol, credit or session.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
import zmq

from fastbroker import Client, Worker

from bench import e2e
from bench.conftest import SIZES, WAIT_LIMIT, _env_int

USER_N = _env_int("FASTBROKER_USER_N", 20_000)
PAYLOADS = [b"%016d" % i for i in range(USER_N)]
ECHO_WINDOW = 256
CREDIT = 64
CALLS = min(USER_N, 2000)  # one-at-a-time rows: jobs per round
_rates: Dict[str, float] = {}


class Echo(Worker):
    """The user's worker: answers the payload it is given."""

    def process(self, data: bytes) -> bytes:
        return data


def echo_server(address: str, parent: int) -> None:
    """The bare reference's server: a ROUTER that sends every message back as it came."""
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    print("bound", flush=True)
    recv, send, poll = sock.recv_multipart, sock.send_multipart, sock.poll
    end = time.monotonic() + e2e.CHILD_LIFETIME
    while time.monotonic() < end and os.getppid() == parent:
        if poll(200):
            for _ in range(1000):
                try:
                    send(recv(zmq.NOBLOCK))
                except zmq.Again:
                    break


def bare_echo(sock: zmq.Socket) -> List[bytes]:
    """USER_N messages through the echo server, ECHO_WINDOW in flight: the answers in order."""
    answers: List[bytes] = []
    sent = 0
    send, recv = sock.send, sock.recv
    while sent < min(ECHO_WINDOW, USER_N):
        send(PAYLOADS[sent])
        sent += 1
    while len(answers) < USER_N:
        if not sock.poll(int(WAIT_LIMIT * 1000)):
            raise RuntimeError("the echo server stopped answering")
        answers.append(recv())
        if sent < USER_N:
            send(PAYLOADS[sent])
            sent += 1
    return answers


class Served:
    """The processes of the user path: the echo server (started once), and one broker
    and one worker process, started again whenever a benchmark asks for another core,
    worker protocol or credit (the others are stopped first: one of each serves)."""

    def __init__(self, run: e2e.Run) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        self.run = run
        self.address, self.work, self.answers, self.echo = (
            f"ipc://{run.dir}/{name}" for name in ("req", "wrk", "ans", "echo")
        )
        server = run.start(["-m", "bench.test_user_path", "_echo", self.echo, str(os.getpid())], "echo")
        if e2e.Lines(server, "echo").read(deadline) != "bound":
            raise RuntimeError("the echo server did not bind")
        self.pids = {"echo server": server.pid}
        self.broker: Optional[subprocess.Popen] = None
        self.worker: Optional[subprocess.Popen] = None
        self.setup: Tuple[str, int, int, str, int] = ("", 0, 0, "", 0)

    def use(self, core: str, protocol: int, credit: int, session: str = "compiled", prefetch: int = 0) -> None:
        """A broker of `core` and one worker process speaking `protocol` with `credit` and
        `prefetch`, on its `session` ("compiled" or "pure")."""
        if self.setup == (core, protocol, credit, session, prefetch):
            return
        for proc in (self.worker, self.broker):
            if proc is not None:
                proc.terminate()
                proc.wait(WAIT_LIMIT)
        deadline = time.monotonic() + WAIT_LIMIT
        argv = ["-m", "fastbroker", "-v", "broker", "--core", core, self.address, self.work, self.answers]
        self.broker = self.run.start(argv, f"broker-{core}")
        self.run.wait_for_broker(self.broker, "user-path", core, deadline)
        argv = ["-m", "fastbroker", "worker", "bench.test_user_path:Echo", self.work]
        self.worker = self.run.start(
            [*argv, "--credit", str(credit), "--prefetch", str(prefetch), "--protocol", str(protocol)],
            f"worker-fbw0{protocol}-{credit}-{prefetch}-{session}",
            env={"FASTBROKER_PURE": "1" if session == "pure" else ""},
        )
        self.pids.update(broker=self.broker.pid, worker=self.worker.pid)
        self.setup = (core, protocol, credit, session, prefetch)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with e2e.temporary_run(argparse.Namespace(transport="ipc"), prefix="fb-user-") as run:
        yield Served(run)


class CpuMeter:
    """CPU seconds of this process (every thread) and of the named child processes,
    between start() and per_job(n): microseconds per job by process."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.start()

    def start(self) -> None:
        self.t0 = time.process_time()
        self.c0 = {name: e2e.cpu_seconds(pid) for name, pid in self.pids.items()}

    def per_job(self, jobs: int) -> Dict[str, float]:
        figures = {"client": time.process_time() - self.t0}
        figures.update({name: e2e.cpu_seconds(pid) - self.c0[name] for name, pid in self.pids.items()})
        return {name: round(seconds / jobs * 1e6, 1) for name, seconds in figures.items()}


def _record(benchmark, name: str, walls: List[float], cpu: Dict[str, float]) -> None:
    rate = USER_N / sorted(walls)[len(walls) // 2]
    _rates[name] = rate
    benchmark.extra_info.update(jobs=USER_N, jobs_per_s=round(rate), cpu_us_per_job=cpu)
    if name != "bare-echo" and "bare-echo" in _rates:
        benchmark.extra_info["ratio_to_bare_echo"] = round(rate / _rates["bare-echo"], 3)
    if "credit1" in name and "bare-one-in-flight" in _rates:
        # A credit-1 row against its floor: one round trip per job, nothing else.
        benchmark.extra_info["ratio_to_one_in_flight"] = round(rate / _rates["bare-one-in-flight"], 3)


def _echo_socket(served: Served) -> zmq.Socket:
    """A DEALER of this process connected to the echo server."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.echo)
    return sock


def _echo_rounds(benchmark, served: Served, sock: zmq.Socket, one_round, jobs: int) -> Dict[str, float]:
    """Run the rounds against the echo server (then close `sock`): CPU µs per job."""
    meter = CpuMeter({"echo server": served.pids["echo server"]})
    try:
        benchmark.pedantic(one_round, rounds=SIZES.socket_rounds, iterations=1, warmup_rounds=1)
        return meter.per_job(jobs * (SIZES.socket_rounds + 1))
    finally:
        sock.close()


def _percentiles(latencies: List[int]) -> Dict[str, float]:
    """p50 and p99 in µs of round trips in ns."""
    latencies.sort()
    return {
        "p50_us": round(latencies[len(latencies) // 2] / 1e3, 1),
        "p99_us": round(latencies[len(latencies) * 99 // 100] / 1e3, 1),
    }


def test_bare_pyzmq_echo(benchmark, served: Served) -> None:
    benchmark.group = "user-path"
    sock = _echo_socket(served)
    walls: List[float] = []

    def one_round() -> None:
        start = time.perf_counter()
        answers = bare_echo(sock)
        walls.append(time.perf_counter() - start)
        assert answers == PAYLOADS

    cpu = _echo_rounds(benchmark, served, sock, one_round, USER_N)
    _record(benchmark, "bare-echo", walls, cpu)


def test_bare_pyzmq_one_in_flight(benchmark, served: Served) -> None:
    """The floor of any one-job-at-a-time path (``--credit 1``, one ``call()`` at a time):
    the bare echo with one message in flight, a round trip between two Python
    processes through libzmq and nothing else. A credit-1 worker needs at least one such
    round trip per job (broker to worker and back), its client's traffic besides."""
    benchmark.group = "user-path"
    sock = _echo_socket(served)
    walls: List[float] = []
    latencies: List[int] = []
    payloads = PAYLOADS[:CALLS]

    def one_round() -> None:
        start = time.perf_counter()
        for payload in payloads:
            sent = time.perf_counter_ns()
            sock.send(payload)
            if not sock.poll(int(WAIT_LIMIT * 1000)):
                raise RuntimeError("the echo server stopped answering")
            assert sock.recv() == payload
            latencies.append(time.perf_counter_ns() - sent)
        walls.append(time.perf_counter() - start)

    cpu = _echo_rounds(benchmark, served, sock, one_round, CALLS)
    rate = CALLS / sorted(walls)[len(walls) // 2]
    _rates["bare-one-in-flight"] = rate
    benchmark.extra_info.update(jobs=CALLS, jobs_per_s=round(rate), cpu_us_per_job=cpu, **_percentiles(latencies))


# (name, broker core, client protocol, worker protocol, worker credit, worker session, prefetch)
ROWS = [
    ("fbc02-fbw02", "compiled", 2, 2, CREDIT, "compiled", 0),
    ("fbc02-fbw02-pure-session", "compiled", 2, 2, CREDIT, "pure", 0),
    ("fbc02-fbw02-prefetch", "compiled", 2, 2, CREDIT, "compiled", CREDIT),
    ("fbc02-fbw02-prefetch-pure-session", "compiled", 2, 2, CREDIT, "pure", CREDIT),
    ("fbc02-fbw01", "compiled", 2, 1, CREDIT, "compiled", 0),
    ("fbc01-fbw01", "compiled", 1, 1, CREDIT, "compiled", 0),
    ("fbc02-fbw02-credit1", "compiled", 2, 2, 1, "compiled", 0),
    ("fbc02-fbw02-credit1-pure-session", "compiled", 2, 2, 1, "pure", 0),
    ("fbc02-fbw02-pure", "pure", 2, 2, CREDIT, "compiled", 0),
]


@pytest.mark.parametrize(
    "name, core, protocol, worker_protocol, credit, session, prefetch", ROWS, ids=[row[0] for row in ROWS]
)
def test_client_map_worker_subclass(
    benchmark,
    served: Served,
    name: str,
    core: str,
    protocol: int,
    worker_protocol: int,
    credit: int,
    session: str,
    prefetch: int,
) -> None:
    benchmark.group = "user-path"
    walls: List[float] = []
    served.use(core, worker_protocol, credit, session, prefetch)
    with Client(served.address, protocol=protocol) as client:
        assert client.call(b"warm", wait=WAIT_LIMIT) == b"warm"

        def one_round() -> None:
            start = time.perf_counter()
            answers = list(client.map(PAYLOADS))
            walls.append(time.perf_counter() - start)
            assert answers == PAYLOADS

        meter = CpuMeter({"broker": served.pids["broker"], "worker": served.pids["worker"]})
        benchmark.pedantic(one_round, rounds=SIZES.socket_rounds, iterations=1, warmup_rounds=1)
        cpu = meter.per_job(USER_N * (SIZES.socket_rounds + 1))
        assert client.stats()["protocol"] == protocol
    _record(benchmark, name, walls, cpu)


@pytest.mark.parametrize("session", ["compiled", "pure"])
def test_one_call_at_a_time(benchmark, served: Served, session: str) -> None:
    """The single-job round trip (issue 15: not slower on the compiled session): one
    ``call()`` at a time, CALLS per round, through a ``--credit 1`` worker on either
    session; extra_info has the p50 and p99 of every call's round trip."""
    benchmark.group = "user-path-call"
    served.use("compiled", 2, 1, session)
    latencies: List[int] = []
    with Client(served.address) as client:
        assert client.call(b"warm", wait=WAIT_LIMIT) == b"warm"

        def one_round() -> None:
            for payload in PAYLOADS[:CALLS]:
                start = time.perf_counter_ns()
                answer = client.call(payload, wait=WAIT_LIMIT)
                latencies.append(time.perf_counter_ns() - start)
                assert answer == payload

        benchmark.pedantic(one_round, rounds=SIZES.socket_rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(calls=CALLS, **_percentiles(latencies))


if __name__ == "__main__" and sys.argv[1:2] == ["_echo"]:
    echo_server(sys.argv[2], int(sys.argv[3]))
