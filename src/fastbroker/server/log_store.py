"""The log store: requests and outcomes in an append-only file of records, the default
``--store`` format (``--store-format log``).

Each broker turn's changes reach the file as one write: the core encodes them
(``BrokerCore.journal_encode``, in C for the compiled core) and ``LogStore.append``
writes and indexes them (``_select.log_index()``: server/_log_index.pyx or its pure
twin), with no Python object per change; only then does the broker release the
replies the core held back. The index knows which records are still live (queued
requests, kept outcomes): when the file has grown past COMPACT_RATIO times those (and
``compact_min``), they are copied into a new file that replaces it. Opening a store
reads it all back (fastbroker.log_records, for the broker to restore) and indexes it
where it is; an unfinished last write is cut off (and kept aside in PATH.torn).

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
import mmap
import os
import time
from typing import Any, Iterable, List, Optional, Tuple

from fastbroker._common import Closeable, ConfigError
from fastbroker._select import log_index
from fastbroker.log_records import LogContents, LogDamage, encode_entries, read_log
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
    """What the open log holds, read through a map of it (a file of any size)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return LogContents({}, {}, 0, 0)
    data = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        return read_log(data)
    except LogDamage as exc:
        raise _fail(path, f"is corrupt: {exc}") from None
    except ValueError:
        raise _fail(path, "not a fastbroker store") from None
    finally:
        try:
            data.close()
        except BufferError:
            pass  # a view of it lives on in a traceback: unmapped when that goes


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
        self._retry_at = 0  # after a failed compaction: the size to try again at
        self._broken = ""  # why appends are refused (a compaction that could not finish)
        self._fd = -1
        self._contents: Optional[LogContents] = None
        if os.path.exists(self.path) and not os.path.isfile(self.path):
            raise _fail(self.path, "not a regular file")
        try:
            fd = self._open_locked()
        except OSError as exc:
            raise _fail(self.path, f"cannot open: {exc.strerror or exc}") from None
        try:
            self._fd = fd
            self._open(fd)
        except OSError as exc:
            self._close_fd(fd)
            raise _fail(self.path, f"cannot be used: {exc.strerror or exc}") from None
        except BaseException:
            self._close_fd(fd)
            raise

    def _open_locked(self) -> int:
        """The store's file, open and locked. A compaction by another broker may rename
        a new file over it between the open and the lock: then the lock is on a file no
        longer the store's, so it is opened again (the other broker holds the new one:
        "in use")."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
                opened, named = os.fstat(fd), os.stat(self.path)
            except BaseException:
                os.close(fd)
                raise
            if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):
                return fd
            os.close(fd)
        raise _fail(self.path, "keeps being replaced while it is opened")

    def _open(self, fd: int) -> None:
        """Read what the file holds (for load()), leave out an unfinished last write
        (kept aside in PATH.torn), index the rest in place, and compact if due."""
        if os.fstat(fd).st_size == 0:
            os.pwrite(fd, LOG_MAGIC, 0)
            self._sync(fd)
        contents = _read(self.path, fd)
        if contents.torn:
            log.warning(
                "store %s: %d byte(s) of an unfinished last write left out (never acknowledged; kept in %s.torn)",
                self.path,
                contents.torn,
                self.path,
            )
            with open(self.path + ".torn", "wb") as aside:
                aside.write(os.pread(fd, contents.torn, contents.end))
            os.ftruncate(fd, contents.end)
            self._sync(fd)
        self._contents = contents
        module, _ = log_index()
        self._index = module.LogIndex(fd, contents.end)
        self._index.load(len(LOG_MAGIC))
        if self._compaction_due():
            self.compact()

    def _sync(self, fd: int) -> None:
        if self.sync != "off":
            os.fdatasync(fd)

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

    def _new_file(self) -> int:
        """A new file beside the store, locked, emptied, with the header written."""
        fd = os.open(self.path + ".new", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before emptying it: it may be another's
            os.ftruncate(fd, 0)
            os.pwrite(fd, LOG_MAGIC, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

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

    def write_turn(self, core: Any) -> None:
        """Write the core's changes of this turn as one write: the core encodes them
        (BrokerCore.journal_encode, in C when compiled), no Python object a change."""
        self.append(core.journal_encode(time.time()))

    def append(self, blob: bytes) -> None:
        """Write one turn's records (BrokerCore.journal_encode) and, with sync "full",
        sync them. OSError if they cannot be written: the broker must stop then."""
        if self._broken:
            raise OSError(errno.EIO, self._broken)
        if not blob:
            return
        self._index.append(blob)
        if self.sync == "full":
            os.fdatasync(self._fd)
        if self._compaction_due():
            self.compact()

    def _compaction_due(self) -> bool:
        size = self._index.size
        return size >= max(self.compact_min, COMPACT_RATIO * self._index.live_bytes, self._retry_at)

    def compact(self) -> None:
        """Copy the live records into a new file that replaces this one. A failure to
        write it is logged, the new file removed and the store left as it was (tried
        again once the file has doubled); a failure to put it in the store's place
        raises OSError, and the store refuses every write after (the broker stops)."""
        size = self._index.size
        fd = -1
        try:
            fd = self._new_file()
            self._index.compact(fd, len(LOG_MAGIC))
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            self._remove_new()
            self._retry_at = 2 * size
            log.warning("store %s: cannot compact: %s", self.path, exc.strerror or exc)
            return
        # The index writes to fd from now on: it must become the store, or nothing more
        # may be written (what was acknowledged is all in the old file still).
        try:
            self._sync(fd)
            os.rename(self.path + ".new", self.path)
            if self.sync != "off":
                _sync_directory(self.path)
        except OSError as exc:
            self._broken = f"a compaction could not take the store's place ({exc.strerror or exc}): restart the broker"
            raise
        os.close(self._fd)
        self._fd = fd
        self._retry_at = 0
        self.compactions += 1

    def _remove_new(self) -> None:
        try:
            os.unlink(self.path + ".new")
        except OSError:
            pass

    def maintain(self) -> None:
        """With sync "normal": sync what was written since the last time. OSError if
        that fails: what was written may never reach the disk (Linux forgets a failed
        write-back), so the broker must stop."""
        if self.sync == "normal" and self._fd >= 0:
            os.fdatasync(self._fd)

    @property
    def size(self) -> int:
        return self._index.size

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                self._sync(fd)
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
