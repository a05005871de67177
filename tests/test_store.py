"""The durable store (issue 5): fastbroker.server.store's frames, journal entries and
check() (the SQLite format; the log format's own are in test_log_store.py); a Broker
with a store of either format (`store_format`) restarted in this process (queued requests come back
in order, in-flight ones with their tries counted, outcomes within retention for
RESULT); and the CLI: a bad store stops `fastbroker broker --store` with exit 2 and
one line, `fastbroker store check` reports and exits 0 / 1 / 2.

Crashes of a real broker process (SIGKILL) are in test_store_crash.py."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import List

import pytest
import zmq

import fastbroker
from fastbroker import Broker, Client, ConfigError
from fastbroker.client.protocol import decode_reply, encode_options, submit_message
from fastbroker.protocol import R_ACCEPTED, R_FAILED, R_OK, R_TIMED_OUT
from fastbroker.server.store import (
    SCHEMA_VERSION,
    Store,
    StoredOutcome,
    StoredRequest,
    StoreError,
    check,
    decode_frames,
    encode_frames,
)
from fastbroker.server.store_files import check_store, open_store
from rigs import BrokerRig, read_log, run_cli, runs, wait_until

from workers_for_tests import GATE_ENV, LOG_ENV, DealerEcho, DealerGated

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


def rid(n: int) -> bytes:
    return n.to_bytes(16, "big")


# -- frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames", [[], [b""], [b"a"], [b"", b"x" * 70000, b"\x00\xff"], [b"%d" % i for i in range(300)]]
)
def test_frames_round_trip(frames):
    blob = encode_frames(frames)
    assert decode_frames(blob) == frames
    assert decode_frames(memoryview(blob)) == frames


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "too short"),
        (b"\x00\x00\x01", "too short"),
        (b"\x00\x00\x00\x01", "truncated"),  # one frame, no length
        (b"\x00\x00\x00\x01\x00\x00\x00\x05abc", "truncated"),  # 5 bytes announced, 3 there
        (b"\x00\x00\x00\x00x", "trailing"),
        (encode_frames([b"ab"]) + b"\x00", "trailing"),
    ],
)
def test_decode_frames_rejects_what_encode_frames_never_makes(blob, message):
    with pytest.raises(ValueError, match=message):
        decode_frames(blob)


# -- Store: journal entries in, what to restore out ----------------------------------------


def test_apply_and_load_round_trip_across_reopen(tmp_path):
    path = tmp_path / "s.db"
    with Store(str(path), "full") as store:
        assert store.load() == ([], [])
        assert (
            store.apply(
                [
                    ("submit", rid(1), [b"one", b""], 1.5, 3),
                    ("submit", rid(2), [b"two"], None, -1),
                    ("submit", rid(3), [b"three"], 0.25, 2),
                    ("start", rid(2), 1),
                    ("submit", rid(4), [b"four"], None, 1),
                ]
            )
            == 5
        )
        # A later turn: 3 runs and finishes, 4 finishes TIMED_OUT and is forgotten.
        assert (
            store.apply(
                [
                    ("start", rid(3), 1),
                    ("finish", rid(3), R_OK, [b"-three", b"x"], 1, 2, [], None),
                    ("start", rid(4), 1),
                    ("finish", rid(4), R_TIMED_OUT, [], 1, 1, [b"four"], None),
                    ("forget", rid(4)),
                ],
                now=1000.0,
            )
            == 5
        )
        # A re-submit of a stored id is not a new row (INSERT OR IGNORE keeps its place).
        store.apply([("submit", rid(1), [b"other"], 9.0, 9)])
    with Store(str(path)) as store:
        requests, outcomes = store.load()
    assert requests == [
        StoredRequest(rid(1), [b"one", b""], 1.5, 3, 0),
        StoredRequest(rid(2), [b"two"], None, -1, 1),
    ]
    assert outcomes == [StoredOutcome(rid(3), R_OK, [b"-three", b"x"], 1, 2, 1000.0)]
    report = check(str(path))
    assert (report.queued, report.in_flight, report.finished, report.sound) == (1, 1, 1, True)
    assert report.version == SCHEMA_VERSION and report.problems == []


def test_apply_is_one_transaction_a_bad_entry_rolls_back_the_turn(tmp_path):
    with Store(str(tmp_path / "s.db")) as store:
        with pytest.raises(ValueError, match="unknown journal entry"):
            store.apply([("submit", rid(1), [b"a"], None, 1), ("bogus", rid(1))])
        assert store.load() == ([], [])
        store.apply([("submit", rid(2), [b"b"], None, 1)])
        assert [r.id for r in store.load()[0]] == [rid(2)]


def test_outcomes_load_oldest_first(tmp_path):
    with Store(str(tmp_path / "s.db")) as store:
        store.apply([("finish", rid(1), R_OK, [b"late"], 1, 1, [], None)], now=2000.0)
        store.apply([("finish", rid(2), R_OK, [b"early"], 1, 1, [], None)], now=1000.0)
        assert [o.id for o in store.load()[1]] == [rid(2), rid(1)]


def test_bad_sync_level_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sync must be one of"):
        Store(str(tmp_path / "s.db"), "sometimes")
    assert not (tmp_path / "s.db").exists()


# -- stores that cannot be used ---------------------------------------------------------------


def make_store(path: Path, n: int = 300, size: int = 1000) -> Path:
    """A real store of n queued requests (many pages), closed (WAL folded in)."""
    with Store(str(path)) as store:
        store.apply([("submit", uuid.uuid4().bytes, [b"x" * size], 1.0, 3) for _ in range(n)])
    return path


def foreign_db(path: Path) -> Path:
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    db.close()
    return path


def overwrite_middle_page(path: Path) -> None:
    """Garbage over a whole page in the middle of the file: b-tree damage."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek((size // 4096 // 2) * 4096)
        f.write(b"\x5a" * 4096)


def truncate_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def set_version(path: Path, version: str) -> None:
    db = sqlite3.connect(str(path))
    db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (version,))
    db.commit()
    db.close()


BAD_STORES = {
    "text-file": (lambda p: p.write_text("hello, I am not a database\n" * 100), "not a fastbroker store"),
    "other-sqlite-db": (foreign_db, "another SQLite database"),
    "corrupt-page": (lambda p: overwrite_middle_page(make_store(p)), "malformed"),
    "truncated": (lambda p: truncate_half(make_store(p)), "corrupt"),
    "newer-version": (
        lambda p: set_version(make_store(p, 3), str(SCHEMA_VERSION + 1)),
        f"version {SCHEMA_VERSION + 1}",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STORES))
def test_store_refuses_a_bad_file_naming_it(case, tmp_path):
    path = tmp_path / "bad.db"
    make, expected = BAD_STORES[case]
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        Store(str(path))
    assert str(path) in str(info.value) and expected in str(info.value), info.value
    assert isinstance(info.value, ConfigError)
    assert path.read_bytes() == before, "a refused store must be left as it was"


def test_store_refuses_a_directory_and_a_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="not a regular file"):
        Store(str(tmp_path))
    with pytest.raises(StoreError, match="cannot"):
        Store(str(tmp_path / "no-such-dir" / "s.db"))


def test_a_row_that_cannot_be_decoded_stops_load_never_silently_dropped(tmp_path):
    path = make_store(tmp_path / "s.db", 3)
    db = sqlite3.connect(str(path))
    db.execute("UPDATE requests SET payload = x'00000005ab' WHERE seq = 2")
    db.commit()
    db.close()
    report = check(str(path))
    assert not report.sound and report.queued == 3
    assert report.problems == ["1 row(s) whose frames cannot be decoded"]
    with Store(str(path)) as store:
        with pytest.raises(StoreError, match="row that cannot be read"):
            store.load()


# -- check() --------------------------------------------------------------------------------


def test_check_is_read_only_and_counts(tmp_path):
    path = make_store(tmp_path / "s.db", 5, 10)
    with Store(str(path)) as store:
        ids = [r.id for r in store.load()[0]]
        store.apply([("start", ids[0], 2), ("finish", ids[1], R_OK, [b"ok"], 1, 3, [], None)])
    before = path.read_bytes()
    report = check(str(path))
    assert (report.queued, report.in_flight, report.finished) == (3, 1, 1)
    assert report.sound and report.bytes == path.stat().st_size
    assert path.read_bytes() == before


def test_check_reports_a_newer_version_as_not_sound(tmp_path):
    path = make_store(tmp_path / "s.db", 2, 10)
    set_version(path, "7")
    report = check(str(path))
    assert not report.sound and report.version == 7
    assert report.problems == [f"version 7; this fastbroker reads version {SCHEMA_VERSION}"]


def test_check_reports_page_damage_as_not_sound(tmp_path):
    path = make_store(tmp_path / "s.db")
    overwrite_middle_page(path)
    report = check(str(path))
    assert not report.sound and report.problems, report


@pytest.mark.parametrize("case", ["text-file", "other-sqlite-db", "truncated"])
def test_check_cannot_open_what_is_not_a_store(case, tmp_path):
    path = tmp_path / "bad.db"
    BAD_STORES[case][0](path)
    with pytest.raises(StoreError, match="bad.db"):
        check(str(path))
    with pytest.raises(StoreError, match="no such file"):
        check(str(tmp_path / "missing.db"))


# -- a Broker with a store, restarted in this process ---------------------------------------


@pytest.fixture(params=["log", "sqlite"])
def store_format(request) -> str:
    return request.param


@pytest.fixture
def store_path(tmp_path, store_format) -> Path:
    return tmp_path / f"broker.{store_format}"


@pytest.fixture
def rig(tmp_path, gate, store_path, store_format):
    """A rigs.BrokerRig whose broker has a store."""
    r = BrokerRig(tmp_path, store=str(store_path), store_format=store_format)
    yield r
    gate.touch()
    r.close()


def started(log_path: Path) -> List[str]:
    return [e.payload for e in read_log(log_path) if e.event == "start"]


def test_queued_requests_survive_a_restart_and_run_in_arrival_order(rig, log_path, store_path):
    rig.start_broker()
    client = rig.client()
    payloads = [b"job-%02d" % i for i in range(30)]
    futures = [client.submit(p) for p in payloads]
    wait_until(lambda: rig.broker.stats()["queued"] == 30, timeout=WAIT, message="30 requests queued")
    client.close()
    rig.stop_broker()
    report = check_store(str(store_path))
    assert (report.queued, report.in_flight, report.finished, report.sound) == (30, 0, 0, True)

    broker = rig.start_broker()
    # No worker yet: the restored requests wait, in the queue, known by id.
    watcher = rig.client()
    assert watcher.status(futures[7].request_id) == fastbroker.Status("queued", 0, None)
    outcomes = [watcher.result(f.request_id) for f in futures]
    rig.worker(DealerEcho, credit=1)
    assert [o.result(WAIT) for o in outcomes] == [b"-" + p for p in payloads]
    assert started(log_path) == [p.decode() for p in payloads]
    stats = broker.stats()
    # Restored, not received: the new broker got no SUBMIT at all.
    assert (stats["requests"], stats["duplicates"], stats["answered"]) == (0, 0, 30)
    wait_until(lambda: check_store(str(store_path)).finished == 30, timeout=WAIT, message="the 30 outcomes stored")
    assert check_store(str(store_path)).queued == 0


def test_in_flight_requests_come_back_with_the_attempt_counted(rig, log_path, store_path, gate, procs):
    # The broker stops while both jobs run; the worker is killed only then (a death
    # the broker saw would end those attempts: its connection closing is enough).
    rig.broker_options["heartbeat"] = 5.0
    rig.start_broker()
    worker = procs.start(
        ["worker", "workers_for_tests:DealerGated", rig.addrs[1], "--credit", "2"],
        "gated",
        env={LOG_ENV: str(log_path), GATE_ENV: str(gate)},
    )
    client = rig.client()
    last_try = client.submit(b"0:gated-last-try", tries=1)
    one_left = client.submit(b"0:gated-one-left", tries=2)
    wait_until(lambda: len(started(log_path)) == 2, timeout=WAIT, message=f"both jobs to start\n{procs.output()}")
    client.close()
    rig.stop_broker()
    worker.kill()  # so that it cannot answer the next broker
    worker.wait(WAIT)
    report = check_store(str(store_path))
    assert (report.queued, report.in_flight, report.finished) == (0, 2, 0)

    rig.start_broker()
    watcher = rig.client()
    # The attempt that was running was its only try: TIMED_OUT, kept for RESULT.
    assert watcher.status(last_try.request_id) == fastbroker.Status("done", 1, 1)
    with pytest.raises(fastbroker.TaskTimedOut):
        watcher.result(last_try.request_id).result(WAIT)
    # Back in the queue, its first attempt counted.
    assert watcher.status(one_left.request_id) == fastbroker.Status("queued", 1, 2)
    gate.touch()
    rig.worker(DealerGated)
    assert watcher.result(one_left.request_id).result(WAIT) == b"-0:gated-one-left"
    assert watcher.status(one_left.request_id) == fastbroker.Status("done", 2, 2)
    assert len(runs(log_path, "0:gated-last-try")) == 1
    assert len(runs(log_path, "0:gated-one-left")) == 2
    assert rig.broker.stats()["answered"] == 1
    wait_until(lambda: check_store(str(store_path)).finished == 2, timeout=WAIT, message="both outcomes stored")


def test_outcomes_are_restored_for_result_and_forgotten_past_retention(
    tmp_path, rig, log_path, store_path, store_format
):
    rig.start_broker()
    rig.worker(DealerEcho)
    client = rig.client()
    kept = client.submit(b"kept")
    assert kept.result(WAIT) == b"-kept"
    client.close()
    rig.stop_workers()
    rig.stop_broker()
    # An outcome that finished an hour ago, past the broker's retention (10 minutes).
    with open_store(str(store_path), store_format=store_format) as store:
        store.apply([("finish", rid(99), R_OK, [b"old"], 1, 1, [], None)], now=time.time() - 3600)
    assert check_store(str(store_path)).finished == 2

    rig.start_broker()
    watcher = rig.client()
    assert watcher.result(kept.request_id).result(WAIT) == b"-kept"
    assert watcher.status(kept.request_id) == fastbroker.Status("done", 1, None)
    with pytest.raises(fastbroker.UnknownRequest):
        watcher.result(rid(99)).result(WAIT)
    # Forgotten in the store too, at start.
    assert check_store(str(store_path)).finished == 1
    # A re-SUBMIT of a restored id is a duplicate: the stored answer, never a second run.
    again = watcher.submit(b"kept", request_id=kept.request_id)
    assert again.result(WAIT) == b"-kept"
    assert runs(log_path, "kept") and len(runs(log_path, "kept")) == 1
    assert rig.broker.stats()["duplicates"] == 1


def test_retention_restored_counts_from_when_it_finished(tmp_path, rig, store_path, store_format):
    rig.broker_options["retention"] = 30.0
    with open_store(str(store_path), store_format=store_format) as store:
        store.apply([("finish", rid(1), R_OK, [b"recent"], 1, 1, [], None)], now=time.time() - 5)
        store.apply([("finish", rid(2), R_OK, [b"too-old"], 1, 1, [], None)], now=time.time() - 40)
    broker = rig.start_broker()
    watcher = rig.client()
    assert watcher.result(rid(1)).result(WAIT) == b"recent"
    with pytest.raises(fastbroker.UnknownRequest):
        watcher.result(rid(2)).result(WAIT)
    assert broker.stats()["retained"] == 1


def test_a_late_answer_for_a_finished_stored_request_is_dropped(rig, log_path, store_path, gate, ctx):
    """The first attempt outlives its timeout on a held worker; the retry finishes on
    another worker and is stored; then the first attempt answers: it is dropped, the
    client has had exactly one outcome, and the store holds that one."""
    rig.start_broker(timeout=0.5, tries=2)
    rig.worker(DealerGated)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(rig.address)
    request_id = uuid.uuid4().bytes
    client.send_multipart(submit_message(request_id, encode_options(), [b"0:gated-late"]))
    wait_until(lambda: runs(log_path, "0:gated-late"), timeout=WAIT, message="the first attempt to start")
    rig.worker(DealerEcho)
    replies = []

    def receive(wait: float) -> None:
        while client.poll(int(wait * 1000)):
            reply = decode_reply(client.recv_multipart())
            assert reply is not None and reply.request_id == request_id
            replies.append(reply.kind)
            wait = 0

    def outcomes() -> int:
        receive(0.05)
        return sum(1 for kind in replies if kind != R_ACCEPTED)

    wait_until(lambda: outcomes() == 1, timeout=WAIT, message="the retry's outcome")
    assert replies == [R_ACCEPTED, R_OK]
    assert check_store(str(store_path)).finished == 1
    unknown_before = rig.broker.stats()["drops"].get("answer for an unknown or already answered task", 0)
    gate.touch()
    wait_until(
        lambda: (
            rig.broker.stats()["drops"].get("answer for an unknown or already answered task", 0) == unknown_before + 1
        ),
        timeout=WAIT,
        message="the late answer to be dropped",
    )
    receive(0.2)  # nothing more comes: an outcome would have gone out in the turn that dropped it
    assert replies == [R_ACCEPTED, R_OK]
    stats = rig.broker.stats()
    assert (stats["answered"], stats["timeouts"], stats["late_answers"]) == (1, 1, 0)
    assert [e.event for e in read_log(log_path) if e.payload == "0:gated-late"].count("done") == 2
    report = check_store(str(store_path))
    assert (report.finished, report.queued, report.in_flight) == (1, 0, 0)


def test_cancel_and_timed_out_outcomes_are_stored(rig, log_path, store_path):
    rig.start_broker(timeout=0.2, tries=1)
    client = rig.client()
    cancelled = client.submit(b"cancel-me")
    wait_until(lambda: rig.broker.stats()["queued"] == 1, timeout=WAIT, message="the request queued")
    client.cancel(cancelled.request_id)
    with pytest.raises(fastbroker.TaskCancelled):
        cancelled.result(WAIT)
    rig.worker(DealerGated)
    timed_out = client.submit(b"0:gated-forever")
    with pytest.raises(fastbroker.TaskTimedOut):
        timed_out.result(WAIT)
    client.close()
    rig.stop_broker()
    rig.start_broker()
    watcher = rig.client()
    with pytest.raises(fastbroker.TaskCancelled):
        watcher.result(cancelled.request_id).result(WAIT)
    with pytest.raises(fastbroker.TaskTimedOut):
        watcher.result(timed_out.request_id).result(WAIT)


def test_replies_wait_for_the_store(tmp_path, core, ctx, store_path, store_format):
    """Driven by step(): after a turn that accepted a request, its ACCEPTED is out only
    once the request is in the store (read through a second connection)."""
    broker = Broker(
        ctx,
        None,
        None,
        *(f"ipc://{tmp_path}/{n}" for n in ("r", "w", "a")),
        store=str(store_path),
        store_format=store_format,
    )
    try:
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(broker.endpoints[0])
        request_id = uuid.uuid4().bytes
        client.send_multipart(submit_message(request_id, b"", [b"payload"]))
        deadline = time.monotonic() + WAIT
        while not client.poll(0):
            assert time.monotonic() < deadline, "no ACCEPTED"
            broker.step(0.05)
        reply = decode_reply(client.recv_multipart())
        assert reply.kind == R_ACCEPTED and reply.request_id == request_id
        # Stored before it was sent: visible to another reader at once.
        assert check_store(str(store_path)).queued == 1
    finally:
        broker.close()


def test_a_bad_store_leaves_nothing_bound(tmp_path, ctx):
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    addrs = [f"ipc://{tmp_path}/{n}" for n in ("r", "w", "a")]
    with pytest.raises(StoreError, match="bad.db"):
        Broker(ctx, None, None, *addrs, store=str(bad))
    # Nothing was bound: the endpoints are free for a broker with a good store.
    with Broker(ctx, None, None, *addrs, store=str(tmp_path / "good.db")) as broker:
        assert broker.endpoints[0] == addrs[0]


# -- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


@pytest.mark.parametrize(
    "case", ["corrupt-page", "text-file", "other-sqlite-db", "newer-version", "directory", "missing-dir"]
)
def test_broker_with_a_bad_store_exits_2_with_one_line_naming_it(case, tmp_path, addrs, subprocess_env, core_name):
    if case == "directory":
        path = tmp_path / "a-dir"
        path.mkdir()
    elif case == "missing-dir":
        path = tmp_path / "no-such-dir" / "s.db"
    else:
        path = tmp_path / "bad.db"
        BAD_STORES[case][0](path)
    result = run_cli(
        ["broker", "--core", core_name, "--store", str(path), *addrs], subprocess_env, tmp_path, timeout=WAIT
    )
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0], lines[0]
    assert result.stdout == ""
    # Refused before binding: no ipc socket file was made.
    assert not (tmp_path / "req").exists()


def test_store_check_command_output_and_exit_codes(tmp_path, subprocess_env):
    good = make_store(tmp_path / "good.db", 4, 10)
    with Store(str(good)) as store:
        first = store.load()[0][0].id
        store.apply(
            [
                ("start", first, 1),
                ("finish", rid(5), R_OK, [b"a"], 1, 1, [], None),
                ("finish", rid(6), R_FAILED, [b"E", b"m"], 1, 1, [b"job"], None),
            ]
        )
    result = run_cli(["store", "check", str(good)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"store {good}: sqlite version {SCHEMA_VERSION}, ")
    assert lines[1:] == [
        "queued: 3 (never sent to a worker)",
        "in flight: 1 (sent at least once, not finished)",
        "finished: 2 (outcomes kept for RESULT)",
        "dead: 1 (of the finished: FAILED or TIMED_OUT, payload kept for requeue)",
        "sound",
    ]
    result = run_cli(["store", "check", "--json", str(good)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0, result
    report = json.loads(result.stdout)
    assert report == {
        "path": str(good),
        "version": SCHEMA_VERSION,
        "queued": 3,
        "in_flight": 1,
        "finished": 2,
        "dead": 1,
        "bytes": good.stat().st_size,
        "sound": True,
        "problems": [],
        "format": "sqlite",
        "torn": 0,
    }

    unsound = make_store(tmp_path / "unsound.db", 2, 10)
    set_version(unsound, "9")
    result = run_cli(["store", "check", str(unsound)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[-1].startswith("NOT SOUND: version 9"), result.stdout
    result = run_cli(["store", "check", "--json", str(unsound)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 1 and json.loads(result.stdout)["sound"] is False

    for path in (tmp_path / "missing.db", foreign_db(tmp_path / "foreign.db")):
        result = run_cli(["store", "check", str(path)], subprocess_env, tmp_path, timeout=WAIT)
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and str(path) in result.stderr, result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("store_format", ["log", "sqlite"])
def test_store_check_reads_a_store_left_by_a_killed_broker(
    procs, tmp_path, addrs, core_name, subprocess_env, store_format
):
    """SIGKILL leaves the last turns in SQLite's WAL, or in the OS's cache for the
    log: check (read-only) still sees them, and a broker started on the store puts
    them back."""
    path = tmp_path / "s.db"
    broker = procs.start(
        ["broker", "--core", core_name, "--store", str(path), "--store-format", store_format, "--sync", "off", *addrs],
        "broker",
    )
    with Client(addrs[0], ack=True) as client:
        futures = [client.submit(b"queued-%d" % i) for i in range(10)]
        with Client(addrs[0]) as probe:
            wait_until(
                lambda: probe.status(futures[-1].request_id, wait=WAIT).state == "queued",
                timeout=WAIT,
                message="the requests queued",
            )
        broker.send_signal(signal.SIGKILL)
        broker.wait(WAIT)
    assert Path(f"{path}-wal").exists() == (store_format == "sqlite")
    result = run_cli(["store", "check", "--json", str(path)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["queued"] == 10
    procs.start(["broker", "--core", core_name, "--store", str(path), *addrs], "broker-2")
    with Client(addrs[0]) as watcher:
        wait_until(
            lambda: watcher.status(futures[0].request_id, wait=WAIT).state == "queued",
            timeout=WAIT,
            message="the restored requests",
        )
