"""The log store (server/log_store.py, the default --store format): what it writes reads
back as the SQLite store's would (random turns applied to both, compactions between),
compaction bounds the file, an unfinished last write is left out and counted while
damage anywhere else stops the broker naming it, one broker at a time, the format of
an existing file is kept, and `fastbroker store check` reads it.

The same tests run on the compiled index and its pure twin (FASTBROKER_PURE). That the
compiled core's records are log_records' bytes is checked in test_core_differential.py;
the broker restarted on a log store, and SIGKILLed under load, in test_store.py and
test_store_crash.py."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fastbroker import ConfigError
from fastbroker.log_records import HEAD, encode_entries, read_log
from fastbroker.protocol import LOG_MAGIC, R_FAILED, R_OK, R_TIMED_OUT
from fastbroker.server.log_store import LOG_VERSION, LogStore, check
from fastbroker.server.store import Store, StoreError
from fastbroker.server.store_files import check_store, file_format, open_store
from rigs import run_cli

WAIT = 20.0


def rid(n: int) -> bytes:
    return n.to_bytes(16, "big")


# -- what it holds -------------------------------------------------------------------------


def test_apply_and_load_round_trip_across_reopen(tmp_path):
    path = str(tmp_path / "s.log")
    with LogStore(path, "full") as store:
        assert store.load() == ([], [])
        store.apply(
            [
                ("submit", rid(1), [b"a", b""], 2.5, 3),
                ("submit", rid(2), [b"b"], None, -1),
                ("submit", rid(3), [b"c"], None, 1),
                ("start", rid(1), 2),
            ]
        )
        store.apply(
            [
                ("finish", rid(2), R_OK, [b"done", b"x"], 1, -1, [], None),
                ("finish", rid(3), R_FAILED, [b"E", b"m"], 1, 1, [b"c"], 4.0),
                ("submit", rid(1), [b"again"], 9.0, 9),  # a second SUBMIT of an id changes nothing
            ],
            now=1000.0,
        )
    with LogStore(path) as store:
        requests, outcomes = store.load()
    assert [(r.id, r.payload, r.timeout, r.tries, r.attempts) for r in requests] == [(rid(1), [b"a", b""], 2.5, 3, 2)]
    assert [(o.id, o.code, o.body, o.attempts, o.tries, o.finished, o.payload, o.timeout) for o in outcomes] == [
        (rid(2), R_OK, [b"done", b"x"], 1, -1, 1000.0, None, None),
        (rid(3), R_FAILED, [b"E", b"m"], 1, 1, 1000.0, [b"c"], 4.0),
    ]
    report = check(path)
    assert (report.format, report.version, report.queued, report.in_flight, report.finished, report.dead) == (
        "log",
        LOG_VERSION,
        0,
        1,
        2,
        1,
    )
    assert report.sound and report.torn == 0


def test_a_bad_entry_writes_nothing_of_its_turn(tmp_path):
    with LogStore(str(tmp_path / "s.log")) as store:
        size = store.size
        with pytest.raises(ValueError, match="unknown journal entry"):
            store.apply([("submit", rid(1), [b"a"], None, 1), ("bogus", rid(1))])
        assert store.size == size
        store.apply([("submit", rid(2), [b"b"], None, 1)])
    with LogStore(str(tmp_path / "s.log")) as store:
        assert [r.id for r in store.load()[0]] == [rid(2)]


ids = st.integers(0, 5).map(rid)
frames = st.lists(st.binary(max_size=40), max_size=3)
entries = st.one_of(
    st.tuples(st.just("submit"), ids, frames, st.one_of(st.none(), st.floats(0.5, 100)), st.integers(-1, 5)),
    st.tuples(st.just("start"), ids, st.integers(1, 5)),
    st.tuples(
        st.just("finish"),
        ids,
        st.sampled_from([R_OK, R_FAILED, R_TIMED_OUT]),
        frames,
        st.integers(0, 5),
        st.integers(-1, 5),
        frames,
        st.one_of(st.none(), st.floats(0.5, 100)),
    ),
    st.tuples(st.just("forget"), ids),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(st.lists(entries, max_size=8), st.floats(0, 1e6)), max_size=12))
def test_the_log_holds_what_the_sqlite_store_holds(tmp_path_factory, turns):
    """Random turns applied to both stores, the log compacted every third turn:
    both give back the same requests and outcomes, in the same order."""
    where = tmp_path_factory.mktemp("both")
    with Store(str(where / "s.db")) as sqlite_store, LogStore(str(where / "s.log"), compact_min=256) as log_store:
        for n, (turn, now) in enumerate(turns):
            sqlite_store.apply(turn, now=now)
            log_store.apply(turn, now=now)
            if n % 3 == 2:
                log_store.compact()  # besides those the growth makes
        expected = sqlite_store.load()
    with LogStore(str(where / "s.log")) as reopened:
        assert reopened.load() == expected


def test_compaction_bounds_the_file_and_keeps_what_is_live(tmp_path):
    path = str(tmp_path / "s.log")
    with LogStore(path, compact_min=64 << 10) as store:
        store.apply([("submit", rid(1_000_000 + i), [b"kept-%d" % i], 1.0, 3) for i in range(50)])
        store.apply([("start", rid(1_000_000), 2)])
        for i in range(20_000):  # ~4 MB of records through a store that never holds more than ~5 KB
            store.apply(
                [
                    ("submit", rid(i), [b"x" * 64], 1.0, 3),
                    ("start", rid(i), 1),
                    ("finish", rid(i), R_OK, [b"y" * 32], 1, 3, [], None),
                    ("forget", rid(i)),
                ],
                now=float(i),
            )
            assert store.size < 2 * (64 << 10) + 1024
        assert store.compactions >= 20
    with LogStore(path) as store:
        requests, outcomes = store.load()
    assert [r.payload for r in requests] == [[b"kept-%d" % i] for i in range(50)]
    assert [r.attempts for r in requests[:2]] == [2, 0]
    assert outcomes == []


# -- damage, and an unfinished last write -------------------------------------------------


def written_store(path: Path) -> bytes:
    with LogStore(str(path)) as store:
        store.apply([("submit", rid(i), [b"payload-%d" % i], None, 3) for i in range(10)])
    return path.read_bytes()


def record_starts(blob: bytes) -> list:
    starts, at = [], 0
    while at < len(blob):
        starts.append(at)
        at += HEAD.size + HEAD.unpack_from(blob, at)[0]
    return starts


def last_write(n: int) -> bytes:
    """One turn's records of n submits, as a broker writes them."""
    return encode_entries([("submit", rid(100 + i), [b"never acknowledged %d" % i], None, 3) for i in range(n)], 0.0)


@pytest.mark.parametrize("tail", ["cut-short", "bad-last-checksum", "zeros", "zeros-from-inside-a-record"])
def test_an_unfinished_last_write_is_left_out_and_counted(tail, tmp_path, caplog):
    """The whole records of a last write cut short are kept (a turn is applied as far as
    its records are whole, as a crash in the middle of the turn would leave it); what
    follows the last whole one is left out, counted, and kept aside."""
    path = tmp_path / "s.log"
    data = written_store(path)
    write = last_write(50)
    ends = list(itertools.accumulate(HEAD.size + HEAD.unpack_from(write, at)[0] for at in record_starts(write)))
    if tail == "cut-short":
        extra = write[:-5]
    elif tail == "bad-last-checksum":
        damaged = bytearray(write)
        damaged[-1] ^= 0xFF
        extra = bytes(damaged)
    elif tail == "zeros":
        extra = bytes(300)
    else:
        # What a power loss leaves: the last write's pages zeroed from some byte inside
        # one of its records (its head and part of its body there, then zeros).
        extra = write[:1000] + bytes(len(write) - 1000)
    whole = 0 if tail == "zeros" else sum(1 for end in ends if end <= len(extra) and extra[:end] == write[:end])
    kept = ends[whole - 1] if whole else 0
    path.write_bytes(data + extra)
    report = check(str(path))
    assert (report.sound, report.torn, report.queued) == (True, len(extra) - kept, 10 + whole)
    with caplog.at_level(logging.WARNING, logger="fastbroker.store"):
        with LogStore(str(path)) as store:
            requests, _ = store.load()
    assert [r.id for r in requests] == [rid(i) for i in range(10)] + [rid(100 + i) for i in range(whole)]
    assert f"{len(extra) - kept} byte(s) of an unfinished last write left out" in caplog.text
    assert check(str(path)).torn == 0  # cut off
    assert (tmp_path / "s.log.torn").read_bytes() == extra[kept:]  # and kept aside
    assert path.read_bytes() == data + extra[:kept]


def test_damage_before_the_end_stops_the_store_naming_it_and_changes_nothing(tmp_path):
    path = tmp_path / "s.log"
    data = bytearray(written_store(path))
    second = len(LOG_MAGIC) + HEAD.size + HEAD.unpack_from(data, len(LOG_MAGIC))[0]
    data[second + HEAD.size + 30] ^= 0xFF  # inside the second record's body
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        LogStore(str(path))
    assert str(path) in str(info.value) and f"damaged record at byte {second}" in str(info.value)
    assert isinstance(info.value, ConfigError)
    assert path.read_bytes() == bytes(data)
    report = check(str(path))
    assert not report.sound and report.problems == [f"is corrupt: damaged record at byte {second}: checksum mismatch"]


@pytest.mark.parametrize("length", ["past-the-end", "too-short", "into-the-next"])
def test_a_damaged_length_before_the_end_is_damage_not_a_torn_write(length, tmp_path):
    """A record's length that reads wrong is taken for an unfinished last write only if
    no whole record follows it: acknowledged records after it are never dropped."""
    path = tmp_path / "s.log"
    data = bytearray(written_store(path))
    second = len(LOG_MAGIC) + HEAD.size + HEAD.unpack_from(data, len(LOG_MAGIC))[0]
    size = HEAD.unpack_from(data, second)[0]
    wrong = {"past-the-end": len(data), "too-short": 3, "into-the-next": size + 5}[length]
    data[second : second + 4] = wrong.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"damaged record at byte {second}"):
        LogStore(str(path))
    assert path.read_bytes() == bytes(data) and not (tmp_path / "s.log.torn").exists()
    report = check(str(path))
    assert not report.sound and report.torn == 0


def test_a_failed_compaction_leaves_the_store_as_it_was(tmp_path, caplog):
    path = tmp_path / "s.log"

    def turns(first: int, last: int) -> None:
        for i in range(first, last):
            store.apply(
                [
                    ("submit", rid(i), [b"x" * 40], None, 3),
                    ("finish", rid(i), R_OK, [b"y"], 1, 3, [], None),
                    ("forget", rid(i)),
                ]
            )

    with LogStore(str(path), compact_min=4096) as store:
        store.apply([("submit", rid(10_000), [b"kept"], None, 3)])
        (tmp_path / "s.log.new").mkdir()  # where the new file would go: it cannot be made
        with caplog.at_level(logging.WARNING, logger="fastbroker.store"):
            turns(0, 40)
        assert "cannot compact" in caplog.text and store.compactions == 0
        assert store.size > 4096
        (tmp_path / "s.log.new").rmdir()
        turns(40, 120)  # tried again once the file has doubled, and done
        assert store.compactions >= 1 and not (tmp_path / "s.log.new").exists()
    with LogStore(str(path)) as store:
        assert [r.id for r in store.load()[0]] == [rid(10_000)]


def test_opening_indexes_the_file_where_it_is(tmp_path):
    """A store is not rewritten when it is opened (a full disk must not stop a restart):
    the same file, its records indexed, and new ones appended after them."""
    path = tmp_path / "s.log"
    data = written_store(path)
    inode = path.stat().st_ino
    with LogStore(str(path)) as store:
        assert len(store.load()[0]) == 10 and store.size == len(data)
        store.apply([("finish", rid(0), R_OK, [b"done"], 1, 3, [], None)])
    assert path.stat().st_ino == inode and path.read_bytes().startswith(data)
    with LogStore(str(path)) as store:
        requests, outcomes = store.load()
    assert [r.id for r in requests] == [rid(i) for i in range(1, 10)] and [o.id for o in outcomes] == [rid(0)]


def test_one_broker_at_a_time(tmp_path):
    path = str(tmp_path / "s.log")
    with LogStore(path):
        with pytest.raises(StoreError, match="in use by another broker"):
            LogStore(path)
    with LogStore(path) as store:  # free again once closed
        assert store.load() == ([], [])


def test_a_compaction_between_anothers_open_and_lock_does_not_let_it_in(tmp_path, monkeypatch):
    """B opens the file, A renames a compacted one over it and lets the old one go, then
    B locks: B holds the lock of a file that is no longer the store, so it opens the
    store again and finds A's lock (before: B went on with the old file)."""
    path = str(tmp_path / "s.log")
    first = LogStore(path)
    first.apply([("submit", rid(1), [b"a"], None, 3)])
    lock = LogStore._lock
    calls = []

    def compact_first(self, fd):
        if not calls:
            first.compact()
        calls.append(fd)
        lock(self, fd)

    monkeypatch.setattr(LogStore, "_lock", compact_first)
    with pytest.raises(StoreError, match="in use by another broker"):
        LogStore(path)
    assert len(calls) == 2 and first.compactions == 1
    first.apply([("submit", rid(2), [b"b"], None, 3)])
    first.close()
    monkeypatch.setattr(LogStore, "_lock", lock)
    with LogStore(path) as store:
        assert [r.id for r in store.load()[0]] == [rid(1), rid(2)]


# -- which format ------------------------------------------------------------------------


def test_a_new_store_is_a_log_and_an_existing_file_keeps_its_format(tmp_path):
    with open_store(str(tmp_path / "new")) as store:
        assert isinstance(store, LogStore)
    assert file_format(str(tmp_path / "new")) == "log"
    with open_store(str(tmp_path / "old.db"), store_format="sqlite") as store:
        assert isinstance(store, Store)
        store.apply([("submit", rid(1), [b"a"], None, 1)])
    with open_store(str(tmp_path / "old.db")) as store:
        assert isinstance(store, Store) and [r.id for r in store.load()[0]] == [rid(1)]
    with pytest.raises(StoreError, match="is a sqlite store, not log"):
        open_store(str(tmp_path / "old.db"), store_format="log")
    with pytest.raises(StoreError, match="is a log store, not sqlite"):
        open_store(str(tmp_path / "new"), store_format="sqlite")
    (tmp_path / "text").write_text("hello, I am not a store\n")
    for call in (open_store, check_store):
        with pytest.raises(StoreError, match="not a fastbroker store"):
            call(str(tmp_path / "text"))
    with pytest.raises(ConfigError, match="store format must be one of log, sqlite"):
        open_store(str(tmp_path / "other"), store_format="csv")


# -- the CLI ---------------------------------------------------------------------------------


def test_store_check_command_reads_a_log(tmp_path, subprocess_env):
    path = tmp_path / "s.log"
    written_store(path)
    with LogStore(str(path)) as store:
        store.apply([("start", rid(0), 1), ("finish", rid(1), R_FAILED, [b"E", b"m"], 1, 1, [b"job"], None)])
    path.write_bytes(path.read_bytes() + b"\x01\x02\x03")
    result = run_cli(["store", "check", str(path)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        f"store {path}: log version {LOG_VERSION}, {path.stat().st_size} bytes",
        "queued: 8 (never sent to a worker)",
        "in flight: 1 (sent at least once, not finished)",
        "finished: 1 (outcomes kept for RESULT)",
        "dead: 1 (of the finished: FAILED or TIMED_OUT, payload kept for requeue)",
        "left out: 3 byte(s) of an unfinished last write (never acknowledged)",
        "sound",
    ]
    result = run_cli(["store", "check", "--json", str(path)], subprocess_env, tmp_path, timeout=WAIT)
    report = json.loads(result.stdout)
    assert (report["format"], report["torn"], report["sound"]) == ("log", 3, True)

    damaged = bytearray(path.read_bytes())
    damaged[len(LOG_MAGIC) + HEAD.size + 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    result = run_cli(["store", "check", str(path)], subprocess_env, tmp_path, timeout=WAIT)
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[-1].startswith("NOT SOUND: is corrupt: damaged record at byte 8"), result.stdout


def test_broker_refuses_a_store_of_the_other_format_in_one_line(tmp_path, subprocess_env, core_name):
    path = tmp_path / "s.log"
    written_store(path)
    addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
    result = run_cli(
        ["broker", "--core", core_name, "--store", str(path), "--store-format", "sqlite", *addrs],
        subprocess_env,
        tmp_path,
        timeout=WAIT,
    )
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        f"fastbroker: error: store {path}: is a log store, not sqlite (--store-format)"
    ]
    assert not (tmp_path / "req").exists()
    assert read_log(path.read_bytes()).end == path.stat().st_size  # untouched
    assert encode_entries([], 0.0) == b""
