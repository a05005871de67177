"""CURVE authentication and encryption (fastbroker.security): a broker that lets in
only the public keys in its authorized-keys directory serves authorized clients and
workers of every kind; unauthorized and plain (no CURVE) peers never connect, so they
enqueue nothing and are given no job. Plus ``fastbroker keygen`` and the CURVE options
of the CLI, run as real processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fastbroker import AsyncClient, Broker, Client, ConfigError, ReqClient, ReqWorker, Worker, security
from fastbroker.protocol import C_STATS, C_SUBMIT, CLIENT_SIGNATURE, R_STATS, decode_stats
from rigs import PYTHON, runs, wait_until

from workers_for_tests import LOG_ENV

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""
HEARTBEAT = 0.1


# -- keys and a CURVE broker in a thread -----------------------------------------------------


class Keys:
    """Key pairs written by create_key_pair: the broker's, two authorized peers' (client,
    worker) and an intruder's, whose public key is not in the authorized directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.authorized = root / "authorized"
        self.authorized.mkdir(parents=True)
        self.broker_public, self.broker_secret = security.create_key_pair(root / "broker", "broker")
        self.secret: Dict[str, str] = {}
        for name in ("client", "worker", "intruder"):
            public, self.secret[name] = security.create_key_pair(root / "peers", name)
            if name != "intruder":
                shutil.copy(public, self.authorized)

    def peer(self, name: str) -> dict:
        """Keyword arguments making a worker or client a CURVE client with `name`'s keys."""
        return {"curve_server_key": self.broker_public, "curve_secret": self.secret[name]}

    def curve(self, name: str) -> security.CurveKeys:
        keys = security.client_keys(self.broker_public, self.secret[name])
        assert keys is not None
        return keys


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def broker(keys):
    """A CURVE broker on tcp 127.0.0.1, run in a thread."""
    b = Broker(
        None,
        None,
        None,
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        heartbeat=HEARTBEAT,
        curve_secret=keys.broker_secret,
        authorized_keys=keys.authorized,
    )
    thread = threading.Thread(target=b.run, name="broker")
    thread.start()
    yield b
    b.stop()
    thread.join(WAIT)
    b.close()


class _Recording:
    """Answers b"-" + data and remembers every payload it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: List[bytes] = []

    def process(self, data: bytes) -> bytes:
        self.seen.append(data)
        return b"-" + data


class RecordingWorker(_Recording, Worker):
    pass


class RecordingReqWorker(_Recording, ReqWorker):
    pass


class WaitingToSendReqWorker(RecordingReqWorker):
    """Sets `waiting_to_send` once run() is in its wait for the REQ socket to take
    "ready": ReqWorker reads poll_interval there only after a send that could not go."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting_to_send = threading.Event()

    @property
    def poll_interval(self) -> float:
        self.waiting_to_send.set()
        return ReqWorker.poll_interval


def broker_stats(ctx: zmq.Context, address: str, curve: Optional[security.CurveKeys]) -> dict:
    """The broker's figures, asked over FBC01 STATS (the broker runs in another thread)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.apply_curve(sock, curve)
    sock.connect(address)
    try:
        rid = uuid.uuid4().bytes
        sock.send_multipart([CLIENT_SIGNATURE, C_STATS, rid])
        assert sock.poll(int(WAIT * 1000)), "no STATS reply"
        frames = sock.recv_multipart()
        assert frames[:3] == [CLIENT_SIGNATURE, R_STATS, rid], frames[:3]
        return decode_stats(frames[3], frames[4])
    finally:
        sock.close()


HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
}


def wait_for_handshake_failure(monitor: zmq.Socket, what: str) -> int:
    """The first handshake event on `monitor`: must be a failure. Returns its event."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if not monitor.poll(100):
            continue
        event = recv_monitor_message(monitor)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, f"{what}: the broker accepted the handshake"
        if event in HANDSHAKE_FAILED:
            return event
    pytest.fail(f"{what}: no handshake failure within {WAIT} s")


# -- authorized peers are served --------------------------------------------------------------


def test_authorized_dealer_worker_serves_client_and_async_client(broker, keys, threads):
    assert broker.curve
    worker = threads(RecordingWorker(None, broker.endpoints[1], heartbeat=HEARTBEAT, **keys.peer("worker")))
    with Client(broker.endpoints[0], **keys.peer("client")) as client:
        assert client.call(b"hello", wait=WAIT) == b"-hello"
        assert client.status(uuid.uuid4().bytes, wait=WAIT).state == "unknown"

    async def main() -> bytes:
        async with AsyncClient(broker.endpoints[0], **keys.peer("client")) as aclient:
            return await aclient.call(b"async", wait=WAIT)

    assert asyncio.run(main()) == b"-async"
    assert worker.seen == [b"hello", b"async"]


def test_authorized_req_worker_and_req_client_use_curve_on_all_three_endpoints(broker, keys, threads):
    # A REQ worker asks on the workers endpoint and answers on the answers endpoint.
    worker = threads(RecordingReqWorker(None, broker.endpoints[1], broker.endpoints[2], **keys.peer("worker")))
    with ReqClient(broker.endpoints[0], timeout=WAIT, **keys.peer("client")) as client:
        assert client.request(b"req") == b"-req"
    assert worker.seen == [b"req"]
    # (`fastbroker worker` gives a ReqWorker its keys through configure(): see the CLI test.)


# -- unauthorized and plain peers never connect ------------------------------------------------


def test_unauthorized_and_plain_clients_never_connect(broker, keys, threads, ctx):
    threads(RecordingWorker(None, broker.endpoints[1], heartbeat=HEARTBEAT, **keys.peer("worker")))
    address = broker.endpoints[0]
    # Raw sockets, watched: each handshake fails (intruder: ZAP says no; plain: no CURVE).
    expected = {"intruder": zmq.EVENT_HANDSHAKE_FAILED_AUTH, "plain": None}
    for name, curve in (("intruder", keys.curve("intruder")), ("plain", None)):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.apply_curve(sock, curve)
        monitor = sock.get_monitor_socket()
        sock.connect(address)
        sock.send_multipart([CLIENT_SIGNATURE, C_SUBMIT, uuid.uuid4().bytes, b"", name.encode()])
        event = wait_for_handshake_failure(monitor, name)
        if expected[name] is not None:
            assert event == expected[name]
        assert not sock.poll(0)
    # fastbroker's own clients with a wrong key or none: their requests stay pending.
    intruders = [Client(address, **keys.peer("intruder")), Client(address)]
    pending = [c.submit(b"intruder-%d" % i) for i, c in enumerate(intruders)]
    req = ReqClient(address, timeout=0.5, **keys.peer("intruder"))
    try:
        with pytest.raises(TimeoutError):
            req.request(b"req-intruder")
        # An authorized client is served meanwhile; it is the broker's only request.
        with Client(address, **keys.peer("client")) as client:
            assert client.call(b"welcome", wait=WAIT) == b"-welcome"
        figures = broker_stats(ctx, address, keys.curve("client"))
        assert figures["requests"] == 1, figures
        assert not any(f.done() for f in pending)
    finally:
        req.close()
        for client in intruders:
            client.close()


def test_unauthorized_and_plain_workers_get_no_task(broker, keys, threads, ctx):
    address = broker.endpoints[0]
    curve = keys.curve("client")
    intruder = threads(RecordingWorker(None, broker.endpoints[1], heartbeat=HEARTBEAT, **keys.peer("intruder")))
    plain = threads(RecordingWorker(None, broker.endpoints[1], heartbeat=HEARTBEAT))
    plain_req = threads(RecordingReqWorker(None, broker.endpoints[1], broker.endpoints[2]))
    # A DEALER worker that never hears the broker reconnects after liveness x heartbeat.
    for worker in (intruder, plain):
        wait_until(lambda: worker.stats.connects >= 2, timeout=WAIT, message="the worker to try again")
    with Client(address, **keys.peer("client")) as client:
        future = client.submit(b"job")
        wait_until(
            lambda: broker_stats(ctx, address, curve)["queued"] == 1, timeout=WAIT, message="the job to be queued"
        )
        # Both try again while the job waits, and still get nothing.
        tries = {id(w): w.stats.connects for w in (intruder, plain)}
        for worker in (intruder, plain):
            wait_until(lambda: worker.stats.connects > tries[id(worker)], timeout=WAIT, message="another attempt")
        figures = broker_stats(ctx, address, curve)
        # No registration (workers, workers_joined) and no REQ "ready" (idle_workers).
        assert (
            figures["queued"],
            figures["workers"],
            figures["workers_joined"],
            figures["idle_workers"],
            figures["dispatched"],
        ) == (1, 0, 0, 0, 0), figures
        assert not future.done()
        authorized = threads(RecordingWorker(None, broker.endpoints[1], heartbeat=HEARTBEAT, **keys.peer("worker")))
        assert future.result(WAIT) == b"-job"
    assert authorized.seen == [b"job"]
    assert intruder.seen == plain.seen == plain_req.seen == []
    assert intruder.stats.received == plain.stats.received == 0
    figures = broker_stats(ctx, address, curve)
    assert (figures["workers"], figures["workers_joined"], figures["dispatched"]) == (1, 1, 1), figures


def test_req_worker_left_without_a_connection_still_stops(broker):
    """A REQ socket with no connection blocks a send. libzmq can drop one for good (a
    handshake refused at a CURVE broker was seen to leave a plain ReqWorker stuck in
    its send of "ready" for ever, so that stop() could not end run()); disconnect()
    makes the same state on purpose. run() must still return on stop()."""
    worker = WaitingToSendReqWorker(None, broker.endpoints[1], broker.endpoints[2])
    worker.requests.disconnect(broker.endpoints[1])
    thread = threading.Thread(target=worker.run, name="unconnected-req-worker", daemon=True)
    thread.start()
    assert worker.waiting_to_send.wait(WAIT), 'run() never tried to send "ready"'
    worker.stop()
    thread.join(WAIT)
    assert not thread.is_alive(), "run() did not return after stop()"
    worker.close()
    assert worker.seen == []


# -- configuration errors -------------------------------------------------------------------


def _broker(**options) -> Broker:
    return Broker(None, None, None, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", **options)


def test_bad_key_files_are_config_errors_naming_the_file(keys, tmp_path):
    missing = str(tmp_path / "nowhere.key_secret")
    garbage = tmp_path / "garbage.key"
    garbage.write_text('curve\n    public-key = "not a key"\n')
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    shutil.copy(garbage, bad_dir)
    cases = [
        (lambda: _broker(curve_secret=missing, authorized_keys=keys.authorized), "nowhere.key_secret"),
        (
            lambda: _broker(curve_secret=keys.broker_public, authorized_keys=keys.authorized),
            "no secret key in the key file",
        ),
        (lambda: _broker(curve_secret=keys.broker_secret, authorized_keys=tmp_path / "no-dir"), "no-dir"),
        (lambda: _broker(curve_secret=keys.broker_secret, authorized_keys=empty_dir), "no public key files"),
        (lambda: _broker(curve_secret=keys.broker_secret, authorized_keys=bad_dir), "garbage.key"),
        (lambda: _broker(curve_secret=keys.broker_secret), "both or neither"),
        (lambda: Client("tcp://127.0.0.1:1", curve_server_key=keys.broker_public), "both or neither"),
        (
            lambda: Client("tcp://127.0.0.1:1", curve_server_key=garbage, curve_secret=keys.secret["client"]),
            "not a CURVE key",
        ),
        (
            lambda: ReqClient("tcp://127.0.0.1:1", curve_server_key=keys.broker_public, curve_secret=missing),
            "nowhere.key_secret",
        ),
        (
            lambda: Worker(None, "tcp://127.0.0.1:1", curve_server_key=missing, curve_secret=keys.secret["worker"]),
            "nowhere.key_secret",
        ),
        (
            lambda: ReqWorker(None, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", curve_secret=keys.secret["worker"]),
            "both or neither",
        ),
        (
            lambda: AsyncClient(
                "tcp://127.0.0.1:1", curve_server_key=keys.broker_public, curve_secret=keys.broker_public
            ),
            "no secret key",
        ),
    ]
    for make, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            make()


def test_curve_keys_repr_hides_the_secret(keys):
    curve = keys.curve("client")
    assert curve.secret.decode() not in repr(curve) and curve.public.decode() in repr(curve)


# -- the CLI ----------------------------------------------------------------------------------


def run_cli(args, env, cwd, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "fastbroker", *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_keygen_writes_a_key_pair_and_refuses_to_overwrite(tmp_path, subprocess_env):
    result = run_cli(["keygen", "alice", "--dir", "keys"], subprocess_env, tmp_path)
    assert result.returncode == 0, result
    public, secret = tmp_path / "keys" / "alice.key", tmp_path / "keys" / "alice.key_secret"
    assert result.stdout.splitlines() == [os.path.join("keys", "alice.key"), os.path.join("keys", "alice.key_secret")]
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = security.load_secret_key(secret)
    assert security.load_public_key(public) == pair[0]
    before = (public.read_bytes(), secret.read_bytes())
    result = run_cli(["keygen", "alice", "--dir", "keys"], subprocess_env, tmp_path)
    assert_one_line_error(result, "alice.key", "already exists")
    assert (public.read_bytes(), secret.read_bytes()) == before
    # Either file existing is enough to refuse, and nothing is written then.
    (tmp_path / "bob.key_secret").write_text("mine")
    result = run_cli(["keygen", "bob"], subprocess_env, tmp_path)
    assert_one_line_error(result, "bob.key_secret", "already exists")
    assert not (tmp_path / "bob.key").exists() and (tmp_path / "bob.key_secret").read_text() == "mine"
    assert_one_line_error(run_cli(["keygen", "a/b"], subprocess_env, tmp_path), "not a key name")


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


def test_cli_key_errors_exit_2_with_one_line_naming_the_file(keys, tmp_path, subprocess_env, addrs):
    missing = tmp_path / "missing.key_secret"
    cases = [
        (["broker", "--curve-secret", missing, "--authorized-keys", keys.authorized, *addrs], ["missing.key_secret"]),
        (["broker", "--curve-secret", keys.broker_secret, "--authorized-keys", tmp_path / "nodir", *addrs], ["nodir"]),
        (
            ["broker", "--curve-secret", keys.broker_secret, *addrs],
            ["--curve-secret and --authorized-keys", "both or neither"],
        ),
        (
            [
                "worker",
                "workers_for_tests:DealerEcho",
                addrs[1],
                "--curve-server-key",
                keys.broker_public,
                "--curve-secret",
                missing,
            ],
            ["missing.key_secret"],
        ),
        (
            ["worker", "workers_for_tests:Echo", addrs[1], addrs[2], "--curve-secret", keys.secret["worker"]],
            ["both or neither"],
        ),
        (
            ["submit", addrs[0], "x", "--curve-server-key", missing, "--curve-secret", keys.secret["client"]],
            ["missing.key_secret"],
        ),
        (["status", addrs[0], uuid.uuid4().hex, "--curve-server-key", keys.broker_public], ["both or neither"]),
    ]
    for args, expected in cases:
        assert_one_line_error(run_cli(args, subprocess_env, tmp_path), *expected)


def test_cli_broker_workers_and_submit_over_curve(keys, procs, addrs, core_name, tmp_path, subprocess_env):
    log_path = tmp_path / "jobs.log"
    procs.start(
        [
            "broker",
            "--core",
            core_name,
            "--heartbeat",
            "0.2",
            "--curve-secret",
            keys.broker_secret,
            "--authorized-keys",
            keys.authorized,
            *addrs,
        ],
        "broker",
    )
    worker_keys = ["--curve-server-key", keys.broker_public, "--curve-secret", keys.secret["worker"]]
    client_keys = ["--curve-server-key", keys.broker_public, "--curve-secret", keys.secret["client"]]
    # A ReqWorker (REQ + PUSH) first, then a DEALER Worker: one at a time, so each is seen serving.
    req_worker = procs.start(
        ["worker", "workers_for_tests:Echo", addrs[1], addrs[2], *map(str, worker_keys)],
        "echo",
        env={LOG_ENV: str(log_path)},
    )
    result = run_cli(["submit", addrs[0], "one", "--wait", WAIT, *client_keys], subprocess_env, tmp_path)
    assert (result.returncode, result.stdout) == (0, "-one"), (result, procs.output())
    assert runs(log_path, "one") == [req_worker.pid]
    req_worker.terminate()
    assert req_worker.wait(WAIT) == 0, procs.output()
    dealer = procs.start(
        ["worker", "workers_for_tests:DealerEcho", addrs[1], "--heartbeat", "0.2", *map(str, worker_keys)],
        "dealer",
        env={LOG_ENV: str(log_path)},
    )
    result = run_cli(["submit", "-v", addrs[0], "two", "--wait", WAIT, *client_keys], subprocess_env, tmp_path)
    assert (result.returncode, result.stdout) == (0, "-two"), (result, procs.output())
    assert runs(log_path, "two") == [dealer.pid]
    request_id = result.stderr.split("request id ")[1].split()[0]
    status = run_cli(["status", addrs[0], request_id, *client_keys], subprocess_env, tmp_path)
    assert (status.returncode, status.stdout) == (0, "done (after 1 attempt)\n"), status
    # Without keys, or with keys the broker does not know: no answer at all.
    plain = run_cli(["submit", addrs[0], "three", "--wait", "0.5"], subprocess_env, tmp_path)
    assert plain.returncode == 6, plain
    intruder = run_cli(
        [
            "status",
            addrs[0],
            request_id,
            "--wait",
            "0.5",
            "--curve-server-key",
            keys.broker_public,
            "--curve-secret",
            keys.secret["intruder"],
        ],
        subprocess_env,
        tmp_path,
    )
    assert intruder.returncode == 6, intruder
    assert runs(log_path, "three") == []
