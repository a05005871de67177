"""The dead-letter (issue 18 part 6, docs/PROTOCOL.md section 10.9): requests given up
(FAILED or TIMED_OUT after their last try) keep their payload beside their outcome, are
listed by DEAD, run again by REQUEUE / REQUEUE_ALL, stored with --store, bounded by the
retention settings; Client.dead/requeue/requeue_all, AsyncClient's, and
`fastbroker dead list|requeue`.

Part 1 plays clients and FBW01 workers with raw sockets on each core (make_crig); part 2
runs a real Broker with a store and Worker threads; part 3 the CLI in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid

import pytest

from fastbroker import AsyncClient, ConfigError, TaskFailed, Worker
from fastbroker.client.protocol import decode_dead
from fastbroker.protocol import (
    C_CANCEL,
    C_DEAD,
    C_REQUEUE,
    C_REQUEUE_ALL,
    C_RESULT,
    C_STATUS,
    MAX_DEAD_LIST,
    OPT_NO_ACK,
    R_CANCELLED,
    R_DEAD,
    R_FAILED,
    R_OK,
    R_REJECTED,
    R_REQUEUED,
    R_TIMED_OUT,
    R_UNKNOWN,
    REJECT_QUEUE_FULL,
    RESULT_OVERHEAD,
    STATE_DONE,
    STATE_QUEUED,
    STATE_RUNNING,
)
from fastbroker.server.log_store import LOG_VERSION
from fastbroker.server.store import APPLICATION_ID, SCHEMA_VERSION, Store, check, encode_frames
from fastbroker.server.store_files import check_store
from rigs import LONG_TIMEOUT, BrokerRig, assert_stats, new_id, opts, reply, run_cli, status, wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def ask_dead(rig, client, limit: int = MAX_DEAD_LIST):
    """DEAD with `limit`: the decoded reply (fastbroker.client.protocol.decode_dead)."""
    assert client.inbox == [], client.inbox
    query = new_id()
    client.command(C_DEAD, query, u32(limit))
    got = rig.reply(client)
    assert got[:3] == [got[0], R_DEAD, query], got
    dead = decode_dead(got[3:])
    assert dead is not None, got
    return dead


def fail_for_good(rig, worker, client, payload, tries: int = 1, error=(b"ValueError", b"bad input")) -> bytes:
    """Submit `payload` with `tries`, let `worker` report FAILED on every attempt; the id."""
    rid = new_id()
    client.submit(rid, *payload, options=opts(OPT_NO_ACK, 0, tries))
    for _ in range(tries):
        task_id, got = rig.task(worker)
        assert got == list(payload)
        worker.failed(task_id, *error)
    assert rig.reply(client) == reply(R_FAILED, rid, *error)
    return rid


# -- 1. the broker's side, raw sockets, each core ------------------------------------------


def test_requests_given_up_are_listed_with_their_last_error_and_payload_size(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    failed = fail_for_good(rig, worker, client, [b"pay", b"load!"], tries=2)
    # Timed out: one try of 50 ms, never answered (the worker's credit stays taken by
    # the ghost, so a second worker serves the rest).
    timed_out = new_id()
    client.submit(timed_out, b"slow", options=opts(OPT_NO_ACK, 50, 1))
    rig.task(worker)
    assert rig.reply(client) == reply(R_TIMED_OUT, timed_out)
    other = rig.dealer()
    rig.register(other, 1)
    # Neither an OK nor a CANCELLED outcome is dead.
    ok = new_id()
    client.submit(ok, b"fine", options=opts(OPT_NO_ACK))
    task_id, _ = rig.task(other)
    other.answer(task_id, b"answer")
    assert rig.reply(client) == reply(R_OK, ok, b"answer")
    cancelled = new_id()
    client.submit(cancelled, b"never", options=opts(OPT_NO_ACK))
    task_id, _ = rig.task(other)
    assert rig.ask(client, C_CANCEL, cancelled) == reply(R_CANCELLED, cancelled)
    other.answer(task_id, b"late")

    dead = ask_dead(rig, client)
    assert dead.total == 2
    assert [d.request_id for d in dead.requests] == [failed, timed_out]  # oldest first
    first, second = dead.requests
    assert (first.outcome, first.error_type, first.error_message) == ("failed", "ValueError", "bad input")
    assert (first.attempts, first.tries, first.payload_bytes, first.payload_frames) == (2, 2, 8, 2)
    assert (second.outcome, second.error_type, second.error_message) == ("timed_out", "", "")
    assert (second.attempts, second.tries, second.payload_bytes, second.payload_frames) == (1, 1, 4, 1)
    assert 0 <= second.age <= first.age < WAIT
    # The payload counts against the retention bound: FAILED's type, message and payload.
    stats = rig.stats()
    assert_stats(stats, dead=2, retained=4, dead_requeued=0)
    assert stats["retained_bytes"] == 4 * RESULT_OVERHEAD + (10 + 9 + 8) + 4 + len(b"answer")
    # A limit cuts the list, not the count; 0 asks for the count alone.
    assert [d.request_id for d in ask_dead(rig, client, 1).requests] == [failed]
    assert ask_dead(rig, client, 0) == (2, [])
    # STATUS and RESULT of a dead request are those of any finished one.
    assert rig.ask(client, C_STATUS, failed) == status(failed, STATE_DONE, 2, 2)
    assert rig.ask(client, C_RESULT, failed) == reply(R_FAILED, failed, b"ValueError", b"bad input")


def test_the_dead_reply_is_laid_out_as_documented(make_crig):
    # Byte for byte, without the client's decoder: [total, header, type, message].
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = fail_for_good(rig, worker, client, [b"abc"], tries=1, error=(b"KeyError", b"k"))
    query = new_id()
    client.command(C_DEAD, query, u32(10))
    got = rig.reply(client)
    assert got[1:3] == [R_DEAD, query] and len(got) == 3 + 4, got
    total, header, kind, message = got[3:]
    assert total == u32(1) and (kind, message) == (b"KeyError", b"k")
    assert len(header) == 35
    assert header[:16] == rid and header[16:17] == R_FAILED
    assert header[17:21] == u32(1) and header[21:25] == u32(1)  # attempts, tries
    assert int.from_bytes(header[25:29], "big") < WAIT * 1000  # age, ms
    assert header[29:33] == u32(3) and header[33:35] == (1).to_bytes(2, "big")  # payload bytes, frames


def test_requeue_runs_a_dead_request_again_as_new(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = fail_for_good(rig, worker, client, [b"retry", b"me"], tries=2)
    requests_before = rig.stats()["requests"]
    assert rig.ask(client, C_REQUEUE, rid) == reply(R_REQUEUED, rid, u32(1), u32(0))
    # Same id and payload, every try anew; the requeuer is not a waiter.
    task_id, payload = rig.task(worker)
    assert payload == [b"retry", b"me"]
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, 2)
    assert rig.ask(client, C_REQUEUE, rid) == status(rid, STATE_RUNNING, 1, 2)  # not dead: its status
    worker.answer(task_id, b"at last")
    rig.quiet(client)
    assert rig.ask(client, C_RESULT, rid) == reply(R_OK, rid, b"at last")
    assert rig.ask(client, C_REQUEUE, rid) == status(rid, STATE_DONE, 1, 2)  # OK: not dead
    unknown = new_id()
    assert rig.ask(client, C_REQUEUE, unknown) == reply(R_UNKNOWN, unknown)
    assert ask_dead(rig, client) == (0, [])
    assert_stats(rig.stats(), dead=0, dead_requeued=1, requests=requests_before, retained=1)


def test_a_requeued_request_can_die_again_and_keep_its_tries(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = fail_for_good(rig, worker, client, [b"x"], tries=3)
    for round_ in range(2):
        assert rig.ask(client, C_REQUEUE, rid) == reply(R_REQUEUED, rid, u32(1), u32(0))
        for _ in range(3):
            task_id, _ = rig.task(worker)
            worker.failed(task_id, b"E", b"again %d" % round_)
        # No waiter: the outcome is kept, not sent.
        rig.quiet(client)
        assert rig.ask(client, C_RESULT, rid) == reply(R_FAILED, rid, b"E", b"again %d" % round_)
        dead = ask_dead(rig, client)
        assert [(d.request_id, d.attempts, d.tries) for d in dead.requests] == [(rid, 3, 3)]
    assert_stats(rig.stats(), dead=1, dead_requeued=2, failed=9, aborted=3)


def test_requeue_all_stops_at_a_full_queue_and_requeue_is_rejected_there(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT, max_queue=2)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    ids = [fail_for_good(rig, worker, client, [b"job %d" % i]) for i in range(3)]
    worker.disconnect()  # nobody takes the requeued jobs: they stay queued
    rig.pump(lambda: rig.stats()["workers"] == 0)
    query = new_id()
    client.command(C_REQUEUE_ALL, query)
    assert rig.reply(client) == reply(R_REQUEUED, query, u32(2), u32(1))
    assert [rig.ask(client, C_STATUS, rid)[3][0] for rid in ids] == [STATE_QUEUED, STATE_QUEUED, STATE_DONE]
    got = rig.ask(client, C_REQUEUE, ids[2])
    assert got[:3] == reply(R_REJECTED, ids[2])[:3] and got[3] == bytes([REJECT_QUEUE_FULL]), got
    assert_stats(rig.stats(), dead=1, dead_requeued=2, queued=2, rejected=1)
    # Once there is room, the last one goes too; the worker then runs all three.
    worker = rig.dealer()
    rig.register(worker, 1)
    for _ in range(2):
        task_id, _ = rig.task(worker)
        worker.answer(task_id, b"ok")
    query = new_id()
    client.command(C_REQUEUE_ALL, query)
    assert rig.reply(client) == reply(R_REQUEUED, query, u32(1), u32(0))
    task_id, payload = rig.task(worker)
    assert payload == [b"job 2"]
    worker.answer(task_id, b"ok")
    rig.pump(lambda: rig.stats()["answered"] == 3)
    assert ask_dead(rig, client) == (0, [])
    for rid in ids:
        assert rig.ask(client, C_RESULT, rid) == reply(R_OK, rid, b"ok")


def test_a_requeued_outcome_passes_retention_without_forgetting_the_new_request(make_crig):
    # REQUEUE leaves the outcome's place in the retention FIFO as a tombstone: when the
    # retention time (or memory bound) reaches it, the id, now the new request's, stays.
    retention = 1.0
    rig = make_crig(timeout=LONG_TIMEOUT, retention=retention)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = fail_for_good(rig, worker, client, [b"x"])
    worker.disconnect()
    rig.pump(lambda: rig.stats()["workers"] == 0)
    assert rig.ask(client, C_REQUEUE, rid) == reply(R_REQUEUED, rid, u32(1), u32(0))
    requeued_at = time.monotonic()
    rig.pump_for(1.2 * retention)
    assert time.monotonic() - requeued_at >= retention
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_QUEUED, 0, 1)
    assert_stats(rig.stats(), expired_results=0, retained=0, retained_bytes=0, dead=0, queued=1)
    worker = rig.dealer()
    rig.register(worker, 1)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"done")
    rig.pump(lambda: rig.stats()["retained"] == 1)
    assert rig.ask(client, C_RESULT, rid) == reply(R_OK, rid, b"done")


def test_the_memory_bound_passes_over_a_tombstone(make_crig):
    size = 100
    cost = RESULT_OVERHEAD + size
    rig = make_crig(timeout=LONG_TIMEOUT, retention_bytes=2 * cost)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = fail_for_good(rig, worker, client, [b"p" * 10], error=(b"E" * 40, b"m" * 50))  # costs `cost`
    assert rig.ask(client, C_REQUEUE, rid) == reply(R_REQUEUED, rid, u32(1), u32(0))
    running_id, _ = rig.task(worker)  # the requeued one runs and holds the worker
    helper = rig.dealer()
    rig.register(helper, 1)
    others = []
    for i in range(3):  # three outcomes of `cost`: the first of them is pushed out
        other = new_id()
        client.submit(other, b"o", options=opts(OPT_NO_ACK))
        task_id, _ = rig.task(helper)
        helper.answer(task_id, bytes([i]) * size)
        rig.reply(client)
        others.append(other)
    assert_stats(rig.stats(), retained=2, retained_bytes=2 * cost, expired_results=1)
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, 1)
    assert rig.ask(client, C_STATUS, others[0]) == reply(R_UNKNOWN, others[0])
    worker.answer(running_id, b"fine")
    rig.pump(lambda: rig.stats()["running"] == 0)
    assert rig.ask(client, C_RESULT, rid) == reply(R_OK, rid, b"fine")


def test_malformed_dead_letter_commands_are_dropped(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    query = new_id()
    before = rig.stats()["dropped"]
    client.command(C_DEAD, query)  # no limit frame
    client.command(C_DEAD, query, b"\x00\x01")  # a limit of 2 bytes
    client.command(C_DEAD, query, u32(1), b"extra")
    client.command(C_REQUEUE, query, b"extra")
    client.command(C_REQUEUE_ALL, query, b"extra")
    rig.pump(lambda: rig.stats()["dropped"] == before + 5)
    rig.quiet(client)
    assert rig.stats()["drops"] == {"client message with an unknown command or the wrong frames": 5}
    # A limit above MAX_DEAD_LIST is cut to it (nothing dead here: the count, 0).
    assert ask_dead(rig, client, 0xFFFFFFFF) == (0, [])


# -- 2. a real broker, a store, Worker threads and the client API ----------------------------


class Flaky(Worker):
    """Fails every job while `failing` is set (class-wide: the test flips it), else
    answers b"-" + data."""

    failing = threading.Event()

    def process(self, data: bytes) -> bytes:
        if Flaky.failing.is_set():
            raise RuntimeError(f"not now: {data.decode()}")
        return b"-" + data


@pytest.fixture
def flaky():
    Flaky.failing.set()
    yield Flaky
    Flaky.failing.clear()


def test_client_api_lists_and_requeues_dead_requests(tmp_path, flaky):
    rig = BrokerRig(tmp_path)
    try:
        rig.start_broker(timeout=LONG_TIMEOUT, tries=2)
        rig.worker(flaky)
        client = rig.client()
        futures = client.submit_many([b"a", b"b", b"c"])
        for future in futures:
            with pytest.raises(TaskFailed, match="not now"):
                future.result(WAIT)
        dead = client.dead()
        assert dead.total == 3 and sorted(d.request_id for d in dead.requests) == sorted(f.request_id for f in futures)
        assert {(d.error_type, d.attempts, d.tries) for d in dead.requests} == {("RuntimeError", 2, 2)}
        assert all("RuntimeError: not now" in d.describe() for d in dead.requests)
        flaky.failing.clear()
        assert client.requeue(futures[0].request_id) is True
        assert client.result(futures[0].request_id).result(WAIT) == b"-a"
        assert client.requeue(futures[0].request_id) is False  # done OK: not dead
        assert client.requeue(uuid.uuid4().bytes) is False  # unknown
        assert client.requeue_all() == (2, 0)
        assert [client.result(f.request_id).result(WAIT) for f in futures[1:]] == [b"-b", b"-c"]
        assert client.dead(limit=0) == (0, [])
        with pytest.raises(ConfigError, match="limit"):
            client.dead(limit=MAX_DEAD_LIST + 1)
    finally:
        rig.close()


def test_async_client_lists_and_requeues_dead_requests(tmp_path, flaky):
    rig = BrokerRig(tmp_path)
    try:
        rig.start_broker(timeout=LONG_TIMEOUT, tries=1)
        rig.worker(flaky)

        async def main():
            async with AsyncClient(rig.address) as client:
                rid = uuid.uuid4().bytes
                with pytest.raises(TaskFailed):
                    await client.submit(b"z", request_id=rid)
                dead = await client.dead(limit=5)
                assert [(d.request_id, d.outcome) for d in dead.requests] == [(rid, "failed")]
                flaky.failing.clear()
                assert await client.requeue(rid) is True
                assert await client.result(rid) == b"-z"
                assert await client.requeue_all() == (0, 0)

        asyncio.run(asyncio.wait_for(main(), WAIT))
    finally:
        rig.close()


@pytest.mark.parametrize("store_format", ["log", "sqlite"])
def test_dead_requests_and_requeues_survive_a_broker_restart_with_a_store(tmp_path, flaky, store_format):
    rig = BrokerRig(tmp_path, store=str(tmp_path / "store.db"), store_format=store_format)
    try:
        rig.start_broker(timeout=LONG_TIMEOUT, tries=1)
        rig.worker(flaky)
        client = rig.client()
        first, second = client.submit_many([b"one", b"two"])
        for future in (first, second):
            with pytest.raises(TaskFailed):
                future.result(WAIT)
        rig.stop_workers()
        rig.stop_broker()
        report = check_store(str(tmp_path / "store.db"))
        version = SCHEMA_VERSION if store_format == "sqlite" else LOG_VERSION
        assert (report.finished, report.dead, report.version, report.format) == (2, 2, version, store_format)

        rig.start_broker(timeout=LONG_TIMEOUT, tries=1)
        dead = client.dead()
        assert sorted(d.request_id for d in dead.requests) == sorted([first.request_id, second.request_id])
        assert {(d.payload_bytes, d.error_type) for d in dead.requests} == {(3, "RuntimeError")}
        # Requeued with no worker: stored as a queued request again.
        assert client.requeue(first.request_id) is True
        assert client.status(first.request_id).state == "queued"
        rig.stop_broker()
        report = check_store(str(tmp_path / "store.db"))
        assert (report.queued, report.finished, report.dead) == (1, 1, 1)

        rig.start_broker(timeout=LONG_TIMEOUT, tries=1)
        assert client.status(first.request_id).state == "queued"
        flaky.failing.clear()
        rig.worker(flaky)
        assert client.result(first.request_id).result(WAIT) == b"-one"
        assert client.requeue_all() == (1, 0)
        assert client.result(second.request_id).result(WAIT) == b"-two"
    finally:
        rig.close()


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    # A store written by the version before the dead-letter: no payload column.
    path = tmp_path / "v1.db"
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(
        "CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,"
        " payload BLOB NOT NULL, timeout REAL, tries INTEGER NOT NULL, attempts INTEGER NOT NULL)"
    )
    db.execute(
        "CREATE TABLE outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,"
        " code INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, tries INTEGER NOT NULL,"
        " finished REAL NOT NULL)"
    )
    db.execute("INSERT INTO meta VALUES ('version', '1')")
    old = b"o" * 16
    db.execute(
        "INSERT INTO outcomes (id, code, body, attempts, tries, finished) VALUES (?, ?, ?, 1, 1, 1000.0)",
        (old, R_FAILED[0], encode_frames([b"E", b"m"])),
    )
    db.close()
    report = check(str(path))  # read-only: reads version 1, changes nothing
    assert (report.version, report.sound, report.finished, report.dead) == (1, True, 1, 0)
    with Store(str(path)) as store:
        requests, outcomes = store.load()
        assert requests == [] and [(o.id, o.payload, o.timeout) for o in outcomes] == [(old, None, None)]
        new = b"n" * 16
        store.apply([("finish", new, R_TIMED_OUT, [], 1, 1, [b"p1", b"p2"], 2.5)], now=2000.0)
    with Store(str(path)) as store:
        outcomes = store.load()[1]
    assert [(o.id, o.payload, o.timeout) for o in outcomes] == [(old, None, None), (new, [b"p1", b"p2"], 2.5)]
    report = check(str(path))
    assert (report.version, report.sound, report.finished, report.dead) == (SCHEMA_VERSION, True, 2, 1)


# -- 3. the CLI ---------------------------------------------------------------------------


def test_cli_dead_list_and_requeue(tmp_path, flaky, subprocess_env):
    rig = BrokerRig(tmp_path)
    try:
        rig.start_broker(timeout=LONG_TIMEOUT, tries=1)
        rig.worker(flaky)
        client = rig.client()
        futures = client.submit_many([b"p", b"q", b"r"])
        for future in futures:
            with pytest.raises(TaskFailed):
                future.result(WAIT)
        ids = [f.request_id for f in futures]
        wait_until(lambda: client.dead().total == 3, WAIT)

        result = run_cli(["dead", "list", rig.address], subprocess_env, tmp_path, timeout=WAIT)
        assert result.returncode == 0, result
        lines = result.stdout.splitlines()
        assert lines[0] == "3 dead requests" and len(lines) == 4
        assert all("failed: RuntimeError: not now" in line and "1 B in 1 frame)" in line for line in lines[1:])
        assert sorted(line.split()[0] for line in lines[1:]) == sorted(rid.hex() for rid in ids)
        result = run_cli(["dead", "list", "--json", "--limit", "1", rig.address], subprocess_env, tmp_path, WAIT)
        assert result.returncode == 0, result
        listed = json.loads(result.stdout)
        assert listed["total"] == 3 and len(listed["requests"]) == 1
        assert listed["requests"][0]["request_id"] in {rid.hex() for rid in ids}
        assert listed["requests"][0]["outcome"] == "failed"

        flaky.failing.clear()
        unknown = uuid.uuid4().hex
        result = run_cli(["dead", "requeue", rig.address, ids[0].hex(), unknown], subprocess_env, tmp_path, WAIT)
        assert result.returncode == 1, result
        assert result.stdout.splitlines() == [f"{ids[0].hex()}: requeued", f"{unknown}: not dead: unknown"]
        assert client.result(ids[0]).result(WAIT) == b"-p"
        result = run_cli(["dead", "requeue", "--all", rig.address], subprocess_env, tmp_path, WAIT)
        assert (result.returncode, result.stdout.strip()) == (0, "requeued 2, still dead 0"), result
        assert [client.result(rid).result(WAIT) for rid in ids[1:]] == [b"-q", b"-r"]
    finally:
        rig.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["dead", "requeue", "ADDR"], "give request ids or --all"),
        (["dead", "requeue", "ADDR", "00" * 16, "--all"], "give request ids or --all"),
        (["dead", "list", "ADDR", "--limit", str(MAX_DEAD_LIST + 1)], "--limit"),
        (["dead", "requeue", "ADDR", "not-an-id"], "ID"),
        (["dead"], "DEAD_COMMAND"),
    ],
)
def test_cli_dead_usage_errors(tmp_path, subprocess_env, args, message):
    address = f"ipc://{tmp_path}/nobody"
    result = run_cli([a.replace("ADDR", address) for a in args], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr, result


def test_cli_dead_list_without_a_broker_says_so(tmp_path, subprocess_env):
    address = f"ipc://{tmp_path}/nobody"
    result = run_cli(["dead", "list", "-w", "0.3", address], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 6, result
    assert f"no answer from {address}" in result.stderr and "Traceback" not in result.stderr
