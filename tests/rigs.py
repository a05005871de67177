"""The test suite's rigs, helpers and shared constants, in one module.

Test modules import what they need from here (``from rigs import ...``; tests/ is on
sys.path when pytest collects it, and the ``subprocess_env`` fixture puts it on
PYTHONPATH for child processes); no test module imports another. Fixtures live in
conftest.py, which builds them from these rigs. The Worker classes that the CLI runs
in test processes are in workers_for_tests.py.

Sections:

1. Waiting and processes: ``wait_until``, ``PYTHON``, ``run_cli``, ``Processes``,
   ``pid_alive``, ``descendants``, ``request``, ``concurrent_requests``.
2. The job log that workers_for_tests' jobs write: ``Event``, ``read_log``, ``runs``,
   ``count_events``.
3. The core driven in-process: ``EPOCH``, ``SLICE``, ``pump``, ``settle``, ``Rig``,
   ``assert_stats``, ``peer_gone``.
4. FBW01 workers played by the test: ``HEARTBEAT``, ``CALM_LIVENESS``, ``LONG_TIMEOUT``,
   ``FBWorker``, ``WRig``.
5. FBC01 clients played by the test: ``new_id``, ``opts``, ``NO_ACK``, ``reply``,
   ``status``, ``FBClient``, ``CRig``.
6. A real Broker in a thread with Worker threads: ``BrokerRig``.
7. The test plays the broker for a real Worker: ``FAKE_WAIT``, ``tid``, ``FakeBroker``.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import pytest
import zmq

from fastbroker import Broker, Client, Worker
from fastbroker.protocol import (
    C_SUBMIT,
    CLIENT_SIGNATURE as CSIG,
    CLIENT_SIGNATURE_V2 as CSIG2,
    CMD_ANSWER,
    CMD_DISCONNECT,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_TASK,
    DEFAULT_RETENTION,
    DEFAULT_RETENTION_BYTES,
    OPT_NO_ACK,
    R_FAILED,
    R_REPLIES,
    R_STATUS,
    WORKER_SIGNATURE as SIG,
    WORKER_SIGNATURE_V2 as SIG2,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench
from bench.proctree import descendants, kill_descendants  # noqa: F401  (descendants: re-exported to the tests)

TESTS_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable


# ---------------------------------------------------------------------------
# 1. Waiting and processes
# ---------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: Union[str, Callable[[], str]] = "condition",
):
    """Poll `predicate` until it is truthy and return its value; fail the test after
    `timeout` seconds, saying what it waited for (`message`, or what `message()` says
    then). `interval` is the pause between two looks: the pace of the poll."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message() if callable(message) else message}")
        time.sleep(interval)  # the pace of the poll; the deadline above bounds it


def run_cli(args, env, cwd, timeout=60.0) -> subprocess.CompletedProcess:
    """``python -m fastbroker ARGS`` to its end (bounded by `timeout`), output captured."""
    return subprocess.run(
        [PYTHON, "-m", "fastbroker", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Processes:
    """Starts ``python -m ...`` processes with output to files in `directory`,
    and kills every one of them (and their descendants) in ``kill_all``."""

    def __init__(self, directory: Path, env: Mapping[str, str]) -> None:
        self.directory = Path(directory)
        self.env = dict(env)
        self.procs: List[subprocess.Popen] = []
        self.names: Dict[int, str] = {}
        self._count = 0

    def start(
        self, args: Sequence[str], name: str, env: Optional[Mapping[str, str]] = None, module: str = "fastbroker"
    ) -> subprocess.Popen:
        self._count += 1
        stem = self.directory / f"{self._count:02d}-{name}"
        full_env = dict(self.env)
        full_env.update(env or {})
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            proc = subprocess.Popen(
                [PYTHON, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                cwd=str(self.directory),
                start_new_session=True,
            )
        proc.stdout_path = Path(f"{stem}.out")  # type: ignore[attr-defined]
        proc.stderr_path = Path(f"{stem}.err")  # type: ignore[attr-defined]
        self.procs.append(proc)
        self.names[proc.pid] = name
        return proc

    def output(self) -> str:
        """Every process's stdout and stderr, for failure messages."""
        parts = []
        for proc in self.procs:
            for path in (proc.stdout_path, proc.stderr_path):  # type: ignore[attr-defined]
                text = path.read_text(errors="replace") if path.exists() else ""
                if text.strip():
                    parts.append(f"--- {path.name} (rc={proc.poll()}) ---\n{text[-3000:]}")
        return "\n".join(parts)

    def kill_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                kill_descendants(proc.pid)  # pool children left the process group (setpgrp)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def concurrent_requests(context: zmq.Context, address: str, payloads: Sequence[Sequence[bytes]], wait: float = 20.0):
    """One REQ client thread per list in `payloads`, each sending its payloads one at
    a time. Returns ({payload: answer frames}, [errors]); every wait is bounded."""
    answers: Dict[bytes, List[bytes]] = {}
    errors: List[str] = []

    def client(c: int) -> None:
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        try:
            for payload in payloads[c]:
                sock.send(payload)
                if not sock.poll(int(wait * 1000)):
                    errors.append(f"no answer to {payload!r}")
                    return
                answers[payload] = sock.recv_multipart()
        except Exception as exc:
            errors.append(f"client {c}: {exc!r}")
        finally:
            sock.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(wait * (len(payloads[0]) if payloads else 1) + wait)
    if any(t.is_alive() for t in threads):
        errors.append("a client thread did not finish in time")
    return answers, errors


def request(context: zmq.Context, address: str, frames: Sequence[bytes], wait: float = 20.0) -> List[bytes]:
    """One request from a fresh REQ socket; the answer frames. TimeoutError after `wait` s."""
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(list(frames))
        if not sock.poll(int(wait * 1000)):
            raise TimeoutError(f"no answer from {address} within {wait} s")
        return sock.recv_multipart()
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# 2. The job log (written by workers_for_tests.log_event, in any process)
# ---------------------------------------------------------------------------


class Event(NamedTuple):
    pid: int
    event: str
    time: float
    payload: str


def read_log(path: Path) -> List[Event]:
    """The events logged so far (an absent file: none)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        pid, event, t, payload = line.split(" ", 3)
        events.append(Event(int(pid), event, float(t), payload))
    return events


def runs(path: Path, payload: str, event: str = "start") -> List[int]:
    """Pids of the processes that logged `event` for `payload`, in order."""
    return [e.pid for e in read_log(path) if e.payload == payload and e.event == event]


def count_events(log: Path, event: str, payload: str) -> int:
    """How many times `event` was logged for `payload`."""
    return sum(1 for e in read_log(log) if e.event == event and e.payload == payload)


# ---------------------------------------------------------------------------
# 3. The core driven in-process (test_core_loop.py and the protocol tests)
# ---------------------------------------------------------------------------

EPOCH = b"LOOPTEST"
"""The epoch of every in-process rig's core: its task ids start with it."""
SLICE = 0.01
"""max_wait of one run() call in pump."""


def pump(core, until, timeout: float = 10.0, max_wait: float = SLICE):
    """Run the core in slices of `max_wait` until `until()` is truthy; return its value.
    Fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / max(max_wait, 0.001)) * 4 + 10):
        core.run(-1, max_wait)
        value = until()
        if value:
            return value
        if time.monotonic() > deadline:
            break
    pytest.fail(f"pump: condition not met within {timeout} s; stats={core.stats()}")


def settle(core, turns: int = 5, max_wait: float = 0.02) -> None:
    """Give the core a few turns, for checks that something does NOT happen."""
    for _ in range(turns):
        core.run(-1, max_wait)


class Rig:
    """A BrokerCore of the live core module on three bound inproc sockets of `ctx`
    (requests and workers ROUTERs with ROUTER_MANDATORY, answers PULL), run by the
    test thread in short slices (``pump``); plus factories for test-side peers, all
    closed by ``close()``. Everything happens in the test thread, so the order of
    events is the order the test writes them."""

    def __init__(self, core_module, ctx: zmq.Context, timeout=None, tries=None, **core_options):
        self.ctx = ctx
        tag = uuid.uuid4().hex
        self.addr = {k: f"inproc://loop-{k}-{tag}" for k in ("requests", "workers", "answers")}
        self.peers: list = []
        self.requests = self._sock(zmq.ROUTER)
        self.requests.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers = self._sock(zmq.ROUTER)
        self.workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.answers = self._sock(zmq.PULL)
        self.requests.bind(self.addr["requests"])
        self.workers.bind(self.addr["workers"])
        self.answers.bind(self.addr["answers"])
        # core_options: the BrokerCore keywords a subclass's tests set (heartbeat, retention...).
        self.core = core_module.BrokerCore(
            self.requests, self.workers, self.answers, timeout, tries, epoch=EPOCH, **core_options
        )
        self._pusher = None

    def _sock(self, kind, identity=None):
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        self.peers.append(sock)
        return sock

    def peer(self, endpoint: str, kind=zmq.REQ, identity=None):
        sock = self._sock(kind, identity)
        sock.connect(self.addr[endpoint])
        return sock

    def client(self, kind=zmq.REQ, identity=None):
        return self.peer("requests", kind, identity)

    def worker(self, kind=zmq.REQ, identity=None):
        return self.peer("workers", kind, identity)

    @property
    def pusher(self):
        if self._pusher is None:
            self._pusher = self.peer("answers", zmq.PUSH)
        return self._pusher

    def answer(self, task_id: bytes, *frames: bytes) -> None:
        self.pusher.send_multipart([task_id, *frames])

    def stats(self) -> dict:
        return self.core.stats()

    def pump(self, until, timeout: float = 10.0, max_wait: float = SLICE):
        return pump(self.core, until, timeout, max_wait)

    def pump_stat(self, name: str, value: int, timeout: float = 10.0) -> None:
        self.pump(lambda: self.stats()[name] >= value, timeout)
        assert self.stats()[name] == value, (name, self.stats())

    def ready(self, worker, expect_ready: int) -> None:
        """A REQ/DEALER worker asks for a job; wait until the core counted it."""
        if worker.type == zmq.DEALER:
            worker.send_multipart([b"", b"ready"])
        else:
            worker.send(b"ready")
        self.pump_stat("ready", expect_ready)

    def receive(self, sock, timeout: float = 10.0) -> list:
        """Pump until `sock` has a message and return its frames (as bytes)."""
        self.pump(lambda: sock.poll(0), timeout)
        return sock.recv_multipart(zmq.NOBLOCK)

    def close(self) -> None:
        self.core.close()
        for sock in self.peers:
            sock.close(0)
        for sock in (self.requests, self.workers, self.answers):
            sock.close(0)


def assert_stats(stats: dict, **expected) -> None:
    got = {k: stats[k] for k in expected}
    assert got == expected, stats


def peer_gone(rig: Rig, identity: bytes, endpoint: str = "workers"):
    """A predicate: True once the workers (or requests) ROUTER knows the peer `identity`
    is disconnected (both have ROUTER_MANDATORY)."""
    router = rig.workers if endpoint == "workers" else rig.requests

    def check() -> bool:
        try:
            router.send_multipart([identity, b"", b"probe"], zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            return exc.errno == zmq.EHOSTUNREACH
        return False

    return check


# ---------------------------------------------------------------------------
# 4. FBW01 workers played by the test (raw DEALER sockets)
# ---------------------------------------------------------------------------

HEARTBEAT = 0.1
"""Broker heartbeat interval of a WRig/CRig, where a test needs heartbeats or deaths."""
CALM_LIVENESS = 30
"""Where no worker is meant to die: 3 s of silence allowed."""
LONG_TIMEOUT = 60.0
"""A job timeout that must play no part in the test."""
DISCONNECT_MSG = [b"", SIG, CMD_DISCONNECT]


def credit_frame(credit: int) -> bytes:
    return credit.to_bytes(4, "big")


def waiting(sock: zmq.Socket, limit: int):
    """The messages waiting on a test peer's socket (none once it is closed), at most
    `limit`: what each peer's collect() reads in one go."""
    if sock.closed:
        return
    for _ in range(limit):
        if not sock.poll(0):
            return
        yield sock.recv_multipart(zmq.NOBLOCK)


class FBWorker:
    """A DEALER worker whose every frame the test writes: [b"", b"FBW01", command,
    body...]. ``collect()`` (called on every pump of its rig) reads what the broker
    sent: HEARTBEATs are counted apart, everything else is kept in ``inbox`` in order.
    A "live" worker, once registered, sends HEARTBEAT every heartbeat/5 seconds so
    that only the workers a test makes silent can ever be taken for dead."""

    def __init__(self, rig: WRig, sock: zmq.Socket, live: bool, protocol: int = 1):
        self.rig = rig
        self.sock = sock
        self.live = live
        self.sig = SIG2 if protocol == 2 else SIG  # FBW02 frames are the test's too
        self.registered = False  # the test believes the broker knows it
        self.inbox: list = []  # messages from the broker other than HEARTBEAT, in order
        self.heartbeat_times: list = []  # when each broker HEARTBEAT was read
        self._last_sent = 0.0

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))
        self._last_sent = time.monotonic()

    def command(self, cmd: bytes, *body: bytes) -> None:
        self.send(b"", self.sig, cmd, *body)

    def ready(self, credit: int) -> None:
        self.command(CMD_READY, credit_frame(credit))
        self.registered = True

    def answer(self, task_id: bytes, *frames: bytes) -> None:
        self.command(CMD_ANSWER, task_id, *frames)

    def failed(self, task_id: bytes, kind: bytes = b"ValueError", message: bytes = b"boom") -> None:
        self.command(CMD_FAILED, task_id, kind, message)

    def heartbeat(self) -> None:
        self.command(CMD_HEARTBEAT)

    def disconnect(self) -> None:
        self.command(CMD_DISCONNECT)
        self.registered = False

    def close(self) -> None:
        self.sock.close(0)
        self.live = self.registered = False

    def collect(self) -> None:
        """Read what the broker sent; a live registered worker also heartbeats."""
        for frames in waiting(self.sock, 10_000):
            assert frames[:2] == [b"", self.sig] and len(frames) >= 3 and len(frames[2]) == 1, frames
            if frames[2] == CMD_HEARTBEAT:
                assert frames == [b"", self.sig, CMD_HEARTBEAT], frames
                self.heartbeat_times.append(time.monotonic())
                continue
            if frames[2] == CMD_DISCONNECT:
                assert frames == [b"", self.sig, CMD_DISCONNECT], frames
                self.registered = False
            self.inbox.append(frames)
        if self.live and self.registered and time.monotonic() - self._last_sent >= self.rig.heartbeat / 5:
            self.heartbeat()

    def tasks(self) -> list:
        return [m for m in self.inbox if m[2] == CMD_TASK]


class WRig(Rig):
    """Rig whose core has the test's heartbeat and liveness (short heartbeats by
    default), plus FBW01 workers (``dealer()``) whose inboxes every pump fills."""

    def __init__(
        self, core_module, ctx, timeout=None, tries=None, heartbeat=HEARTBEAT, liveness=CALM_LIVENESS, **core_options
    ):
        super().__init__(core_module, ctx, timeout, tries, heartbeat=heartbeat, liveness=liveness, **core_options)
        self.heartbeat = heartbeat
        self.fbw: list = []

    def dealer(self, identity=None, live=True, protocol: int = 1) -> FBWorker:
        worker = FBWorker(self, self.worker(zmq.DEALER, identity), live, protocol)
        self.fbw.append(worker)
        return worker

    def service(self) -> None:
        for worker in self.fbw:
            worker.collect()

    def pump(self, until, timeout: float = 10.0, max_wait: float = SLICE):
        def check():
            self.service()
            return until()

        return pump(self.core, check, timeout, max_wait)

    def settle(self, turns: int = 5, max_wait: float = 0.02) -> None:
        """A few turns of the core, for checks that something does NOT happen."""
        for _ in range(turns):
            self.core.run(-1, max_wait)
            self.service()

    def pump_for(self, seconds: float) -> None:
        """Run the core (and the workers) for `seconds` of wall time."""
        end = time.monotonic() + seconds
        for _ in range(int(seconds / SLICE) * 4 + 10):
            if time.monotonic() >= end:
                return
            self.core.run(-1, SLICE)
            self.service()

    def register(self, worker: FBWorker, credit: int) -> None:
        joined = self.stats()["workers_joined"]
        worker.ready(credit)
        self.pump_stat("workers_joined", joined + 1)

    def next_message(self, worker: FBWorker, timeout: float = 10.0) -> list:
        self.pump(lambda: worker.inbox, timeout)
        return worker.inbox.pop(0)

    def task(self, worker: FBWorker, timeout: float = 10.0):
        """The next message `worker` gets, which must be a TASK: (task_id, payload frames)."""
        message = self.next_message(worker, timeout)
        assert message[:3] == [b"", SIG, CMD_TASK], message
        task_id, payload = message[3], message[4:]
        assert len(task_id) == 16 and task_id[:8] == EPOCH, message
        return task_id, payload

    def tasks_in(self, worker: FBWorker, n: int) -> list:
        """Wait until `worker` holds n messages, all TASKs; take them: [(task_id, payload)]."""
        self.pump(lambda: len(worker.inbox) >= n)
        return [self.task(worker) for _ in range(n)]


# ---------------------------------------------------------------------------
# 5. FBC01 clients played by the test (raw DEALER sockets)
# ---------------------------------------------------------------------------


def new_id() -> bytes:
    return uuid.uuid4().bytes


def opts(flags: int = 0, timeout_ms: int = 0, tries: int = 0) -> bytes:
    """A 9-byte options frame: flags, timeout (ms, BE), tries (BE)."""
    return struct.pack(">BII", flags, timeout_ms, tries)


NO_ACK = opts(OPT_NO_ACK)


def reply(code: bytes, rid: bytes, *body: bytes) -> list:
    """A broker reply as the client's DEALER receives it."""
    return [CSIG, code, rid, *body]


def status(rid: bytes, state: int, attempt: int, tries: int) -> list:
    return reply(R_STATUS, rid, bytes([state]), attempt.to_bytes(4, "big"), tries.to_bytes(4, "big"))


class FBClient:
    """A DEALER client whose every frame the test writes: [b"FBC01", command, id,
    body...] with no empty delimiter. ``collect()`` keeps the replies in ``inbox``."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.inbox: list = []  # replies from the broker, in order

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def command(self, cmd: bytes, rid: bytes, *body: bytes) -> None:
        self.send(CSIG, cmd, rid, *body)

    def submit(self, rid: bytes, *payload: bytes, options: bytes = b"") -> None:
        self.command(C_SUBMIT, rid, options, *payload)

    def close(self) -> None:
        self.sock.close(0)

    def collect(self) -> None:
        for frames in waiting(self.sock, 100_000):
            # Every reply: signature, a one-byte reply code, the 16-byte request id.
            assert len(frames) >= 3 and frames[0] == CSIG, frames
            assert len(frames[1]) == 1 and len(frames[2]) == 16, frames
            self.inbox.append(frames)


def submit_record(rid: bytes, nframes: int, flags: int = 0, timeout_ms: int = 0, tries: int = 0) -> bytes:
    """One FBC02 SUBMIT header record (docs/PROTOCOL.md section 12)."""
    return rid + struct.pack(">BIIH", flags, timeout_ms, tries, nframes)


class FBClient2(FBClient):
    """An FBClient that also speaks FBC02: ``submit(jobs)`` sends one FBC02 SUBMIT of
    [(id, [payload frames], flags, timeout_ms, tries)...]; ``collect()`` keeps each
    REPLIES message's records in ``records`` as (id, code, body frames), in order, and
    counts the messages in ``messages``; FBC01 replies (to STATUS, RESULT...) go to
    ``inbox`` whole."""

    def __init__(self, sock: zmq.Socket):
        super().__init__(sock)
        self.records: list = []
        self.messages = 0

    def submit(self, *jobs) -> None:  # type: ignore[override]
        header = b"".join(submit_record(job[0], len(job[1]), *job[2:]) for job in jobs)
        self.send(CSIG2, C_SUBMIT, header, *(f for job in jobs for f in job[1]))

    def collect(self) -> None:
        for frames in waiting(self.sock, 100_000):
            if frames[0] == CSIG:
                self.inbox.append(frames)
                continue
            assert frames[:2] == [CSIG2, R_REPLIES] and len(frames) >= 3, frames
            header, body = frames[2], frames[3:]
            assert header and len(header) % 19 == 0, frames
            for at in range(0, len(header), 19):
                rid, code, nbody = header[at : at + 16], header[at + 16 : at + 17], header[at + 17 : at + 19]
                n = int.from_bytes(nbody, "big")
                self.records.append((rid, code, body[:n]))
                body = body[n:]
            assert body == [], "frames beyond the header's records"
            self.messages += 1


class CRig(WRig):
    """WRig (FBW01 workers, short heartbeats) whose core also has the retention
    settings and queue bound of the test, plus FBC01 clients (``fbclient()``)."""

    def __init__(
        self,
        core_module,
        ctx,
        timeout=None,
        tries=None,
        heartbeat=HEARTBEAT,
        liveness=CALM_LIVENESS,
        retention=DEFAULT_RETENTION,
        retention_bytes=DEFAULT_RETENTION_BYTES,
        max_queue=None,
    ):
        super().__init__(
            core_module,
            ctx,
            timeout,
            tries,
            heartbeat=heartbeat,
            liveness=liveness,
            retention=retention,
            retention_bytes=retention_bytes,
            max_queue=max_queue,
        )
        self.fbc: list = []

    def fbclient(self, identity=None) -> FBClient:
        client = FBClient(self.client(zmq.DEALER, identity))
        self.fbc.append(client)
        return client

    def fbclient2(self, identity=None) -> FBClient2:
        client = FBClient2(self.client(zmq.DEALER, identity))
        self.fbc.append(client)
        return client

    def records(self, client: FBClient2, n: int, timeout: float = 10.0) -> list:
        """Wait until `client` holds n FBC02 reply records; take them."""
        self.pump(lambda: len(client.records) >= n, timeout)
        taken, client.records[:] = client.records[:n], client.records[n:]
        return taken

    def service(self) -> None:
        super().service()
        for client in self.fbc:
            client.collect()

    def reply(self, client: FBClient, timeout: float = 10.0) -> list:
        """The next reply `client` gets."""
        self.pump(lambda: client.inbox, timeout)
        return client.inbox.pop(0)

    def ask(self, client: FBClient, cmd: bytes, rid: bytes) -> list:
        """Send STATUS/RESULT/CANCEL for `rid` and return the reply to it."""
        assert client.inbox == [], client.inbox  # so the next reply is the answer to this
        client.command(cmd, rid)
        return self.reply(client)

    def quiet(self, *peers) -> None:
        """A few turns, then: none of `peers` (clients or FBW01 workers) got anything."""
        self.settle()
        for peer in peers:
            assert peer.inbox == [], peer.inbox


# ---------------------------------------------------------------------------
# 6. A real Broker in a thread, Worker threads (test_client.py, test_store.py)
# ---------------------------------------------------------------------------


class BrokerRig:
    """A Broker run in a thread on fixed ipc endpoints in `tmp_path` (so it can be
    restarted on the same ones), DEALER Workers run in threads, and Clients; all
    stopped and closed by ``close()`` (workers before the broker)."""

    WAIT = 20.0
    """Bound of the joins of the broker's and the workers' threads."""
    HEARTBEAT = 0.1
    """The broker's and the workers' heartbeat interval."""

    def __init__(self, tmp_path: Path, transport: str = "ipc", **broker_options) -> None:
        # tcp: ports chosen at the first start, kept for a restart (start_broker).
        if transport == "tcp":
            self.addrs: Tuple[str, ...] = ("tcp://127.0.0.1:*",) * 3
        else:
            self.addrs = tuple(f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans"))
        self.broker_options = {"heartbeat": self.HEARTBEAT, **broker_options}
        self.broker: Optional[Broker] = None
        self._broker_thread: Optional[threading.Thread] = None
        self.workers: list = []
        self.clients: list = []

    @property
    def address(self) -> str:
        return self.addrs[0]

    def start_broker(self, timeout=None, tries=None) -> Broker:
        self.broker = Broker(None, timeout, tries, *self.addrs, **self.broker_options)
        self.addrs = self.broker.endpoints
        self._broker_thread = threading.Thread(target=self.broker.run, name="broker")
        self._broker_thread.start()
        return self.broker

    def stop_broker(self) -> dict:
        """Stop and close the broker (its requests are lost); its last stats."""
        stats: dict = {}
        if self.broker is not None:
            self.broker.stop()
            self._broker_thread.join(self.WAIT)
            stats = self.broker.stats()  # read once the loop has stopped
            self.broker.close()
            self.broker = None
        return stats

    def worker(self, cls, credit: int = 1) -> Worker:
        worker = cls(None, self.addrs[1], credit=credit, heartbeat=self.HEARTBEAT)
        thread = threading.Thread(target=worker.run, name=f"worker-{cls.__name__}")
        thread.start()
        self.workers.append((worker, thread))
        return worker

    def client(self, **options) -> Client:
        client = Client(self.address, **options)
        self.clients.append(client)
        return client

    def stop_workers(self) -> None:
        """Before the broker: a worker hangs up gracefully only while it is there."""
        for worker, _ in self.workers:
            worker.stop()
        for worker, thread in self.workers:
            thread.join(self.WAIT)
            worker.close()
        self.workers.clear()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.stop_workers()
        self.stop_broker()


# ---------------------------------------------------------------------------
# 7. The test plays the broker for a real Worker (raw ROUTER on tcp 127.0.0.1)
# ---------------------------------------------------------------------------

FAKE_WAIT = 10.0
"""Bound of every wait, in the FakeBroker tests, for something that should take well
under a second."""


def split_answers(body: List[bytes]) -> List[List[bytes]]:
    """An FBW02 ANSWER's body [header, frames...] as FBW01 ANSWER and FAILED messages
    ([command, task id, frames...]); fails the test if the header does not match."""
    header, frames = body[0], body[1:]
    assert header and len(header) % 19 == 0, body
    out, at = [], 0
    for start in range(0, len(header), 19):
        count = int.from_bytes(header[start + 17 : start + 19], "big")
        command = CMD_FAILED if header[start + 16 : start + 17] == R_FAILED else CMD_ANSWER
        out.append([command, header[start : start + 16], *frames[at : at + count]])
        at += count
    assert at == len(frames), body
    return out


def tid(n: int) -> bytes:
    """A 16-byte task id for the FakeBroker tests."""
    return b"CANCELTEST" + n.to_bytes(6, "big")


class FakeBroker:
    """A ROUTER bound on tcp 127.0.0.1 that speaks FBW01 or FBW02 (``protocol``, that of
    the worker) to one worker: ``send`` a command to it, ``recv`` its next message other
    than HEARTBEAT (failing the test if none comes in time, or if it shows up with
    another identity: a new socket, or another protocol). Both show messages in FBW01's
    shape: an FBW02 TASK is sent as a batch of one, and each outcome of an FBW02 ANSWER
    is returned as an FBW01 ANSWER or FAILED (``batches`` keeps the records' counts)."""

    def __init__(self, ctx: zmq.Context, protocol: int = 2) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.signature = SIG2 if protocol == 2 else SIG
        self.identity: Optional[bytes] = None
        self.got: List[List[bytes]] = []  # [command, body...] of every non-heartbeat message
        self.pending: List[List[bytes]] = []  # outcomes of an FBW02 ANSWER not yet returned
        self.batches: List[int] = []  # records in each FBW02 ANSWER received

    def send(self, command: bytes, *body: bytes) -> None:
        assert self.identity is not None
        if command == CMD_TASK and self.signature == SIG2:
            body = (*body[1:], body[0] + len(body[1:]).to_bytes(2, "big"))
        self.sock.send_multipart([self.identity, b"", self.signature, command, *body])

    def recv(self, timeout: float = FAKE_WAIT) -> List[bytes]:
        """The next message from the worker other than a HEARTBEAT, as [command, body...]."""
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                break
            frames = self.sock.recv_multipart()
            identity, rest = frames[0], frames[1:]
            assert rest[:2] == [b"", self.signature], frames
            if self.identity is None:
                self.identity = identity
            assert identity == self.identity, "the worker reconnected on a new socket"
            if rest[2] == CMD_HEARTBEAT:
                continue
            if rest[2] == CMD_ANSWER and self.signature == SIG2:
                self.pending = split_answers(rest[3:])
                self.batches.append(len(self.pending))
                self.got.extend(self.pending)
                return self.pending.pop(0)
            self.got.append(rest[2:])
            return rest[2:]
        pytest.fail(f"no message from the worker within {timeout} s; got so far: {self.got}")

    def expect_ready(self, credit: int) -> None:
        assert self.recv() == [CMD_READY, credit.to_bytes(4, "big")]
