# cython: language_level=3
# client/_book.pyx: RequestBook compiled (twin of client/book.py, same names and the same
# behaviour; _select.client_book() chooses).
#
# The book is Python objects all the same (dicts of ids, futures, frames): what this
# saves is the interpreter's work per request, a dozen method calls and attribute
# lookups on the submit, flush, reply and delivery paths, which are C calls and struct
# fields here. The rare paths (queries, dead-letter commands, UNKNOWN, the fall-back)
# keep the pure code's shape, line for line.

import logging
import time
from collections import deque

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy, memset

from fastbroker.client.protocol import (
    ADMIN_KINDS,
    CHECK_BATCH,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    OUTCOME_KINDS,
    SUBMIT_PAYLOAD_AT,
    _cancelled_reply,
    cancel_message,
    decode_reply,
    result_message,
    stats_message,
    status_message,
)
from fastbroker.protocol import (
    C_SUBMIT,
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    MAX_BATCH,
    PEER_MAX_FRAMES,
    REPLY_RECORD_SIZE,
    REQUEST_ID_SIZE,
    SUBMIT_RECORD_SIZE,
    R_ACCEPTED,
    R_DEAD,
    R_OK,
    R_REJECTED,
    R_REPLIES,
    R_REQUEUED,
    R_STATUS,
    R_UNKNOWN,
)

log = logging.getLogger("fastbroker.client")

cdef Py_ssize_t _PAYLOAD_AT = SUBMIT_PAYLOAD_AT
cdef bytes _SIG_V2 = CLIENT_SIGNATURE_V2
cdef bytes _SIG = CLIENT_SIGNATURE
cdef bytes _SUBMIT = C_SUBMIT
cdef Py_ssize_t _RECORD = SUBMIT_RECORD_SIZE
cdef Py_ssize_t _ID = REQUEST_ID_SIZE
cdef Py_ssize_t _OPTIONS = SUBMIT_RECORD_SIZE - REQUEST_ID_SIZE - 2  # flags, timeout, tries
cdef Py_ssize_t _MAX_BATCH = MAX_BATCH
cdef Py_ssize_t _PEER_MAX_FRAMES = PEER_MAX_FRAMES
cdef Py_ssize_t _REPLY_RECORD = REPLY_RECORD_SIZE
cdef bytes _REPLIES = R_REPLIES
cdef unsigned char _OK_CODE = R_OK[0]
cdef unsigned char _ACCEPTED_CODE = R_ACCEPTED[0]


def submit_batches(list submits):
    """FBC02 SUBMIT messages for FBC01 SUBMIT messages ``[FBC01, SUBMIT, id, options,
    payload...]`` (client/protocol.py's submit_batch_messages, which takes their parts):
    as few as MAX_BATCH records and PEER_MAX_FRAMES frames a message allow, in order. The
    header is written in place."""
    cdef list messages = [], frames, m
    cdef Py_ssize_t start = 0, end, count, payload_frames, n, i, k, total = len(submits)
    cdef bytes header, request_id, options
    cdef char *at
    while start < total:
        count = payload_frames = 0
        end = start
        while end < total:
            n = len(<list>submits[end]) - _PAYLOAD_AT
            # [signature, SUBMIT, header] and the payloads' frames.
            if count and (count == _MAX_BATCH or payload_frames + n + 3 > _PEER_MAX_FRAMES):
                break
            count += 1
            payload_frames += n
            end += 1
        header = PyBytes_FromStringAndSize(NULL, count * _RECORD)
        at = PyBytes_AS_STRING(header)
        frames = [_SIG_V2, _SUBMIT, header]
        for i in range(start, end):
            m = submits[i]
            request_id, options = m[2], m[3]
            if PyBytes_GET_SIZE(request_id) != _ID:
                raise ValueError("a request id is 16 bytes")
            # A record is the id, the FBC01 options' 9 bytes (zeros for an empty
            # options frame) and the payload's frame count.
            memcpy(at, PyBytes_AS_STRING(request_id), _ID)
            if PyBytes_GET_SIZE(options) == _OPTIONS:
                memcpy(at + _ID, PyBytes_AS_STRING(options), _OPTIONS)
            else:
                memset(at + _ID, 0, _OPTIONS)
            n = len(m) - _PAYLOAD_AT
            at[_RECORD - 2] = <char>((n >> 8) & 0xFF)
            at[_RECORD - 1] = <char>(n & 0xFF)
            at += _RECORD
            for k in range(_PAYLOAD_AT, len(m)):
                frames.append(m[k])
        messages.append(frames)
        start = end
    return messages


cdef class _Sink:
    """A further future waiting for an entry's outcome (the first is in the entry)."""

    cdef public object future
    cdef public bint multipart

    def __init__(self, future, bint multipart):
        self.future = future
        self.multipart = multipart


cdef Py_ssize_t _payload_size(object message) except -1:
    cdef Py_ssize_t size = 0, i
    if message is None:
        return 0
    if type(message) is not list:  # (an Entry made by hand: as the pure one reads it)
        return sum(map(len, message[_PAYLOAD_AT:]))
    for i in range(_PAYLOAD_AT, len(<list>message)):
        size += len((<list>message)[i])
    return size


cdef class Entry:
    """An id this client waits for an outcome of. A submit command is one too: made in the
    caller's thread (_handoff.pxi's submit_command), it is entered in the book as it is,
    so a request costs no command object besides (client/book.py's Entry)."""

    cdef public bytes request_id
    # The SUBMIT message, kept to submit it again if the broker loses it; None for an
    # id only watched with RESULT (it cannot be re-submitted).
    cdef public object message
    # The first future waiting for the outcome (None once none waits), and whether it
    # wants the answer's frames; the others, a _Sink each, in `others` (None while
    # there are none, as for almost every request: a _Sink and a list more per request
    # cost the I/O thread and the collector, measured).
    cdef public object future
    cdef public bint multipart
    cdef public list others
    cdef public bint accepted
    cdef public bint cancelling
    cdef public bint sent  # in the window: its SUBMIT (or RESULT) has gone to the broker
    cdef public bint checked  # the lazy pirate asked the broker for it
    cdef public Py_ssize_t size  # payload bytes it holds in the window
    cdef public bint batched  # its SUBMIT last went in an FBC02 batch

    def __init__(self, bytes request_id, message, future, bint multipart):
        self.request_id = request_id
        self.message = message
        self.future = future
        self.multipart = multipart
        self.size = _payload_size(message)

    cpdef add(self, future, bint multipart):
        """One more future waiting for the outcome."""
        if self.future is None:
            self.future, self.multipart = future, multipart
        elif self.others is None:
            self.others = [_Sink(future, multipart)]
        else:
            self.others.append(_Sink(future, multipart))

    cpdef list waiters(self):
        """[(future, multipart)] of every future waiting, the first first."""
        cdef list waiting = [] if self.future is None else [(self.future, self.multipart)]
        if self.others is not None:
            waiting.extend([((<_Sink?>sink).future, (<_Sink?>sink).multipart) for sink in self.others])
        return waiting

    cpdef bint drop(self, future):
        """`future` waits no more; whether any other still does."""
        cdef list others = self.others
        if others is not None:
            others = [sink for sink in others if (<_Sink?>sink).future is not future]
        if self.future is future:
            self.future = None
            if others:
                sink = others.pop(0)
                self.future, self.multipart = (<_Sink?>sink).future, (<_Sink?>sink).multipart
        self.others = others or None
        return self.future is not None


cdef Entry _new_entry(bytes request_id, message, future, bint multipart):
    """Entry(request_id, message, future, multipart) without a Python call."""
    cdef Entry entry = Entry.__new__(Entry)
    entry.request_id = request_id
    entry.message = message
    entry.future = future
    entry.multipart = multipart
    entry.size = _payload_size(message)
    return entry


include "_handoff.pxi"

# The book calls the compiled deliver above directly when it is the one it was given
# (the sync Client's), not through a Python call.
cdef object _HANDOFF_DELIVER = deliver


cdef class RequestBook:
    """What a client waits for, and what it does with each reply (client/book.py's
    RequestBook, compiled: see its docstring)."""

    cdef object _send
    cdef object _deliver
    cdef bint _deliver_here  # _deliver is _handoff.pxi's deliver
    cdef public double check_interval
    cdef object _clock
    cdef Py_ssize_t _check_batch
    cdef public Py_ssize_t window
    cdef public Py_ssize_t window_bytes
    cdef dict _entries
    # The ids in flight, insertion-ordered: the lazy pirate checks those at the front
    # and moves them to the back, so every round reaches the next ones.
    cdef dict _in_flight
    cdef public Py_ssize_t in_flight_bytes
    # The ids held back by the window, oldest first (an id forgotten meanwhile is
    # skipped when its turn comes).
    cdef object _held
    cdef dict _queries
    cdef dict _admin  # dead-letter commands waiting for their reply
    cdef double _quiet_since
    cdef double _heard  # the last message from the broker (or the start of a wait)
    cdef public Py_ssize_t resubmitted
    cdef public Py_ssize_t checks
    cdef public Py_ssize_t refetched
    cdef public bint v2
    cdef public bint heard_v2
    cdef list _pending  # FBC02: ids to SUBMIT at the next flush_submits()
    cdef object _on_pending
    # Instance attributes beyond these: tools that watch a client wrap on_message.
    cdef dict __dict__

    def __init__(
        self,
        send,
        deliver,
        double check_interval,
        *,
        clock=time.monotonic,
        Py_ssize_t check_batch=CHECK_BATCH,
        Py_ssize_t window=DEFAULT_WINDOW,
        Py_ssize_t window_bytes=DEFAULT_WINDOW_BYTES,
        bint v2=False,
        on_pending=None,
    ):
        self._send = send
        self._deliver = deliver
        self._deliver_here = deliver is _HANDOFF_DELIVER
        self.check_interval = check_interval
        self._clock = clock
        self._check_batch = check_batch
        self.window = window
        self.window_bytes = window_bytes
        self._entries = {}
        self._in_flight = {}
        self.in_flight_bytes = 0
        self._held = deque()
        self._queries = {}
        self._admin = {}
        self._quiet_since = clock()
        self._heard = self._quiet_since
        self.v2 = v2
        self._pending = []
        self._on_pending = on_pending

    # -- from the client ---------------------------------------------------------------

    @property
    def pending(self):
        """Ids waited for (an outcome or a STATUS reply)."""
        return len(self._entries) + len(self._queries)

    @property
    def in_flight(self):
        """Requests sent to the broker whose outcome has not come yet."""
        return len(self._in_flight)

    @property
    def queued(self):
        """Requests held in this client by the window, not sent yet."""
        return len(self._entries) - len(self._in_flight)

    def stats(self):
        """The flow-control figures: in_flight, in_flight_bytes, queued, and the lazy
        pirate's checks, refetched and resubmitted."""
        return {
            "in_flight": self.in_flight,
            "in_flight_bytes": self.in_flight_bytes,
            "queued": self.queued,
            "checks": self.checks,
            "refetched": self.refetched,
            "resubmitted": self.resubmitted,
            "protocol": 2 if self.v2 else 1,
        }

    @property
    def last_heard(self):
        """When the broker last sent something (or when waiting for it began)."""
        return self._heard

    def holds(self, request_id):
        """Whether this book waits for the outcome of the id."""
        return request_id in self._entries

    def probe(self, request_id):
        """Send STATS (the id: any 16 bytes): a broker that answers is there."""
        self._send_now(stats_message(request_id))

    @property
    def waiting(self):
        """Whether anything sent waits for the broker's reply."""
        return bool(self._in_flight or self._queries or self._admin)

    def surrender(self):
        """Take every request out of this book, with their futures, for another book
        (ShardedBook's failover): [(id, entry)], in submission order. The broker of this
        book is not told; queries and dead-letter commands stay (they time out)."""
        taken = list(self._entries.items())
        self._entries = {}
        self._in_flight, self._held, self.in_flight_bytes, self._pending = {}, deque(), 0, []
        return taken

    def adopt(self, request_id, Entry entry):
        """A request that another book surrendered: submitted here (or watched, for an id
        this client never submitted) as if new, with its futures. An id this book has
        already gets the futures added to its own entry."""
        cdef Entry mine
        if entry.cancelling:
            # Its CANCEL went to the broker it leaves: as cancelled, not run elsewhere.
            self._fail_entry(entry, _cancelled_reply(request_id).error)
            return
        mine = self._entries.get(request_id)
        if mine is not None:
            for future, multipart in entry.waiters():
                mine.add(future, multipart)
            return
        entry.sent = entry.accepted = entry.checked = entry.batched = False
        self._enter(request_id, entry)

    cdef void _start_waiting(self) except *:
        if not self._in_flight and not self._queries:
            # The silence that matters starts now, not when the last reply came.
            self._quiet_since = self._heard = self._clock()

    # -- the window --------------------------------------------------------------------

    cdef bint _fits(self, Py_ssize_t size) noexcept:
        cdef Py_ssize_t n = len(self._in_flight)
        return n == 0 or (n < self.window and self.in_flight_bytes + size <= self.window_bytes)

    cdef void _enter(self, bytes request_id, Entry entry) except *:
        """A new entry, recorded: sent now if the window has room and nothing is held
        before it."""
        self._entries[request_id] = entry
        if not self._held and self._fits(entry.size):
            self._launch(request_id, entry)
        else:
            self._held.append(request_id)

    cdef void _launch(self, bytes request_id, Entry entry) except *:
        self._start_waiting()
        entry.sent = True
        self._in_flight[request_id] = None
        self.in_flight_bytes += entry.size
        if entry.message is None:
            self._send_now(result_message(request_id))
        else:
            self._send_submit(request_id, entry.message)

    cdef void _send_submit(self, bytes request_id, list message) except *:
        """The SUBMIT of a request: now (FBC01), or at the next flush_submits() (FBC02)."""
        if not self.v2:
            self._send_now(message)
            return
        if not self._pending and self._on_pending is not None:
            self._on_pending()
        self._pending.append(request_id)

    cpdef int flush_submits(self) except -1:
        """Send the FBC02 SUBMITs gathered since the last call (as FBC01 ones if the
        book has fallen back meanwhile); returns how many messages."""
        cdef list pending, taken, messages
        cdef Entry entry
        cdef bint batched
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        taken = []
        for request_id in pending:
            entry = self._entries.get(request_id)
            if entry is not None and entry.sent and entry.message is not None:  # not forgotten meanwhile
                taken.append(entry)
        # A lone request goes as FBC01: the broker takes it the same way, and a single
        # call() costs what it did before FBC02 (measured ~5-10 % less than one record).
        batched = self.v2 and len(taken) > 1
        for entry in taken:
            entry.batched = batched
        messages = [entry.message for entry in taken]
        if batched:
            messages = submit_batches(messages)
        for message in messages:
            self._send(message)
        return len(messages)

    cdef void _send_now(self, list message) except *:
        """Send an FBC01 message (STATUS, RESULT, CANCEL, an FBC01 SUBMIT) after the
        SUBMITs gathered before it: the broker must see them in the order they were made
        (a STATUS sent ahead of its request's batch would find it unknown)."""
        if self._pending:
            self.flush_submits()
        self._send(message)

    cdef void _leave(self, bytes request_id, Entry entry) except *:
        """An entry that was removed from _entries leaves the window: held ones move up."""
        cdef Entry waiting
        if not entry.sent:
            return  # still in _held: skipped when its turn comes
        del self._in_flight[request_id]
        self.in_flight_bytes -= entry.size
        held, entries = self._held, self._entries
        while held:
            waiting = entries.get(held[0])
            if waiting is not None and not waiting.sent:
                if not self._fits(waiting.size):
                    return
                self._launch(held[0], waiting)
            held.popleft()

    # -- requests ----------------------------------------------------------------------

    def submit(self, bytes request_id, list message, future, bint multipart):
        self._submit(_new_entry(request_id, message, future, multipart))

    def submit_many(self, list commands):
        """Enter each submit command (an Entry, handoff's submit_command)."""
        for command in commands:
            self._submit(<Entry?>command)

    cdef void _submit(self, Entry new) except *:
        cdef bytes request_id = new.request_id
        cdef Entry entry = self._entries.get(request_id)
        if entry is None:
            self._enter(request_id, new)
            return
        entry.add(new.future, new.multipart)
        if entry.message is None and new.message is not None:
            # Only watched so far: from now on it can be submitted again if lost. Its
            # payload counts in the window from now on, or when it is let in if held.
            entry.message = new.message
            entry.size = new.size
            if entry.sent:
                self.in_flight_bytes += entry.size
                self._send_submit(request_id, new.message)
        # Else submitted already by this client: the broker would only add the same
        # socket as a waiter again; the future waits with the others.

    def watch(self, bytes request_id, future, bint multipart):
        """RESULT: wait for the outcome of an id (submitted by anyone)."""
        cdef Entry entry = self._entries.get(request_id)
        if entry is None:
            self._enter(request_id, _new_entry(request_id, None, future, multipart))
            return
        entry.add(future, multipart)
        if entry.sent:
            self._send_now(result_message(request_id))

    def query(self, bytes request_id, future):
        """STATUS: the future gets a Status."""
        self._start_waiting()
        self._prune_queries()
        self._queries.setdefault(request_id, deque()).append(future)
        self._send_now(status_message(request_id))

    def admin(self, bytes request_id, list message, future):
        """A dead-letter command (DEAD, REQUEUE, REQUEUE_ALL) about request_id: the
        future gets the first reply about that id among ADMIN_KINDS (a Reply)."""
        self._start_waiting()
        if len(self._admin) >= 64:
            # As for queries: callers that gave up leave done futures behind.
            for rid in [rid for rid, fs in self._admin.items() if all(f.done() for f in fs)]:
                del self._admin[rid]
        self._admin.setdefault(request_id, deque()).append(future)
        self._send_now(message)

    cdef void _prune_queries(self) except *:
        # A caller that gave up waiting (status() timed out) cancelled its future:
        # without this, a broker that never answers would make them pile up.
        if len(self._queries) < 64:
            return
        for request_id in [rid for rid, fs in self._queries.items() if all(f.done() for f in fs)]:
            del self._queries[request_id]

    def cancel(self, bytes request_id):
        """CANCEL: the futures waiting for the id get the broker's answer (CANCELLED,
        or the outcome it already had); a request still held here is cancelled here."""
        cdef Entry entry = self._entries.get(request_id)
        if entry is not None:
            if not entry.sent:
                self._finish(request_id, _cancelled_reply(request_id))
            else:
                entry.cancelling = True
        # Sent even for a request held here: the id may be another client's.
        self._send_now(cancel_message(request_id))

    def forget(self, bytes request_id, future, bint cancel=True):
        """A future cancelled by its owner waits no more; with `cancel`, the request
        is cancelled at the broker too (the other futures waiting for it get CANCELLED).
        A request still held here never reaches the broker."""
        cdef Entry entry = self._entries.get(request_id)
        if entry is not None:
            if not entry.drop(future):
                del self._entries[request_id]
                self._leave(request_id, entry)
                if not entry.sent:
                    return
            elif cancel:
                if not entry.sent:
                    self._finish(request_id, _cancelled_reply(request_id))
                    return
                entry.cancelling = True
        if cancel:
            self._send_now(cancel_message(request_id))

    def fail_all(self, exc):
        """Every future waiting gets `exc` (the client is closing)."""
        entries, queries, admin = self._entries, self._queries, self._admin
        self._entries, self._queries, self._admin = {}, {}, {}
        self._in_flight, self._held, self.in_flight_bytes, self._pending = {}, deque(), 0, []
        for entry in entries.values():
            self._fail_entry(entry, exc)
        for futures in list(queries.values()) + list(admin.values()):
            for future in futures:
                self._give(future, None, exc)

    # -- from the broker ---------------------------------------------------------------

    def on_message(self, frames):
        """Handle one received message (FBC01, or FBC02 REPLIES: each of its replies);
        returns the (last) reply, None if malformed."""
        self._quiet_since = self._heard = self._clock()
        if frames and frames[0] == _SIG_V2:
            return self._on_replies(frames)
        reply = decode_reply(frames)
        if reply is not None:
            self.on_reply(reply)
        return reply

    cdef object _on_replies(self, frames):
        """An FBC02 REPLIES message. Its header is read here, in place (client/protocol.py's
        reply_records makes a tuple and two bytes a record). The two replies of every
        request, ACCEPTED and OK, are handled here as on_reply would, without a Reply each
        (they are most of what a client reads); the others are decoded and go to
        on_reply. None, and nothing done, when the header does not match the frames."""
        cdef dict entries = self._entries
        cdef Entry entry
        cdef Py_ssize_t at = 3, n, i, count, size, total = 0, nframes = len(frames)
        cdef const unsigned char *record
        cdef bytes header, request_id
        if nframes < 3 or frames[1] != _REPLIES:
            return None
        header = frames[2] if type(frames[2]) is bytes else None
        if header is None:
            if not isinstance(frames[2], (bytearray, memoryview)):
                return None  # as reply_records: not a header
            header = bytes(frames[2])
        size = PyBytes_GET_SIZE(header)
        if size == 0 or size % _REPLY_RECORD:
            return None
        count = size // _REPLY_RECORD
        record = <const unsigned char *>PyBytes_AS_STRING(header)
        for i in range(count):
            total += (record[i * _REPLY_RECORD + _ID + 1] << 8) | record[i * _REPLY_RECORD + _ID + 2]
        if total != nframes - 3:
            return None
        self.heard_v2 = True
        last = None
        for i in range(count):
            record = <const unsigned char *>PyBytes_AS_STRING(header) + i * _REPLY_RECORD
            n = (record[_ID + 1] << 8) | record[_ID + 2]
            request_id = PyBytes_FromStringAndSize(<const char *>record, _ID)
            if n and record[_ID] == _OK_CODE:
                # Out of the book at once: one lookup of the id, not two.
                entry = entries.pop(request_id, None)
                if entry is not None:
                    self._finish_ok_at(request_id, entry, frames, at, n)
            elif not n and record[_ID] == _ACCEPTED_CODE:
                entry = entries.get(request_id)
                if entry is not None and entry.sent:
                    entry.accepted = True
            else:
                last = decode_reply(
                    [_SIG, PyBytes_FromStringAndSize(<const char *>record + _ID, 1), request_id, *frames[at : at + n]]
                )
                if last is not None:
                    self.on_reply(last)
            at += n
        return last

    cpdef on_reply(self, reply):
        """Act on one decoded reply."""
        cdef Entry entry
        request_id, kind = reply.request_id, reply.kind
        if self._admin and kind in ADMIN_KINDS and request_id in self._admin:
            waiting = self._admin[request_id]
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    self._give(future, reply, None)
                    break
            if not waiting:
                del self._admin[request_id]
            if kind in (R_DEAD, R_REQUEUED):
                return
        if reply.status is not None:  # STATUS or UNKNOWN
            futures = self._queries.get(request_id)
            while futures:
                future = futures.popleft()
                if not future.done():
                    self._give(future, reply.status, None)
                    break
            if futures is not None and not futures:
                del self._queries[request_id]
        entry = self._entries.get(request_id)
        if entry is None:
            return  # a duplicate outcome, or about an id nobody here waits for
        if not entry.sent and kind not in OUTCOME_KINDS:
            return  # about an id held here (a status() of it, say): not its SUBMIT's
        if kind == R_ACCEPTED:
            entry.accepted = True
        elif kind in OUTCOME_KINDS or kind == R_REJECTED:
            self._finish(request_id, reply)
        elif kind == R_UNKNOWN:
            if entry.cancelling:
                # The broker does not have it, so it will not run: as cancelled.
                self._finish(request_id, _cancelled_reply(request_id))
            elif entry.message is None:
                self._finish(request_id, reply)  # RESULT of an id nobody can re-submit
            else:
                # The broker lost it (restarted without a store): submit it again,
                # with the same id, so that it runs once however many times it is sent.
                if self.v2 and entry.batched and not self.heard_v2 and not entry.accepted:
                    # Never a word in FBC02, and it does not know a request sent so:
                    # a broker that drops FBC02. FBC01 from now on.
                    self.v2 = False
                    log.warning("the broker does not speak FBC02: the client falls back to FBC01")
                self.resubmitted += 1
                entry.accepted = False
                self._send_submit(request_id, entry.message)
        elif kind == R_STATUS:
            entry.accepted = True
            if reply.status is not None and reply.status.state == "done":
                # It finished but its outcome did not reach this socket.
                self._send_now(result_message(request_id))

    cdef Entry _finished_entry(self, bytes request_id):
        """The entry of a request whose outcome came, out of the book and the window."""
        cdef Entry entry = self._entries.pop(request_id)
        self._left(request_id, entry)
        return entry

    cdef void _left(self, bytes request_id, Entry entry) except *:
        """A finished request's entry, taken out of the book, leaves the window."""
        if entry.checked:
            self.refetched += 1
        self._leave(request_id, entry)

    cdef void _give(self, future, value, exc) except *:
        """deliver(future, value, exc): a C call for the sync Client's."""
        if self._deliver_here:
            deliver(future, value, exc)
        else:
            self._deliver(future, value, exc)

    cdef void _fail_entry(self, Entry entry, exc) except *:
        """Every future waiting for the entry gets `exc`."""
        if entry.future is not None:
            self._give(entry.future, None, exc)
        if entry.others is not None:
            for sink in entry.others:
                self._give((<_Sink?>sink).future, None, exc)

    cdef void _finish(self, bytes request_id, reply) except *:
        if reply.kind == R_OK:
            self._finish_ok(request_id, reply.frames)
            return
        self._fail_entry(self._finished_entry(request_id), reply.error)

    cdef void _finish_ok_at(self, bytes request_id, Entry entry, frames, Py_ssize_t at, Py_ssize_t n) except *:
        """The answer in frames[at:at + n] (of a REPLIES message) of the request whose
        entry was just taken out of the book: a lone frame goes to the futures as it is,
        with no list made for it."""
        self._left(request_id, entry)
        answer = frames[at : at + n] if n > 1 else None
        if answer is not None:
            self._answer(entry, answer if type(answer) is list else list(answer))
            return
        frame = frames[at]
        if type(frame) is not bytes:
            self._answer(entry, [frame])
            return
        if entry.future is not None:
            self._give(entry.future, [frame] if entry.multipart else frame, None)
        if entry.others is not None:
            for sink in entry.others:
                self._give((<_Sink?>sink).future, [frame] if (<_Sink?>sink).multipart else frame, None)

    cdef void _finish_ok(self, bytes request_id, list frames) except *:
        """The answer (its frames) of a request this book waits for."""
        self._answer(self._finished_entry(request_id), frames)

    cdef void _answer(self, Entry entry, list frames) except *:
        """The answer's frames to every future waiting for the entry."""
        if entry.future is not None:
            self._give(entry.future, frames if entry.multipart else b"".join(frames), None)
        if entry.others is not None:
            for sink in entry.others:
                self._give((<_Sink?>sink).future, frames if (<_Sink?>sink).multipart else b"".join(frames), None)

    # -- the lazy pirate ---------------------------------------------------------------

    def next_check(self):
        """Seconds until tick() has work (0: now), None while nothing is in flight."""
        if not self._in_flight:
            return None
        return max(0.0, self._quiet_since + self.check_interval - self._clock())

    def tick(self):
        """If the broker has been silent for check_interval while requests are in
        flight, ask RESULT for up to check_batch of them; returns how many."""
        cdef list batch
        if not self._in_flight:
            return 0
        now = self._clock()
        if now - self._quiet_since < self.check_interval:
            return 0
        self._quiet_since = now
        batch = []
        for request_id in self._in_flight:
            batch.append(request_id)
            if len(batch) >= self._check_batch:
                break
        for request_id in batch:
            del self._in_flight[request_id]
            self._in_flight[request_id] = None  # to the back
            (<Entry>self._entries[request_id]).checked = True
            # RESULT rather than STATUS: the same answers (STATUS while it runs,
            # UNKNOWN if lost), but it also makes this socket a waiter, so an outcome
            # still reaches it after its connection or the broker (with a store) changed.
            self._send_now(result_message(request_id))
        self.checks += len(batch)
        return len(batch)
