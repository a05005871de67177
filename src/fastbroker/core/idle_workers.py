"""core/idle_workers.py: IdleWorkers, the FIFO of workers ready for a job, with O(1)
removal by address (twin of core/idle_workers.pxi).

Owns: its ordered dict of address key -> entry. An entry is a REQ worker's envelope
(routing frames and delimiter) or an FBW01 worker's session (worker_sessions.Sess).
Touches: nothing else. Users: WorkerSessions.offer (FBW01 workers with spare credit),
WorkerSide (REQ workers' "ready", dispatch), ClientSide (whether any is idle).

Compiled only (absent here): alloc and release (slot memory; a dict entry is made
and freed with the entry).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from fastbroker.core import cdef
from fastbroker.core.address_index import address_key


class IdleWorkers:
    """Workers that asked for a job, oldest first.

    A worker is known by its address (the routing frames before the delimiter);
    a second "ready" from the same address replaces its first one in O(1).
    """

    __slots__ = ("workers",)

    def __init__(self) -> None:
        self.workers: OrderedDict[bytes, Any] = OrderedDict()

    @cdef
    def clear(self) -> None:
        """Forget every worker."""
        self.workers.clear()

    @cdef
    def find(self, key: bytes) -> Any:
        """The entry of the idle worker with this address key, or None."""
        return self.workers.get(key)

    @cdef
    def push_key(self, key: bytes, entry: Any) -> None:
        """Append a worker. A worker already idle at that address is replaced: its
        earlier "ready" is stale."""
        workers = self.workers
        workers.pop(key, None)
        workers[key] = entry

    @cdef
    def push_env(self, env: list) -> None:
        """An original REQ worker is ready: its routing frames, delimiter included."""
        self.push_key(address_key(env[:-1]), env)

    @cdef
    def remove_slot(self, key: bytes) -> None:
        """Forget the idle worker with this address key, if it is idle."""
        self.workers.pop(key, None)

    @cdef
    def pop_slot(self) -> Any:
        """The oldest idle worker's entry, removed; None if there is none."""
        if not self.workers:
            return None
        return self.workers.popitem(last=False)[1]

    # -- Python interface (tests, benchmarks) ------------------------------

    @cdef
    def _key_slot(self, address: bytes) -> Optional[bytes]:
        if len(address) > 255:
            return None  # too long to have been pushed
        key = address_key([address])
        return key if key in self.workers else None

    def push(self, address: bytes) -> None:
        """Mark the worker at `address` idle (again: its earlier entry is replaced)."""
        if len(address) > 255:
            raise ValueError("a worker address is at most 255 bytes")
        self.push_key(address_key([address]), [address, b""])

    def pop(self) -> Optional[bytes]:
        """Address of the oldest idle worker, removed; None if there is none."""
        env = self.pop_slot()
        return None if env is None else bytes(env[0])

    def remove(self, address: bytes) -> bool:
        """Forget an idle worker; False if it was not idle."""
        key = self._key_slot(address)
        if key is None:
            return False
        self.remove_slot(key)
        return True

    def __contains__(self, address: bytes) -> bool:
        return self._key_slot(address) is not None

    def __len__(self) -> int:
        return len(self.workers)
