"""core/deadline_heap.py: DeadlineHeap, the attempts' deadlines, soonest first (twin
of core/deadline_heap.pxi).

Owns: its heap list and key -> entry index.
Touches: nothing else. Users: Attempts (expiry), WorkerSide (dispatch, FAILED,
forget), ClientSide (cancel); the core's keys are request objects (tests use ints).

Removal marks the entry dead (O(1)); dead entries are skipped when they surface and
purged when they outnumber live ones.

Compiled only (absent here): _place, _sift_up, _sift_down (the binary heap by hand;
heapq here).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Dict, List, Optional, Tuple

from fastbroker import protocol
from fastbroker.core import cdef


class DeadlineHeap:
    """Attempt deadlines, soonest first. Removal marks the entry dead (O(1)); dead
    entries are skipped when they surface and purged when they outnumber live ones."""

    __slots__ = ("heap", "entries", "seq")

    def __init__(self) -> None:
        self.heap: List[list] = []  # [deadline, seq, key, alive]
        self.entries: Dict[Any, list] = {}
        self.seq = itertools.count()

    @cdef
    def clear(self) -> None:
        """Forget every deadline."""
        self.heap = []
        self.entries.clear()

    @cdef
    def insert(self, key: Any, deadline: float) -> None:
        """Add or move key's deadline."""
        if key in self.entries:
            self.delete(key)
        entry = [float(deadline), next(self.seq), key, True]
        self.entries[key] = entry
        heapq.heappush(self.heap, entry)

    @cdef
    def delete(self, key: Any) -> bool:
        """Forget key's deadline; False if it had none."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        entry[3] = False
        heap = self.heap
        if len(heap) > 64 and len(heap) > 2 * len(self.entries):
            self.heap = heap = [e for e in heap if e[3]]
            heapq.heapify(heap)
        return True

    @cdef
    def pop_min(self) -> Any:
        """Remove and return the soonest key; the heap must not be empty."""
        heap = self.heap
        while not heap[0][3]:
            heapq.heappop(heap)
        key = heapq.heappop(heap)[2]
        del self.entries[key]
        return key

    # -- Python interface ---------------------------------------------------

    def push(self, key: int, deadline: float) -> None:
        """Set key's deadline (an existing one is replaced)."""
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            raise ValueError(f"key must be in [0, {protocol.HEAP_KEY_LIMIT})")
        self.insert(key, deadline)

    def remove(self, key: int) -> bool:
        """Forget key's deadline; False if it had none."""
        return self.delete(key)

    def peek(self) -> Optional[Tuple[float, Any]]:
        """(deadline, key) of the soonest deadline, or None."""
        heap = self.heap
        while heap and not heap[0][3]:
            heapq.heappop(heap)
        return (heap[0][0], heap[0][2]) if heap else None

    def pop(self) -> Tuple[float, Any]:
        """Remove and return (deadline, key) of the soonest deadline; IndexError if empty."""
        heap = self.heap
        while heap and not heap[0][3]:
            heapq.heappop(heap)
        if not heap:
            raise IndexError("pop from an empty DeadlineHeap")
        deadline, _, key, _ = heapq.heappop(heap)  # pop_min(), keeping the deadline
        del self.entries[key]
        return (deadline, key)

    def __len__(self) -> int:
        return len(self.entries)
