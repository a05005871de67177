"""Several brokers (issue 17): the endpoints of shards (fastbroker.addresses), and
`fastbroker broker --shards N`, N broker processes under one supervisor (real
processes, real SIGKILL and SIGTERM, tcp on 127.0.0.2 and ipc in a temp dir)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import zmq

from fastbroker import ConfigError
from fastbroker.addresses import shard_address, shard_path, split_addresses
from fastbroker.server.metrics import request_stats
from rigs import descendants, pid_alive, read_log, run_cli, wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""

HOST = "127.0.0.2"
"""The shards' host in the tcp tests: a loopback address of its own."""


# -- the rules ---------------------------------------------------------------------------


def test_lists_of_brokers():
    assert split_addresses("tcp://a:1") == ["tcp://a:1"]
    assert split_addresses("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    assert split_addresses(["tcp://a:1", "ipc:///x"]) == ["tcp://a:1", "ipc:///x"]
    for bad, why in (("", "empty"), ("tcp://a:1,", "empty"), ([], "no broker"), ("tcp://a:1,tcp://a:1", "twice")):
        with pytest.raises(ConfigError, match=why):
            split_addresses(bad)


def test_shard_endpoints_and_store_files():
    assert [shard_address("tcp://*:5555", k) for k in range(3)] == ["tcp://*:5555", "tcp://*:5556", "tcp://*:5557"]
    assert shard_address("tcp://[::1]:7000", 2) == "tcp://[::1]:7002"
    assert [shard_address("ipc:///run/fb/req", k) for k in range(3)] == [
        "ipc:///run/fb/req",
        "ipc:///run/fb/req.1",
        "ipc:///run/fb/req.2",
    ]
    assert [shard_path("b.db", k) for k in range(3)] == ["b.db", "b.db.1", "b.db.2"]
    for bad in ("tcp://*:*", "inproc://x"):
        with pytest.raises(ConfigError, match="fixed tcp port"):
            shard_address(bad, 1)
    with pytest.raises(ConfigError, match="above 65535"):
        shard_address("tcp://*:65535", 1)


# -- fastbroker broker --shards N -----------------------------------------------------------


def free_base_port(host: str, count: int, spacing: int) -> int:
    """A port p such that p + spacing * i + k (i < 3, k < count) are all free on `host` now."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((host, 0))
        base = probe.getsockname()[1]
        probe.close()
        if base + 2 * spacing + count > 65000:
            continue
        held = []
        try:
            for i in range(3):
                for k in range(count):
                    s = socket.socket()
                    held.append(s)
                    s.bind((host, base + spacing * i + k))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    pytest.fail("no free range of ports")


def stats_of(ctx: zmq.Context, address: str, wait: float = WAIT):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        return request_stats(sock, wait)
    finally:
        sock.close()


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def test_broker_shards_run_restart_and_stop_together(procs, ctx, tmp_path):
    base = free_base_port(HOST, 2, 10)
    addrs = [f"tcp://{HOST}:{base + 10 * i}" for i in range(3)]
    store = tmp_path / "broker.db"
    sup = procs.start(["-v", "broker", "--shards", "2", "--store", str(store), *addrs], "shards")
    requests = [f"tcp://{HOST}:{base}", f"tcp://{HOST}:{base + 1}"]
    for address in requests:
        assert stats_of(ctx, address) is not None, procs.output()
    children = descendants(sup.pid)
    assert len(children) == 2, procs.output()
    assert store.exists() and (tmp_path / "broker.db.1").exists()
    first_line = sup.stderr_path.read_text().splitlines()[0]
    assert first_line == (
        f"fastbroker: 2 shards; requests {requests[0]},{requests[1]}; workers "
        f"tcp://{HOST}:{base + 10},tcp://{HOST}:{base + 11}"
    )
    # A shard killed from outside is restarted at once, on its endpoints and store.
    os.kill(children[1], signal.SIGKILL)
    wait_until(
        lambda: children[1] not in descendants(sup.pid) and len(descendants(sup.pid)) == 2,
        timeout=WAIT,
        message=f"the killed shard to be replaced\n{procs.output()}",
    )
    assert stats_of(ctx, requests[1]) is not None, procs.output()
    assert "broker shard process" in sup.stderr_path.read_text() and "died unexpectedly" in sup.stderr_path.read_text()
    # SIGTERM stops them all, status 0.
    shards = descendants(sup.pid)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(WAIT) == 0, procs.output()
    for pid in shards:
        wait_until(lambda: not pid_alive(pid), timeout=WAIT, message=f"shard {pid} to exit")


def test_a_shard_that_cannot_start_stops_the_others(procs, tmp_path):
    # Shard 1's requests port is taken: it exits 2, and the supervisor stops shard 0.
    base = free_base_port(HOST, 2, 10)
    blocker = socket.socket()
    blocker.bind((HOST, base + 1))
    blocker.listen()
    try:
        addrs = [f"tcp://{HOST}:{base + 10 * i}" for i in range(3)]
        sup = procs.start(["broker", "--shards", "2", *addrs], "shards")
        assert sup.wait(WAIT) == 2, procs.output()
        err = sup.stderr_path.read_text()
        assert "configuration error" in err and "Traceback" not in err, err
    finally:
        blocker.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["tcp://*:5555", "tcp://*:5556", "tcp://*:5557"], "would be bound by two shards"),
        (["tcp://*:*", "tcp://*:6555", "tcp://*:7555"], "fixed tcp port"),
        (["inproc://r", "inproc://w", "inproc://a"], "fixed tcp port"),
    ],
)
def test_bad_shard_endpoints_exit_2_with_one_line(subprocess_env, tmp_path, args, message):
    started = time.monotonic()
    result = run_cli(["broker", "--shards", "2", *args], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr, result
    assert time.monotonic() - started < WAIT


# -- clients and workers given the list -----------------------------------------------------


class Shards:
    """`fastbroker broker` processes on 127.0.0.2, 127.0.0.3...: broker k on its own
    loopback host, tcp ports chosen once (a restart binds the same ones), each with a
    store file; `start(k)` and `kill(k)` (SIGKILL) one."""

    def __init__(self, procs, tmp_path, count: int, *options: str) -> None:
        self.procs = procs
        self.hosts = [f"127.0.0.{2 + k}" for k in range(count)]
        self.ports = [free_base_port(host, 1, 1) for host in self.hosts]
        self.stores = [tmp_path / f"shard{k}.db" for k in range(count)]
        self.options = options
        self.running: dict = {}

    def endpoint(self, k: int, which: int) -> str:
        return f"tcp://{self.hosts[k]}:{self.ports[k] + which}"

    @property
    def requests(self) -> str:
        return ",".join(self.endpoint(k, 0) for k in range(len(self.hosts)))

    @property
    def workers(self) -> str:
        return ",".join(self.endpoint(k, 1) for k in range(len(self.hosts)))

    def start(self, k: int) -> None:
        args = ["-v", "broker", "--heartbeat", "0.2", "--store", str(self.stores[k]), *self.options]
        args += [self.endpoint(k, i) for i in range(3)]
        self.running[k] = self.procs.start(args, f"shard{k}")

    def kill(self, k: int) -> None:
        proc = self.running.pop(k)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)


@pytest.fixture
def shards(procs, tmp_path):
    two = Shards(procs, tmp_path, 2)
    for k in range(2):
        two.start(k)
    return two


def answered_by(ctx, shards) -> list:
    return [stats_of(ctx, shards.endpoint(k, 0))["answered"] for k in range(len(shards.hosts))]


def test_a_client_spreads_requests_over_the_brokers_by_id(shards, procs, ctx):
    from fastbroker import Client
    from fastbroker.client.shards import home_shard

    procs.start(["worker", "workers_for_tests:DealerEcho", shards.workers, "-p", "2"], "pool")
    with Client(shards.requests) as client:
        futures = client.submit_many([b"%d" % i for i in range(200)])
        assert [f.result(WAIT) for f in futures] == [b"-%d" % i for i in range(200)]
        homes = [home_shard(f.request_id, 2) for f in futures]
        assert client.stats()["failovers"] == 0 and len(client.stats()["shards"]) == 2
    # Each request ran on its home broker, and both brokers had some.
    assert answered_by(ctx, shards) == [homes.count(0), homes.count(1)]
    assert 0 < homes.count(0) < 200


def test_a_map_over_a_list_keeps_the_window_at_each_broker(shards, procs):
    # The window is per broker: a map's default bound is the window times the brokers,
    # so that each broker's batches are as large as with one broker.
    import threading

    from fastbroker import Client

    payloads = [b"%d" % i for i in range(40)]
    answers: list = []
    with Client(shards.requests, window=3) as client:
        mapper = threading.Thread(target=lambda: answers.extend(client.map(payloads)), name="map")
        mapper.start()
        try:
            # No worker yet: the map submits its bound and waits for the first answer.
            wait_until(lambda: client.stats()["in_flight"] + client.stats()["queued"] == 6, timeout=WAIT)
            procs.start(["worker", "workers_for_tests:DealerEcho", shards.workers], "worker")
        finally:
            mapper.join(WAIT)
        assert not mapper.is_alive()
    assert answers == [b"-" + p for p in payloads]


def test_another_client_finds_a_request_by_its_id(shards, procs, ctx):
    from fastbroker import Client

    procs.start(["worker", "workers_for_tests:DealerEcho", shards.workers, "-p", "2"], "pool")
    with Client(shards.requests) as first:
        ids = [f.request_id for f in first.submit_many([b"x%d" % i for i in range(20)])]
        for rid in ids:
            assert first.result(rid).result(WAIT) == b"-x" + str(ids.index(rid)).encode()
    with Client(shards.requests) as second:
        for i, rid in enumerate(ids):
            assert second.status(rid).state == "done"
            assert second.result(rid).result(WAIT) == b"-x%d" % i
        unknown = os.urandom(16)
        assert second.status(unknown).state == "unknown"


def test_a_dead_shard_s_requests_move_and_come_back_once(shards, procs, ctx, tmp_path):
    """SIGKILL one broker in the middle of a run and start it again: every request gets
    exactly one outcome (the client's futures), and new requests use it again."""
    from fastbroker import Client
    from fastbroker.client.shards import home_shard

    log_path = tmp_path / "jobs.log"
    procs.start(
        ["worker", "workers_for_tests:DealerSlow", shards.workers, "-p", "2", "--heartbeat", "0.2"],
        "pool",
        env={"FB_TEST_LOG": str(log_path)},
    )
    with Client(shards.requests, check_interval=0.2, failover_after=0.6) as client:
        futures = client.submit_many([b"0.02:%d" % i for i in range(100)])
        # Once some have been answered, shard 1 dies with requests in hand.
        wait_until(lambda: sum(f.done() for f in futures) >= 10, timeout=WAIT, message=procs.output())
        shards.kill(1)
        answers = [f.result(WAIT) for f in futures]
        assert answers == [b"-0.02:%d" % i for i in range(100)], procs.output()
        moved = client.stats()["failovers"]
        shards.start(1)
        # Back: new requests whose home is shard 1 go there again (after its first word).
        wait_until(lambda: client.stats()["down"] == 0, timeout=WAIT, message=procs.output())
        later = client.submit_many([b"0.0:late%d" % i for i in range(40)])
        assert [f.result(WAIT) for f in later] == [b"-0.0:late%d" % i for i in range(40)]
        assert any(home_shard(f.request_id, 2) == 1 for f in later)
    assert moved > 0
    assert stats_of(ctx, shards.endpoint(1, 0))["answered"] >= sum(home_shard(f.request_id, 2) == 1 for f in later)
    # Each worker process served both brokers with one credit (1): never two jobs at once.
    events = [e for e in read_log(log_path) if e.event in ("start", "done")]
    for pid in {e.pid for e in events}:
        level = peak = 0
        for e in sorted((e for e in events if e.pid == pid), key=lambda e: (e.time, e.event == "start")):
            level += 1 if e.event == "start" else -1
            peak = max(peak, level)
        assert peak == 1, f"worker {pid} ran {peak} jobs at once"


def test_async_client_with_a_list(shards, procs):
    import asyncio

    from fastbroker import AsyncClient

    procs.start(["worker", "workers_for_tests:DealerEcho", shards.workers, "-p", "2"], "pool")

    async def main():
        async with AsyncClient(shards.requests.split(",")) as client:
            answers = [a async for a in client.map(b"%d" % i for i in range(50))]
            assert answers == [b"-%d" % i for i in range(50)]
            rid = os.urandom(16)
            assert await client.submit(b"mine", request_id=rid) == b"-mine"
            assert (await client.status(rid)).state == "done"
            assert (await client.dead()).total == 0

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_cli_client_commands_take_the_list(shards, procs, subprocess_env, tmp_path):
    import json

    procs.start(["worker", "workers_for_tests:DealerEcho", shards.workers, "-p", "2"], "pool")
    ids = []
    for i in range(6):
        result = run_cli(["submit", "-v", shards.requests, f"job{i}"], subprocess_env, tmp_path, timeout=WAIT)
        assert (result.returncode, result.stdout) == (0, f"-job{i}"), result
        ids.append(result.stderr.split("request id ")[1].split()[0])
    for rid in ids:
        result = run_cli(["status", shards.requests, rid], subprocess_env, tmp_path, timeout=WAIT)
        assert (result.returncode, result.stdout.strip()) == (0, "done (after 1 attempt)"), result
    result = run_cli(["stats", "--json", shards.requests], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0, result
    figures = json.loads(result.stdout)
    assert figures["total"]["answered"] == 6
    assert [s["address"] for s in figures["shards"]] == shards.requests.split(",")
    assert sum(s["figures"]["answered"] for s in figures["shards"]) == 6
    result = run_cli(["stats", shards.requests], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0 and result.stdout.startswith("all 2 brokers\n"), result
    result = run_cli(["dead", "list", shards.requests], subprocess_env, tmp_path, timeout=WAIT)
    assert (result.returncode, result.stdout) == (0, "0 dead requests\n"), result
    # A list with a silent broker: an id the others know is found; one they do not know
    # cannot be called unknown (the silent one may have it), said so, exit 6.
    silent = f"tcp://127.0.0.9:{free_base_port('127.0.0.9', 1, 1)}"
    with_silent = f"{silent},{shards.requests}"
    result = run_cli(["status", "-w", "0.3", with_silent, ids[0]], subprocess_env, tmp_path, WAIT)
    assert (result.returncode, result.stdout.strip()) == (0, "done (after 1 attempt)"), result
    result = run_cli(["status", "-w", "0.3", with_silent, os.urandom(16).hex()], subprocess_env, tmp_path, WAIT)
    assert result.returncode == 6 and f"no answer from {silent} within 0.3 s" in result.stderr, result
    assert "Traceback" not in result.stderr
