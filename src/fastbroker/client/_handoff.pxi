# client/_handoff.pxi, included by client/_book.pyx: what the sync Client's callers hand
# its I/O thread, and how the I/O thread hands the outcomes back (twin of
# client/handoff.py, same names and behaviour). Compiled, a request of map costs the
# map's thread a few C calls (an id from a block, a slot, a list) and the I/O thread
# one C call to resolve it, where the interpreter ran a dozen calls on each side.

import concurrent.futures
import os

from fastbroker.client.futures import RequestFuture as _RequestFuture
from fastbroker.client.protocol import ID_BATCH, check_request_id, payload_frames

from concurrent.futures._base import FINISHED as _FINISHED, PENDING as _PENDING

# Request ids are drawn ID_BATCH at a time, as protocol.new_request_id's (which says
# why), into a block of their own here.
cdef bytes _id_block = b""
cdef Py_ssize_t _id_at = 0


cdef bytes _new_request_id():
    """A random (version 4) uuid's 16 bytes, as protocol.new_request_id()."""
    global _id_block, _id_at
    cdef bytes request_id
    cdef unsigned char *at
    if _id_at + _ID > PyBytes_GET_SIZE(_id_block):
        block = os.urandom(_ID * ID_BATCH)  # releases the GIL: the block is taken after
        _id_block, _id_at = block, 0
    request_id = PyBytes_FromStringAndSize(PyBytes_AS_STRING(_id_block) + _id_at, _ID)
    _id_at += _ID
    # The version (4) and variant (RFC 4122) bits, as uuid.uuid4() sets them; the bytes
    # object is new and ours alone.
    at = <unsigned char *>PyBytes_AS_STRING(request_id)
    at[6] = (at[6] & 0x0F) | 0x40
    at[8] = (at[8] & 0x3F) | 0x80
    return request_id


def _forget_request_ids():
    """A forked child must not hand out the ids its parent will."""
    global _id_block, _id_at
    _id_block, _id_at = b"", 0


os.register_at_fork(after_in_child=_forget_request_ids)


cdef class MapSlot:
    """A request of ``Client.map``: what a future does for it, for a fraction of the cost
    (client/handoff.py's MapSlot, compiled)."""

    cdef readonly bytes request_id
    cdef object value
    cdef object exc
    cdef readonly bint done
    cdef object waiter

    def __init__(self, bytes request_id):
        self.request_id = request_id

    cpdef resolve(self, value, exc):
        """In the I/O thread. Written before `waiter` is read, as the map writes `waiter`
        before reading `done`: under the GIL, one of the two sees the other's write."""
        if self.done:
            return  # told its outcome once
        self.value, self.exc = value, exc
        self.done = True
        waiter = self.waiter
        if waiter is not None:
            waiter.set()

    cpdef result(self, event):
        """In the map's thread: the answer, waiting on `event` (the map's) if need be."""
        if not self.done:
            self.waiter = event
            while not self.done:
                event.wait()
                event.clear()  # then `done` is read again: a set() in between is not lost
        if self.exc is not None:
            raise self.exc
        return self.value


cpdef deliver(future, value, exc):
    """Resolve a map slot or a future; a future resolved already (cancelled by its owner
    meanwhile) is left as it is."""
    if type(future) is MapSlot:
        (<MapSlot>future).resolve(value, exc)
        return
    if type(future) is _RequestFuture and future._made is None and future._state == _PENDING:
        # RequestFuture._settle without its lock: nobody waits (no Condition yet), and
        # these reads and writes are one step under the GIL (plain attributes, no Python
        # code runs between them), which is all the lock gives the pure code. A
        # Condition made from now on finds the outcome there (client/futures.py).
        future._result = value
        future._exception = exc
        future._state = _FINISHED
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


cpdef Entry submit_command(payload, bytes options, bytes request_id, sink):
    """The I/O thread's "submit" command of one request: the book's Entry of it, with its
    FBC01 SUBMIT message and `sink` (a future or a map slot: it gets the outcome)."""
    cdef list message
    if type(payload) is bytes:
        return _new_entry(request_id, [_SIG, _SUBMIT, request_id, options, payload], sink, False)
    frames, multipart = payload_frames(payload)
    message = [_SIG, _SUBMIT, request_id, options]
    message.extend(frames)
    return _new_entry(request_id, message, sink, multipart)


def submit_request(payload, bytes options, request_id, on_cancel):
    """A submit()'s command and its future, whose ``cancel()`` calls `on_cancel`; the id is
    `request_id` checked (check_request_id), or a new one for None."""
    cdef bytes rid = _new_request_id() if request_id is None else check_request_id(request_id)
    future = _RequestFuture(rid, on_cancel)
    return submit_command(payload, options, rid, future), future


def map_commands(source, Py_ssize_t room, bytes options, in_flight, slot_type=MapSlot):
    """Up to `room` requests of ``map`` from `source`: their submit commands, each with a
    new slot (a `slot_type` of its id: the AsyncClient's are its own) appended to
    `in_flight` (none if a payload or the source raises), and whether `source` ended."""
    cdef list commands = [], slots = []
    cdef bytes request_id
    cdef Py_ssize_t i
    cdef bint own = slot_type is MapSlot
    for i in range(room):
        try:
            payload = next(source)
        except StopIteration:
            in_flight.extend(slots)
            return commands, True
        request_id = _new_request_id()
        slot = MapSlot(request_id) if own else slot_type(request_id)
        commands.append(submit_command(payload, options, request_id, slot))
        slots.append(slot)
    # Only now: if a payload (or the source) raised, no slot of this batch, which the
    # client never got, is left for the map to cancel.
    in_flight.extend(slots)
    return commands, False
