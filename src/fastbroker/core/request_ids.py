"""core/request_ids.py: RequestIds, the 16-byte FBC01 request id -> value index (twin
of core/request_ids.pxi).

Owns: its dict.
Touches: nothing else. Users: BrokerCore's ``ids`` (id -> the request, or the kept
outcome), shared by ClientSide and KeptOutcomes; tests use it alone.

Compiled only (absent here): CidIndex and its functions mix64, cid_hash, cid_tag,
cid_probe, cidx_find, cid_place, cid_move_some, cidx_insert, cidx_delete, cidx_free
(a dict here, which grows in one step: ``growing`` is always False).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from fastbroker import protocol
from fastbroker.core import cdef


class RequestIds:
    """The 16-byte request-id index on its own (for tests): id -> 32-bit value."""

    __slots__ = ("m",)

    def __init__(self, seed: Optional[int] = None) -> None:
        # The compiled index's hash seed; a dict needs none.
        self.m: Dict[bytes, Any] = {}

    @cdef
    def _key(self, key: bytes) -> bytes:
        if len(key) != protocol.REQUEST_ID_SIZE:
            raise ValueError("a request id is 16 bytes")
        return key

    # -- the core's interface ------------------------------------------------

    @cdef
    def entry(self, key: bytes) -> Any:
        """The value of key (a request or a kept outcome), or None."""
        return self.m.get(key)

    @cdef
    def prefetch(self, key: bytes) -> None:
        """Compiled: start bringing key's slot into the cache before a batch's lookups.
        Nothing to do in a dict (and ClientSide here does not call it)."""

    @cdef
    def add(self, key: bytes, value: Any) -> None:
        """Add key (not present) -> value, or point key at a new value."""
        self.m[key] = value

    @cdef
    def remove(self, key: bytes) -> None:
        """Remove key (from entry())."""
        self.m.pop(key, None)

    @cdef
    def clear(self) -> None:
        """Forget every id."""
        self.m.clear()

    # -- Python interface (tests) --------------------------------------------

    def insert(self, key: bytes, value: int) -> None:
        """Add key -> value; KeyError if key is there already."""
        ids = self.m
        if self._key(key) in ids:
            raise KeyError(key)
        ids[key] = value

    def get(self, key: bytes) -> Optional[int]:
        """The value of key, or None."""
        return self.m.get(self._key(key))

    def delete(self, key: bytes) -> bool:
        """Remove key; False if it was not there."""
        return self.m.pop(self._key(key), None) is not None

    @property
    def growing(self) -> bool:
        """Always False: a dict grows in one step."""
        return False

    def __len__(self) -> int:
        return len(self.m)
