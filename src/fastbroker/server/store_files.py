"""Which kind of store a file is, and opening or checking it as that kind.

Two formats: "log" (server/log_store.py, the default for a new store: an append-only
file written once a broker turn from the core's C journal) and "sqlite"
(server/store.py, the format of fastbroker 0.x's first stores, kept for those and for
users who want to query their store with SQL). An existing file is always opened in
its own format; ``--store-format`` chooses the format of a new one.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from fastbroker._common import ConfigError
from fastbroker.protocol import LOG_MAGIC
from fastbroker.server import log_store, store
from fastbroker.server.log_store import LogStore
from fastbroker.server.store import DEFAULT_SYNC, Store, StoreError, StoreReport

STORE_FORMATS = ("log", "sqlite")
DEFAULT_STORE_FORMAT = "log"
SQLITE_MAGIC = b"SQLite format 3\x00"

AnyStore = Union[LogStore, Store]


def _not_a_store(path: str) -> StoreError:
    return StoreError(f"store {path}: not a fastbroker store (neither a log nor an SQLite store)")


def file_format(path: str) -> Optional[str]:
    """ "log", "sqlite", "unknown", or None for a file that is missing or empty (or not
    a regular file: the store says what is wrong with it)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError:
        return None
    if head.startswith(LOG_MAGIC):
        return "log"
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    return "unknown"


def open_store(path: str, sync: str = DEFAULT_SYNC, store_format: Optional[str] = None) -> AnyStore:
    """The store at `path`, opened in its own format; a new one in `store_format`
    (default: DEFAULT_STORE_FORMAT). StoreError if the file is not a store, or is one of
    another format than `store_format` asks."""
    if store_format is not None and store_format not in STORE_FORMATS:
        raise ConfigError(f"store format must be one of {', '.join(STORE_FORMATS)}, not {store_format!r}")
    path = os.fspath(path)
    found = file_format(path)
    if found == "unknown":
        raise _not_a_store(path)
    if found is not None and store_format is not None and found != store_format:
        raise StoreError(f"store {path}: is a {found} store, not {store_format} (--store-format)")
    kind = found or store_format or DEFAULT_STORE_FORMAT
    return LogStore(path, sync) if kind == "log" else Store(path, sync)


def check_store(path: str) -> StoreReport:
    """What the store at `path` holds and whether it is sound, whatever its format,
    without changing it. StoreError if it cannot be read or is not a store."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreError(f"store {path}: no such file")
    found = file_format(path)
    if found == "log":
        return log_store.check(path)
    if found == "sqlite":
        return store.check(path)
    raise _not_a_store(path)
