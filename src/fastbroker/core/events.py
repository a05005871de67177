"""core/events.py: Events, the worker and abort events kept for BrokerCore.events()
(twin of core/events.pxi).

Owns: the queue of events.
Touches: Counters (events_lost). Users: WorkerSide (workers joined, left, dead),
Attempts (aborted, failed, timed out), BrokerCore (record_events, events, and run's
stop_on_event).
"""

from __future__ import annotations

from typing import List, Tuple

from fastbroker import protocol
from fastbroker.core import cdef
from fastbroker.core.counters import Counters

Event = Tuple[str, bytes, int]

# The kinds by index in protocol.EVENT_KINDS (EV_* in the generated _protocol.pxd).
EV_WORKER_JOINED = protocol.EVENT_KINDS.index("worker_joined")
EV_WORKER_LEFT = protocol.EVENT_KINDS.index("worker_left")
EV_WORKER_DEAD = protocol.EVENT_KINDS.index("worker_dead")
EV_ABORTED = protocol.EVENT_KINDS.index("aborted")
EV_FAILED = protocol.EVENT_KINDS.index("failed")
EV_TIMED_OUT = protocol.EVENT_KINDS.index("timed_out")


class Events:
    """Events since the last take(), oldest first, while recording is on."""

    __slots__ = ("queue", "on", "counters")

    def __init__(self, counters: Counters) -> None:
        self.queue: List[Event] = []
        self.on = False
        self.counters = counters

    @cdef
    def push(self, kind: int, data: bytes, number: int = 0) -> None:
        """Keep an event of `kind` (an index of protocol.EVENT_KINDS), if recording;
        counted in events_lost when the queue is full."""
        if not self.on:
            return
        if len(self.queue) >= protocol.EVENT_QUEUE:
            self.counters.add("events_lost")
            return
        self.queue.append((protocol.EVENT_KINDS[kind], bytes(data[: protocol.EVENT_DATA_MAX]), number))

    @cdef
    def record(self, on: bool) -> None:
        """Keep events from now on, or stop (and forget those kept)."""
        self.on = bool(on)
        if not on:
            self.queue.clear()

    @cdef
    def take(self) -> List[Event]:
        """The events since the last call, oldest first: (kind, data, n)."""
        events, self.queue = self.queue, []
        return events
