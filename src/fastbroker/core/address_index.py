"""core/address_index.py: worker addresses as keys (twin of core/address_index.pxi).

Owns: address_key(), the key format.
Touches: nothing else. Users: IdleWorkers and WorkerSessions, with the same key
format, so a session's key finds the worker in the idle FIFO (as in the compiled
core, whose keys are the same bytes).

Compiled only (absent here): AddrIndex and its functions hash_bytes, aidx_find,
aidx_place, aidx_insert, aidx_delete, aidx_free (open addressing by hand; a dict
here). make_key is address_key here.
"""

from __future__ import annotations

from typing import Sequence


def address_key(routing_frames: Sequence) -> bytes:
    """Length-prefixed routing frames (4-byte little-endian lengths), as the compiled
    core keys its idle workers and sessions."""
    return b"".join(len(f).to_bytes(4, "little") + bytes(f) for f in routing_frames)
