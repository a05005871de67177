"""Fixtures for the core benchmarks (``pytest bench --benchmark-only``).

Unlike tests/, the benchmarks import BOTH cores explicitly and run every benchmark
on each ("compiled" / "pure"), so one run gives comparable figures; FASTBROKER_PURE
plays no part here. tests/conftest.py is not loaded by ``pytest bench`` (a conftest
only applies below its own directory), and nothing here depends on it.

Sizes can be changed with environment variables (defaults in brackets):
FASTBROKER_BENCH_N [10000] messages per socket benchmark round,
FASTBROKER_BENCH_K [10000] operations per data-structure benchmark round,
FASTBROKER_BENCH_ROUNDS [5] measured rounds per socket benchmark (plus 1 warm-up).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional

import pytest
import zmq

from fastbroker import _core_py

try:
    from fastbroker import _core
except ImportError as exc:  # reported by the "compiled" parameter, not at collection
    _core = None
    _CORE_IMPORT_ERROR: Optional[ImportError] = exc
else:
    _CORE_IMPORT_ERROR = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {number}")
    return number


@dataclass(frozen=True)
class Sizes:
    n: int  # messages per socket benchmark round
    k: int  # operations per data-structure benchmark round
    socket_rounds: int
    struct_rounds: int
    warmup_rounds: int


SIZES = Sizes(
    n=_env_int("FASTBROKER_BENCH_N", 10_000),
    k=_env_int("FASTBROKER_BENCH_K", 10_000),
    socket_rounds=_env_int("FASTBROKER_BENCH_ROUNDS", 5),
    struct_rounds=20,
    warmup_rounds=1,
)

WAIT_LIMIT = 60.0
"""Seconds a bounded wait for the core (or a clock) may take before the benchmark fails."""

RECV_LIMIT = 10.0
"""Seconds a peer socket may wait for a message the core should already have sent."""

PAYLOAD = b"payload"
ANSWER = b"ok"
READY = b"ready"


def pytest_report_header(config):
    compiled = _core.__file__ if _core is not None else f"NOT AVAILABLE ({_CORE_IMPORT_ERROR})"
    return [
        f"fastbroker bench cores: compiled={compiled} pure={_core_py.__file__}",
        f"fastbroker bench sizes: N={SIZES.n} K={SIZES.k} socket rounds={SIZES.socket_rounds}",
    ]


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SIZES


@pytest.fixture(scope="session", params=["compiled", "pure"])
def core(request) -> ModuleType:
    """Each benchmark runs once per core; the parameter is named "core"
    (``--benchmark-group-by=param:core``)."""
    if request.param == "compiled":
        if _core is None:
            pytest.fail(f"the compiled core fastbroker._core did not import: {_CORE_IMPORT_ERROR}")
        return _core
    return _core_py


def _configure(sock: zmq.Socket) -> None:
    # Unlimited queues: N messages must fit in the inproc pipes without blocking or
    # being dropped, and nothing may linger when a round is torn down.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


class Rig:
    """A core on three bound inproc sockets of its own context, plus the peer
    sockets (client, workers, answer pusher) a benchmark connects to it.

    Every wait is bounded by WAIT_LIMIT; close() releases the core, every socket
    and the context, and may be called more than once.
    """

    PAYLOAD = PAYLOAD
    ANSWER = ANSWER
    READY = READY
    REQUESTS = "inproc://bench-requests"
    WORKERS = "inproc://bench-workers"
    ANSWERS = "inproc://bench-answers"

    def __init__(self, core: ModuleType, *, timeout=None, tries=None, max_sockets: int = 1024) -> None:
        self.core_module = core
        self.ctx = zmq.Context()
        # libzmq's default (1023) is too few for SIZES.n worker sockets.
        self.ctx.set(zmq.MAX_SOCKETS, max_sockets + 16)
        self.sockets: List[zmq.Socket] = []
        self.core = None
        self.closed = False
        try:
            self.requests = self._socket(zmq.ROUTER)
            self.requests.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.workers = self._socket(zmq.ROUTER)
            self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self.answers = self._socket(zmq.PULL)
            self.requests.bind(self.REQUESTS)
            self.workers.bind(self.WORKERS)
            self.answers.bind(self.ANSWERS)
            self.core = core.BrokerCore(self.requests, self.workers, self.answers, timeout, tries)
        except BaseException:
            self.close()
            raise

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        _configure(sock)
        return sock

    # -- peers ----------------------------------------------------------------

    def client(self) -> zmq.Socket:
        """A DEALER client on the requests endpoint (it sends the empty delimiter itself)."""
        sock = self._socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"client")
        sock.connect(self.REQUESTS)
        return sock

    def send_requests(self, client: zmq.Socket, n: int) -> None:
        send = client.send_multipart
        for _ in range(n):
            send([b"", PAYLOAD], zmq.DONTWAIT)  # never blocks: the queues are unlimited

    def add_workers(self, n: int, *, ready: bool = True) -> List[zmq.Socket]:
        """n DEALER workers with distinct routing ids, each (if `ready`) having sent one ready."""
        workers = []
        for i in range(n):
            sock = self._socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"worker-%06d" % i)
            sock.connect(self.WORKERS)
            if ready:
                sock.send_multipart([b"", READY], zmq.DONTWAIT)
            workers.append(sock)
        return workers

    def add_hop_workers(self, n: int, sockets: int = 16) -> List[zmq.Socket]:
        """n distinct idle workers behind a few DEALER sockets (distinct routing ids):
        each socket sends [hop, b"", b"ready"] for several hop frames, so the core sees
        n two-frame addresses [routing id, hop], as for workers behind a proxy. Much
        cheaper to set up than n sockets; worker j gets its job as [hop, b"", ...] on
        socket j % sockets."""
        workers = self.add_workers(min(n, sockets), ready=False)
        for j in range(n):
            workers[j % len(workers)].send_multipart([b"hop-%06d" % j, b"", READY], zmq.DONTWAIT)
        return workers

    def pusher(self) -> zmq.Socket:
        """A PUSH socket on the answers endpoint."""
        sock = self._socket(zmq.PUSH)
        sock.connect(self.ANSWERS)
        return sock

    # -- bounded waits --------------------------------------------------------

    def run_until(self, key: str, target: int, limit: float = WAIT_LIMIT) -> dict:
        """Call core.run(-1, 0) until stats()[key] >= target; the stats at that point."""
        run = self.core.run
        stats = self.core.stats
        deadline = time.monotonic() + limit
        while True:
            run(-1, 0)
            s = stats()
            if s[key] >= target:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"core did not reach {key}={target} within {limit} s: {s}")

    @staticmethod
    def recv(sock: zmq.Socket, limit: float = RECV_LIMIT) -> list:
        """One message from sock, waiting at most `limit` seconds."""
        try:
            return sock.recv_multipart(zmq.DONTWAIT)
        except zmq.Again:
            if not sock.poll(int(limit * 1000), zmq.POLLIN):
                raise AssertionError(f"no message within {limit} s") from None
            return sock.recv_multipart(zmq.DONTWAIT)

    def recv_exactly(self, sock: zmq.Socket, n: int) -> list:
        """n messages from sock, then check that no further one is waiting."""
        messages = [self.recv(sock) for _ in range(n)]
        assert not sock.poll(0, zmq.POLLIN), "more messages than expected"
        return messages

    def sleep_past(self, t: float, limit: float = WAIT_LIMIT) -> None:
        """Sleep until the core's clock (core.monotonic) is past t."""
        clock = self.core_module.monotonic
        deadline = time.monotonic() + limit
        while clock() <= t:
            if time.monotonic() > deadline:
                raise AssertionError(f"the core's clock did not pass {t} within {limit} s")
            time.sleep(min(0.05, max(0.0005, t - clock())))

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.core is not None:
            self.core.close()
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
        self.ctx.term()


@pytest.fixture
def rigs():
    """Factory of Rigs; every rig it made is closed when the benchmark ends, even
    if a round failed or pedantic's teardown did not run (--benchmark-disable)."""
    made: List[Rig] = []

    def make(core: ModuleType, **kwargs) -> Rig:
        rig = Rig(core, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture(scope="session")
def expire_timeouts() -> dict:
    """Per-core attempt timeout for the expire benchmarks, doubled when the set-up
    turns out slower than it (see test_expire_*); kept for the whole session."""
    return {}
