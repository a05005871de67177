"""client/handoff.py: what the sync ``Client``'s callers hand its I/O thread, and how the
I/O thread hands the outcomes back (twin of client/_handoff.pxi, which client/_book.pyx
includes; the book module chosen by _select.client_book() gives these names).

- ``submit_command``: the I/O thread's "submit" command of one request (the book's
  ``Entry`` of it, entered as it is);
- ``submit_request``: a ``submit()``'s command and its ``RequestFuture``;
- ``map_commands``: a batch of ``Client.map``'s requests, each with a ``MapSlot``;
- ``MapSlot``: what a future does for a request of ``map``, for a fraction of the cost;
- ``deliver``: the book's way of resolving a future or a map slot.

Per request these run once in the caller's thread and once in the I/O thread, both
with the GIL: compiled, they are C calls instead of the interpreter's dozen.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Deque, Iterator, List, Optional, Tuple

from fastbroker.client.book import Entry
from fastbroker.client.futures import RequestFuture
from fastbroker.client.protocol import check_request_id, new_request_id, payload_frames, submit_message


class MapSlot:
    """A request of ``Client.map``: what a future does for it, for a fraction of the cost
    (a concurrent.futures.Future makes a Condition and an RLock, and its result() and
    set_result() take them: ~20 us a request between the two threads). The I/O thread
    fills it and wakes the map only when the map waits for this very one."""

    __slots__ = ("request_id", "value", "exc", "done", "waiter")

    def __init__(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.value: Any = None
        self.exc: Optional[BaseException] = None
        self.done = False
        self.waiter: Optional[threading.Event] = None

    def resolve(self, value: Any, exc: Optional[BaseException]) -> None:
        """In the I/O thread. Written before `waiter` is read, as the map writes `waiter`
        before reading `done`: under the GIL, one of the two sees the other's write."""
        if self.done:
            return  # told its outcome once
        self.value, self.exc = value, exc
        self.done = True
        waiter = self.waiter
        if waiter is not None:
            waiter.set()

    def result(self, event: threading.Event) -> Any:
        """In the map's thread: the answer, waiting on `event` (the map's) if need be."""
        if not self.done:
            self.waiter = event
            while not self.done:
                event.wait()
                event.clear()  # then `done` is read again: a set() in between is not lost
        if self.exc is not None:
            raise self.exc
        return self.value


def deliver(future: Any, value: Any, exc: Optional[BaseException]) -> None:
    """Resolve a map slot or a future; a future resolved already (cancelled by its owner
    meanwhile) is left as it is."""
    if type(future) is MapSlot:
        future.resolve(value, exc)
        return
    # Straight from PENDING to FINISHED (no set_running_or_notify_cancel: one lock
    # round less per request); a future cancelled meanwhile refuses it below.
    try:
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)
    except (RuntimeError, concurrent.futures.InvalidStateError):
        pass  # resolved already: a future is told its outcome once


def submit_command(payload: Any, options: bytes, request_id: bytes, sink: Any) -> Entry:
    """The I/O thread's "submit" command of one request: the book's Entry of it, with its
    FBC01 SUBMIT message and `sink` (a future or a map slot: it gets the outcome)."""
    frames, multipart = payload_frames(payload)
    return Entry(request_id, submit_message(request_id, options, frames), sink, multipart)


def submit_request(
    payload: Any, options: bytes, request_id: Optional[bytes], on_cancel: Callable[[RequestFuture], None]
) -> Tuple[Entry, RequestFuture]:
    """A submit()'s command and its future, whose ``cancel()`` calls `on_cancel`; the id is
    `request_id` checked (check_request_id), or a new one for None."""
    rid = new_request_id() if request_id is None else check_request_id(request_id)
    future = RequestFuture(rid, on_cancel)
    return submit_command(payload, options, rid, future), future


def map_commands(
    source: Iterator[Any], room: int, options: bytes, in_flight: Deque[Any], slot_type: Any = MapSlot
) -> Tuple[List[Entry], bool]:
    """Up to `room` requests of ``map`` from `source`: their submit commands, each with a
    new slot (a `slot_type` of its id: the AsyncClient's are its own) appended to
    `in_flight` (none if a payload or the source raises), and whether `source` ended."""
    commands: List[Entry] = []
    slots: List[Any] = []
    for _ in range(room):
        try:
            payload = next(source)
        except StopIteration:
            in_flight.extend(slots)
            return commands, True
        slot = slot_type(new_request_id())
        commands.append(submit_command(payload, options, slot.request_id, slot))
        slots.append(slot)
    # Only now: if a payload (or the source) raised, no slot of this batch, which the
    # client never got, is left for the map to cancel.
    in_flight.extend(slots)
    return commands, False
