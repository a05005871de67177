"""The durable store: FBC01 requests and outcomes in an SQLite database (WAL mode).

The broker's core journals what changed in each loop turn (``BrokerCore.journal_take``);
``Store.apply`` writes one turn's changes in one transaction (group commit), and only
then does the broker release the replies the core held back (ACCEPTED and outcomes).
On start, ``Store.load`` gives back what to restore. See docs/ARCHITECTURE.md, "The
durable store", for what each ``sync`` level promises.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import struct
import time
from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from fastbroker._common import Closeable, ConfigError

SCHEMA_VERSION = 2
"""2 added the dead-letter: outcomes.payload and outcomes.timeout. A version 1 store is
upgraded in place when a broker opens it (read-only ``check`` reads both)."""
READABLE_VERSIONS = (1, 2)
APPLICATION_ID = 0x46424B31  # "FBK1": marks the file as a fastbroker store

SYNC_LEVELS = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
"""--sync: SQLite's synchronous setting. In WAL mode, "full" syncs the WAL at every
commit (an ACCEPTED request survives power loss); "normal" syncs at checkpoints only
(it survives a crash of the broker process, but the last commits may be lost on power
loss); "off" leaves syncing to the OS (it survives a process crash too, since the data
is in the OS's cache, but not power loss or an OS crash)."""
DEFAULT_SYNC = "normal"

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # seq keeps the arrival order the queue is restored in.
    "CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,"
    " payload BLOB NOT NULL, timeout REAL, tries INTEGER NOT NULL, attempts INTEGER NOT NULL)",
    # payload and timeout: a dead request's (FAILED or TIMED_OUT), for REQUEUE; else NULL.
    "CREATE TABLE outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL UNIQUE,"
    " code INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL, tries INTEGER NOT NULL,"
    " finished REAL NOT NULL, payload BLOB, timeout REAL)",
)
_UPGRADE_FROM_1 = (
    "ALTER TABLE outcomes ADD COLUMN payload BLOB",
    "ALTER TABLE outcomes ADD COLUMN timeout REAL",
    "UPDATE meta SET value = '2' WHERE key = 'version'",
)

_U32 = struct.Struct(">I")


class StoreError(ConfigError):
    """The store cannot be used: unreadable, corrupt, or not a store of this version."""


class StoredRequest(NamedTuple):
    id: bytes
    payload: List[bytes]
    timeout: Optional[float]
    tries: int  # -1: unlimited
    attempts: int


class StoredOutcome(NamedTuple):
    id: bytes
    code: bytes
    body: List[bytes]
    attempts: int
    tries: int
    finished: float  # time.time() when it finished
    payload: Optional[List[bytes]] = None  # dead (FAILED or TIMED_OUT): the request's payload
    timeout: Optional[float] = None  # dead: its per-attempt timeout


class StoreReport(NamedTuple):
    path: str
    version: int
    queued: int  # never sent to a worker
    in_flight: int  # sent at least once, not finished
    finished: int
    dead: int  # of the finished: FAILED or TIMED_OUT with their payload (the dead-letter)
    bytes: int
    sound: bool
    problems: List[str]
    format: str = "sqlite"  # or "log" (server/log_store.py)
    torn: int = 0  # log: bytes of an unfinished last write, left out (not a problem)


def encode_frames(frames: Sequence[bytes]) -> bytes:
    """Frames as one blob: count, then each frame's length and bytes."""
    parts = [_U32.pack(len(frames))]
    for frame in frames:
        parts.append(_U32.pack(len(frame)))
        parts.append(bytes(frame))
    return b"".join(parts)


def decode_frames(blob: bytes) -> List[bytes]:
    """The inverse of encode_frames; ValueError if the blob is not one."""
    view = memoryview(blob)
    if len(view) < 4:
        raise ValueError("frame blob too short")
    (count,) = _U32.unpack_from(view, 0)
    offset, frames = 4, []
    for _ in range(count):
        if offset + 4 > len(view):
            raise ValueError("frame blob truncated")
        (size,) = _U32.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise ValueError("frame blob truncated")
        frames.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(view):
        raise ValueError("frame blob has trailing bytes")
    return frames


def _fail(path: str, what: str) -> StoreError:
    return StoreError(f"store {path}: {what}")


class Store(Closeable):
    """An open store. ``sync`` is "full", "normal" or "off" (see SYNC_LEVELS)."""

    def __init__(self, path: str, sync: str = DEFAULT_SYNC) -> None:
        if sync not in SYNC_LEVELS:
            raise ConfigError(f"sync must be one of {', '.join(SYNC_LEVELS)}, not {sync!r}")
        self.path = os.fspath(path)
        self.sync = sync
        existed = os.path.exists(self.path)
        if existed and not os.path.isfile(self.path):
            raise _fail(self.path, "not a regular file")
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _fail(self.path, f"cannot open: {exc}") from None
        try:
            self._open(existed)
        except sqlite3.Error as exc:
            self._db.close()
            raise _fail(self.path, f"cannot be used: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _open(self, existed: bool) -> None:
        db = self._db
        if existed and os.path.getsize(self.path) > 0:
            self._check_existing()
        else:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute("BEGIN")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise _fail(self.path, f"cannot use WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous = {SYNC_LEVELS[self.sync]}")

    def _check_existing(self) -> None:
        db = self._db
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise _fail(self.path, f"not a fastbroker store or corrupt ({exc})") from None
        if app != APPLICATION_ID:
            raise _fail(self.path, "not a fastbroker store (another SQLite database)")
        row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None or not row[0].isdigit():
            raise _fail(self.path, "has no schema version: corrupt")
        version = int(row[0])
        if version not in READABLE_VERSIONS:
            raise _fail(self.path, f"is version {row[0]}; this fastbroker reads version {SCHEMA_VERSION}")
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _fail(self.path, f"is corrupt: {'; '.join(problems[:3])}")
        if version == 1:
            db.execute("BEGIN")
            for statement in _UPGRADE_FROM_1:
                db.execute(statement)
            db.execute("COMMIT")

    # -- what the broker does with it ------------------------------------------------

    def load(self) -> Tuple[List[StoredRequest], List[StoredOutcome]]:
        """Requests in arrival order and outcomes in finishing order. StoreError if a
        row cannot be read (the store is never silently cut down)."""
        try:
            requests = [
                StoredRequest(bytes(rid), decode_frames(payload), timeout, tries, attempts)
                for rid, payload, timeout, tries, attempts in self._db.execute(
                    "SELECT id, payload, timeout, tries, attempts FROM requests ORDER BY seq"
                )
            ]
            outcomes = [
                StoredOutcome(
                    bytes(rid),
                    bytes([code]),
                    decode_frames(body),
                    attempts,
                    tries,
                    finished,
                    None if payload is None else decode_frames(payload),
                    timeout,
                )
                for rid, code, body, attempts, tries, finished, payload, timeout in self._db.execute(
                    "SELECT id, code, body, attempts, tries, finished, payload, timeout FROM outcomes"
                    " ORDER BY finished, seq"
                )
            ]
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise _fail(self.path, f"has a row that cannot be read: {exc}") from None
        return requests, outcomes

    def apply(self, entries: Iterable[tuple], now: Optional[float] = None) -> int:
        """Write one turn's journal entries (BrokerCore.journal_take) in one
        transaction; returns how many. Each run of entries of one kind is one
        executemany per statement, in the entries' order (a request submitted and
        finished in the same turn is inserted, then deleted)."""
        finished_at = time.time() if now is None else now
        db = self._db
        count = 0
        db.execute("BEGIN")
        try:
            for kind, run in itertools.groupby(entries, key=lambda entry: entry[0]):
                rows = list(run)
                count += len(rows)
                if kind == "submit":
                    db.executemany(
                        "INSERT OR IGNORE INTO requests (id, payload, timeout, tries, attempts) VALUES (?, ?, ?, ?, 0)",
                        [(rid, encode_frames(payload), timeout, tries) for _, rid, payload, timeout, tries in rows],
                    )
                elif kind == "start":
                    db.executemany("UPDATE requests SET attempts = ? WHERE id = ?", [(e[2], e[1]) for e in rows])
                elif kind == "finish":
                    db.executemany("DELETE FROM requests WHERE id = ?", [(e[1],) for e in rows])
                    db.executemany(
                        "INSERT OR REPLACE INTO outcomes (id, code, body, attempts, tries, finished, payload, timeout)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                rid,
                                code[0],
                                encode_frames(body),
                                attempts,
                                tries,
                                finished_at,
                                encode_frames(payload) if payload else None,
                                timeout if payload else None,
                            )
                            for _, rid, code, body, attempts, tries, payload, timeout in rows
                        ],
                    )
                elif kind == "forget":
                    db.executemany("DELETE FROM outcomes WHERE id = ?", [(e[1],) for e in rows])
                else:
                    raise ValueError(f"unknown journal entry {kind!r}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return count

    def write_turn(self, core: Any) -> None:
        """Write the core's changes of this turn (BrokerCore.journal_take) in one transaction."""
        entries = core.journal_take()
        if entries:
            self.apply(entries)

    def maintain(self, pages: int = 256) -> None:
        """Fold the WAL into the database and give back free pages, a little at a time."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._db.execute(f"PRAGMA incremental_vacuum({int(pages)})")

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # closing anyway; the WAL is replayed on the next open
            db.close()
            self._db = None  # type: ignore[assignment]


def check(path: str) -> StoreReport:
    """What a store holds and whether it is sound, without changing it (read-only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _fail(path, "no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise _fail(path, f"cannot open: {exc}") from None
    try:
        try:
            app = db.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise _fail(path, f"not a fastbroker store or corrupt ({exc})") from None
        if app != APPLICATION_ID:
            raise _fail(path, "not a fastbroker store (another SQLite database)")
        # A file that is a store (its application id says so) but whose pages are
        # damaged is reported not sound (exit 1), with what could still be counted;
        # only what cannot be opened or is not a store is an error (exit 2).
        version: Optional[int] = 0
        queued = in_flight = finished = dead = unreadable = 0
        problems: List[str] = []
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            version = int(row[0]) if row and row[0].isdigit() else 0
        except sqlite3.DatabaseError as exc:
            version = None
            problems.append(f"cannot read the schema version: {exc}")
        try:
            problems += [r[0] for r in db.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        except sqlite3.DatabaseError as exc:
            problems.append(f"integrity check failed: {exc}")
        try:
            queued, in_flight = db.execute(
                "SELECT COALESCE(SUM(attempts = 0), 0), COALESCE(SUM(attempts > 0), 0) FROM requests"
            ).fetchone()
            finished = db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
            if version is not None and version >= 2:
                dead = db.execute("SELECT COUNT(*) FROM outcomes WHERE payload IS NOT NULL").fetchone()[0]
                blobs = "SELECT payload FROM requests UNION ALL SELECT body FROM outcomes"
                blobs += " UNION ALL SELECT payload FROM outcomes WHERE payload IS NOT NULL"
            else:
                blobs = "SELECT payload FROM requests UNION ALL SELECT body FROM outcomes"
            for (blob,) in db.execute(blobs):
                try:
                    decode_frames(blob)
                except (ValueError, TypeError):
                    unreadable += 1
        except sqlite3.DatabaseError as exc:
            problems.append(f"cannot read every row: {exc}")
    finally:
        db.close()
    if version is None:
        version = 0
    elif version not in READABLE_VERSIONS:
        problems.append(f"version {version}; this fastbroker reads version {SCHEMA_VERSION}")
    if unreadable:
        problems.append(f"{unreadable} row(s) whose frames cannot be decoded")
    return StoreReport(path, version, queued, in_flight, finished, dead, os.path.getsize(path), not problems, problems)
