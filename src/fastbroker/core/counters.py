"""core/counters.py: Counters, the broker's counters since start, its drops by reason
and the latency histogram of answered requests (twin of core/counters.pxi).

Owns: those numbers.
Touches: nothing else. Every part that counts holds a reference to the one instance
(and counts by name, where the compiled parts count by index: CNT_*).
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Union

import zmq

from fastbroker import protocol
from fastbroker.core import cdef

_BOUNDS = protocol.LATENCY_BOUNDS


class Counters:
    """Counters by name (protocol.COUNTERS), drops by reason, the last drop and the
    latency histogram."""

    __slots__ = ("counts", "drops", "last_drop", "latency_counts", "latency_sum")

    def __init__(self) -> None:
        self.counts: Dict[str, int] = dict.fromkeys(protocol.COUNTERS, 0)
        self.drops: List[int] = [0] * len(protocol.DROP_REASONS)
        self.last_drop = -1  # reason of the latest dropped message, -1: none
        self.latency_counts: List[int] = [0] * (len(_BOUNDS) + 1)
        self.latency_sum = 0.0

    @cdef
    def add(self, which: str) -> None:
        """Count one more `which` (a name of protocol.COUNTERS)."""
        self.counts[which] += 1

    @cdef
    def drop(self, reason: int) -> None:
        """A message was dropped for `reason` (a protocol.DROP_* code)."""
        self.counts["dropped"] += 1
        self.drops[reason] += 1
        self.last_drop = reason

    @cdef
    def reply_lost(self, e: Optional[int]) -> int:
        """A reply to a client failed at its first frame (the requests ROUTER has
        ROUTER_MANDATORY) with errno e: count it as dropped (EAGAIN: the client's pipe is
        at its high-water mark, it is not reading) or unroutable (it has disconnected).
        Returns -e for ETERM (the broker is closing: not counted; the caller raises), else 1."""
        if e == zmq.ETERM:
            return -zmq.ETERM
        self.counts["replies_dropped" if e == zmq.EAGAIN else "replies_unroutable"] += 1
        return 1

    @cdef
    def record_latency(self, seconds: float) -> None:
        """An answered request spent `seconds` in the broker."""
        self.latency_counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    @cdef
    def counts_dict(self) -> Dict[str, int]:
        """The counters by name (a new dict)."""
        return dict(self.counts)

    @cdef
    def drops_dict(self) -> Dict[str, int]:
        """The drops by reason text, only the reasons that happened."""
        return {protocol.DROP_REASONS[i]: n for i, n in enumerate(self.drops) if n}

    @cdef
    def latency_dict(self) -> Dict[str, Union[tuple, List[int], int, float]]:
        """The latency histogram: bounds, counts per bucket (the last: above them),
        count and sum."""
        return {
            "bounds": _BOUNDS,
            "counts": list(self.latency_counts),
            "count": sum(self.latency_counts),
            "sum": self.latency_sum,
        }
