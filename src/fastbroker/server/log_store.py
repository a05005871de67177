"""The log store: requests and outcomes in an append-only file of records, the default
``--store`` format (``--store-format log``).

Each broker turn's changes reach the file as one write: the core encodes them
(``BrokerCore.journal_encode``, in C for the compiled core) and ``LogStore.append``
writes and indexes them (``_select.log_index()``: server/_log_index.pyx or its pure
twin), with no Python object per change; only then does the broker release the
replies the core held back. The index knows which records are still live (queued
requests, kept outcomes): when the file has grown past COMPACT_RATIO times those (and
``compact_min``), they are copied into a new file that replaces it. Opening a store
reads it all back (fastbroker.log_records) and starts it anew, compacted.

Promises by ``sync`` (as the SQLite store's): "full" syncs every turn's write before its
replies go (an ACCEPTED request survives power loss); "normal" syncs at each upkeep and
compaction (a crash of the broker process loses nothing: every write is in the OS's
cache before a reply goes; power loss may lose the last seconds); "off" never syncs.
See docs/ARCHITECTURE.md, "The log store".
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from typing import Iterable, List, Optional, Tuple

from fastbroker._common import Closeable, ConfigError
from fastbroker._select import log_index
from fastbroker.log_records import LogContents, LogDamage, encode_entries, encode_finish, encode_submit, read_log
from fastbroker.protocol import LOG_MAGIC
from fastbroker.server.store import (
    DEFAULT_SYNC,
    SYNC_LEVELS,
    StoredOutcome,
    StoredRequest,
    StoreError,
    StoreReport,
)

log = logging.getLogger("fastbroker.store")

LOG_VERSION = 1
"""The version in LOG_MAGIC's last three characters; reported by check()."""
COMPACT_MIN = 64 << 20
"""Bytes a log grows to before it is compacted, however little of it is live."""
COMPACT_RATIO = 4
"""A log is compacted when it is this many times its live records (and COMPACT_MIN):
each compaction copies the live records once, so a written byte costs at most
1 / (COMPACT_RATIO - 1) bytes of copying. With 2, a broker keeping ~400,000 outcomes
spent a fifth of its loop copying them (bench.store_throughput --jobs 3000000)."""


def _fail(path: str, what: str) -> StoreError:
    return StoreError(f"store {path}: {what}")


def _read(path: str, fd: int) -> LogContents:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    if len(data) < size:
        raise _fail(path, "changed while it was read")
    try:
        return read_log(data)
    except LogDamage as exc:
        raise _fail(path, f"is corrupt: {exc}") from None
    except ValueError:
        raise _fail(path, "not a fastbroker store") from None


def _sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LogStore(Closeable):
    """An open log store. ``sync`` is "full", "normal" or "off" (see SYNC_LEVELS)."""

    format = "log"

    def __init__(self, path: str, sync: str = DEFAULT_SYNC, compact_min: int = COMPACT_MIN) -> None:
        if sync not in SYNC_LEVELS:
            raise ConfigError(f"sync must be one of {', '.join(SYNC_LEVELS)}, not {sync!r}")
        self.path = os.fspath(path)
        self.sync = sync
        self.compact_min = compact_min
        self.compactions = 0
        self._fd = -1
        self._contents: Optional[LogContents] = None
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise _fail(self.path, "not a regular file")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _fail(self.path, f"cannot open: {exc.strerror}") from None
        try:
            self._lock(fd)
            contents = _read(self.path, fd) if os.fstat(fd).st_size else None
            if contents is not None and contents.torn:
                log.warning(
                    "store %s: %d byte(s) of an unfinished last write left out (never acknowledged)",
                    self.path,
                    contents.torn,
                )
            self._contents = contents
            self._fd = fd
            self._start_anew(contents)
        except OSError as exc:
            self._close_fd(fd)
            raise _fail(self.path, f"cannot be used: {exc.strerror or exc}") from None
        except BaseException:
            self._close_fd(fd)
            raise

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise _fail(self.path, "is in use by another broker") from None
            raise

    @staticmethod
    def _close_fd(fd: int) -> None:
        if fd >= 0:
            os.close(fd)

    def _start_anew(self, contents: Optional[LogContents]) -> None:
        """Write what `contents` holds to a new file that takes the store's place:
        the outcomes oldest first, then the requests in arrival order."""
        records: List[bytes] = []
        if contents is not None:
            for rid, o in sorted(contents.outcomes.items(), key=lambda item: item[1].finished):
                records.append(
                    encode_finish(rid, o.code, o.body, o.attempts, o.tries, o.payload or [], o.timeout, o.finished)
                )
            for rid, r in contents.requests.items():
                records.append(encode_submit(rid, r.payload, r.timeout, r.tries, r.attempts))
        module, _ = log_index()
        fd = self._new_file()
        try:
            index = module.LogIndex(fd, len(LOG_MAGIC))
            index.append(b"".join(records))
            self._replace(fd)
        except BaseException:
            os.close(fd)
            raise
        self._index = index

    def _new_file(self) -> int:
        """A new file beside the store, locked, with the header written."""
        fd = os.open(self.path + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._lock(fd)
            os.pwrite(fd, LOG_MAGIC, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _replace(self, fd: int) -> None:
        """The new file, complete, takes the store's name; the old one is closed."""
        if self.sync != "off":
            os.fsync(fd)
        os.rename(self.path + ".new", self.path)
        if self.sync != "off":
            _sync_directory(self.path)
        os.close(self._fd)
        self._fd = fd

    # -- what the broker does with it ------------------------------------------------

    def load(self) -> Tuple[List[StoredRequest], List[StoredOutcome]]:
        """What the store held when opened: requests in arrival order and outcomes in
        finishing order. Once only (it is not kept after)."""
        contents, self._contents = self._contents, None
        if contents is None:
            return [], []
        requests = [
            StoredRequest(rid, r.payload, r.timeout, r.tries, r.attempts) for rid, r in contents.requests.items()
        ]
        outcomes = [
            StoredOutcome(rid, bytes([o.code]), o.body, o.attempts, o.tries, o.finished, o.payload, o.timeout)
            for rid, o in sorted(contents.outcomes.items(), key=lambda item: item[1].finished)
        ]
        return requests, outcomes

    def apply(self, entries: Iterable[tuple], now: Optional[float] = None) -> int:
        """Write journal entries (BrokerCore.journal_take's tuples) as one write;
        returns how many. An entry of an unknown kind: ValueError, nothing written."""
        entries = list(entries)
        self.append(encode_entries(entries, time.time() if now is None else now))
        return len(entries)

    def append(self, blob: bytes) -> None:
        """Write one turn's records (BrokerCore.journal_encode) and, with sync "full",
        sync them. OSError if they cannot be written: the broker must stop then."""
        if not blob:
            return
        self._index.append(blob)
        if self.sync == "full":
            os.fdatasync(self._fd)
        size = self._index.size
        if size >= self.compact_min and size >= COMPACT_RATIO * self._index.live_bytes:
            self.compact()

    def compact(self) -> None:
        """Copy the live records into a new file that replaces this one. A failure to
        write it is logged and leaves the store as it was (retried at the next
        growth); a failure to rename it raises OSError."""
        try:
            fd = self._new_file()
        except OSError as exc:
            log.warning("store %s: cannot compact: %s", self.path, exc.strerror or exc)
            self.compact_min *= 2
            return
        try:
            self._index.compact(fd, len(LOG_MAGIC))
        except OSError as exc:
            os.close(fd)
            log.warning("store %s: cannot compact: %s", self.path, exc.strerror or exc)
            self.compact_min *= 2
            return
        self._replace(fd)  # the index writes to fd now: a failure here is the store's
        self.compactions += 1

    def maintain(self) -> None:
        """With sync "normal": sync what was written since the last time."""
        if self.sync == "normal":
            os.fdatasync(self._fd)

    @property
    def size(self) -> int:
        return self._index.size

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                if self.sync != "off":
                    os.fdatasync(fd)
            finally:
                os.close(fd)


def check(path: str) -> StoreReport:
    """What a log store holds and whether it is sound, without changing it."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _fail(path, f"cannot open: {exc.strerror}") from None
    problems: List[str] = []
    try:
        size = os.fstat(fd).st_size
        try:
            contents = _read(path, fd)
        except StoreError as exc:
            if "is corrupt" not in str(exc):
                raise
            problems.append(str(exc).split(": ", 1)[1])
            contents = LogContents({}, {}, 0, 0)
    finally:
        os.close(fd)
    requests, outcomes = contents.requests.values(), contents.outcomes.values()
    return StoreReport(
        path,
        LOG_VERSION,
        sum(1 for r in requests if not r.attempts),
        sum(1 for r in requests if r.attempts),
        len(outcomes),
        sum(1 for o in outcomes if o.payload is not None),
        size,
        not problems,
        problems,
        "log",
        contents.torn,
    )
