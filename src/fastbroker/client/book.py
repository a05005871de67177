"""client/book.py: RequestBook, the record of what a client waits for and what it does
with each reply (twin of client/_book.pyx, same names; _select.client_book() chooses).

Shared by ``fastbroker.Client`` (its I/O thread) and ``fastbroker.AsyncClient`` (its
reader task): the window, FBC02 batches per turn and the fall-back to FBC01, the lazy
pirate (docs/PROTOCOL.md sections 10 and 12). It never touches a socket: it is given a
``send`` function and a ``deliver`` function.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from fastbroker.client.protocol import (
    ADMIN_KINDS,
    CHECK_BATCH,
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    OUTCOME_KINDS,
    SUBMIT_PAYLOAD_AT,
    Reply,
    _cancelled_reply,
    cancel_message,
    decode_reply,
    reply_records,
    result_message,
    stats_message,
    status_message,
    submit_batch_messages,
    submit_message,
)
from fastbroker.protocol import (
    CLIENT_SIGNATURE,
    CLIENT_SIGNATURE_V2,
    R_ACCEPTED,
    R_DEAD,
    R_OK,
    R_REJECTED,
    R_REQUEUED,
    R_STATUS,
    R_UNKNOWN,
)

log = logging.getLogger("fastbroker.client")

Deliver = Callable[[Any, Any, Optional[BaseException]], None]
"""deliver(future, value, exception): resolve a future (in the client's own way)."""


class _Sink:
    """A further future waiting for an entry's outcome (the first is in the entry)."""

    __slots__ = ("future", "multipart")

    def __init__(self, future: Any, multipart: bool) -> None:
        self.future = future
        self.multipart = multipart


def _payload_size(message: Optional[List[bytes]]) -> int:
    return 0 if message is None else sum(map(len, message[SUBMIT_PAYLOAD_AT:]))


class Entry:
    """An id this client waits for an outcome of. A submit command is one too: made in the
    caller's thread (handoff.submit_command), it is entered in the book as it is, so a
    request costs no command object besides."""

    __slots__ = (
        "request_id",
        "message",
        "future",
        "multipart",
        "others",
        "accepted",
        "cancelling",
        "sent",
        "checked",
        "size",
        "batched",
    )

    def __init__(self, request_id: bytes, message: Optional[List[bytes]], future: Any, multipart: bool) -> None:
        self.request_id = request_id
        # The SUBMIT message, kept to submit it again if the broker loses it;
        # None for an id only watched with RESULT (it cannot be re-submitted).
        self.message = message
        # The first future waiting for the outcome (None once none waits), and whether
        # it wants the answer's frames; the others, a _Sink each, in `others` (None
        # while there are none, as for almost every request: a _Sink and a list more
        # per request cost the I/O thread and the collector, measured).
        self.future = future
        self.multipart = multipart
        self.others: Optional[List[_Sink]] = None
        self.accepted = False
        self.cancelling = False
        self.sent = False  # in the window: its SUBMIT (or RESULT) has gone to the broker
        self.checked = False  # the lazy pirate asked the broker for it
        self.size = _payload_size(message)  # payload bytes it holds in the window
        self.batched = False  # its SUBMIT last went in an FBC02 batch

    def add(self, future: Any, multipart: bool) -> None:
        """One more future waiting for the outcome."""
        if self.future is None:
            self.future, self.multipart = future, multipart
        elif self.others is None:
            self.others = [_Sink(future, multipart)]
        else:
            self.others.append(_Sink(future, multipart))

    def waiters(self) -> List[Tuple[Any, bool]]:
        """[(future, multipart)] of every future waiting, the first first."""
        waiting = [] if self.future is None else [(self.future, self.multipart)]
        if self.others is not None:
            waiting.extend([(sink.future, sink.multipart) for sink in self.others])
        return waiting

    def drop(self, future: Any) -> bool:
        """`future` waits no more; whether any other still does."""
        others = self.others
        if others is not None:
            others = [sink for sink in others if sink.future is not future]
        if self.future is future:
            self.future = None
            if others:
                sink = others.pop(0)
                self.future, self.multipart = sink.future, sink.multipart
        self.others = others or None
        return self.future is not None


class RequestBook:
    """What a client waits for, and what it does with each reply.

    Only the client's I/O loop calls it (never two threads at once). ``send(frames)``
    sends a message to the broker; ``deliver(future, value, exc)`` resolves a future.
    The loop calls ``on_message`` for every message received and ``tick()`` at
    least every ``check_interval`` seconds (``next_check()`` says when it is due).

    Flow control: at most ``window`` requests, and ``window_bytes`` of payload, are in
    flight (sent, outcome not received); the others are held here in submission order
    and sent as outcomes come back. So the broker holds at most two replies per request
    in flight for this client and never has to drop one at its high-water mark.

    With ``v2`` (FBC02), SUBMITs are not sent one by one: the requests that enter the
    window are gathered and ``flush_submits()``, which the loop calls once per turn,
    sends them as few FBC02 SUBMIT messages (one request alone as an FBC01 SUBMIT: the
    same to the broker, and cheaper); ``on_pending()`` is called when the first one
    waits, for a loop that must be told. Against a broker that does not speak FBC02 (it
    drops those messages), the first UNKNOWN for a request sent in a batch and never
    acknowledged, before anything FBC02 came from it, turns the book to FBC01 for good
    (``v2`` False) and submits again.
    """

    def __init__(
        self,
        send: Callable[[List[bytes]], None],
        deliver: Deliver,
        check_interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_batch: int = CHECK_BATCH,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        v2: bool = False,
        on_pending: Optional[Callable[[], None]] = None,
    ) -> None:
        self._send = send
        self._deliver = deliver
        self.check_interval = check_interval
        self._clock = clock
        self._check_batch = check_batch
        self.window = window
        self.window_bytes = window_bytes
        self._entries: Dict[bytes, Entry] = {}
        # The ids in flight, insertion-ordered: the lazy pirate checks those at the
        # front and moves them to the back, so every round reaches the next ones.
        self._in_flight: Dict[bytes, None] = {}
        self.in_flight_bytes = 0
        # The ids held back by the window, oldest first (an id forgotten meanwhile is
        # skipped when its turn comes).
        self._held: Deque[bytes] = deque()
        self._queries: Dict[bytes, Deque[Any]] = {}
        self._admin: Dict[bytes, Deque[Any]] = {}  # dead-letter commands waiting for their reply
        self._quiet_since = clock()
        self._heard = self._quiet_since  # the last message from the broker (or the start of a wait)
        self.resubmitted = 0
        """Requests submitted again after the broker said UNKNOWN (the lazy pirate)."""
        self.checks = 0
        """RESULT queries the lazy pirate sent."""
        self.refetched = 0
        """Outcomes received after the lazy pirate asked for them (lost or late replies)."""
        self.v2 = v2
        """Whether SUBMITs go as FBC02 batches (False: FBC01, asked for or fallen back to)."""
        self.heard_v2 = False
        """Whether the broker has sent an FBC02 message: it speaks FBC02."""
        self._pending: List[bytes] = []  # FBC02: ids to SUBMIT at the next flush_submits()
        self._on_pending = on_pending

    # -- from the client ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Ids waited for (an outcome or a STATUS reply)."""
        return len(self._entries) + len(self._queries)

    @property
    def in_flight(self) -> int:
        """Requests sent to the broker whose outcome has not come yet."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Requests held in this client by the window, not sent yet."""
        return len(self._entries) - len(self._in_flight)

    def stats(self) -> Dict[str, int]:
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
    def last_heard(self) -> float:
        """When the broker last sent something (or when waiting for it began)."""
        return self._heard

    def holds(self, request_id: bytes) -> bool:
        """Whether this book waits for the outcome of the id."""
        return request_id in self._entries

    def probe(self, request_id: bytes) -> None:
        """Send STATS (the id: any 16 bytes): a broker that answers is there."""
        self._send_now(stats_message(request_id))

    @property
    def waiting(self) -> bool:
        """Whether anything sent waits for the broker's reply."""
        return bool(self._in_flight or self._queries or self._admin)

    def surrender(self) -> List[Tuple[bytes, Entry]]:
        """Take every request out of this book, with their futures, for another book
        (ShardedBook's failover): [(id, entry)], in submission order. The broker of this
        book is not told; queries and dead-letter commands stay (they time out)."""
        taken = list(self._entries.items())
        self._entries = {}
        self._in_flight, self._held, self.in_flight_bytes, self._pending = {}, deque(), 0, []
        return taken

    def adopt(self, request_id: bytes, entry: Entry) -> None:
        """A request that another book surrendered: submitted here (or watched, for an id
        this client never submitted) as if new, with its futures. An id this book has
        already gets the futures added to its own entry."""
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

    def _start_waiting(self) -> None:
        if not self._in_flight and not self._queries:
            # The silence that matters starts now, not when the last reply came.
            self._quiet_since = self._heard = self._clock()

    # -- the window --------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        n = len(self._in_flight)
        return n == 0 or (n < self.window and self.in_flight_bytes + size <= self.window_bytes)

    def _enter(self, request_id: bytes, entry: Entry) -> None:
        """A new entry, recorded: sent now if the window has room and nothing is held
        before it."""
        self._entries[request_id] = entry
        if not self._held and self._fits(entry.size):
            self._launch(request_id, entry)
        else:
            self._held.append(request_id)

    def _launch(self, request_id: bytes, entry: Entry) -> None:
        self._start_waiting()
        entry.sent = True
        self._in_flight[request_id] = None
        self.in_flight_bytes += entry.size
        if entry.message is None:
            self._send_now(result_message(request_id))
        else:
            self._send_submit(request_id, entry.message)

    def _send_submit(self, request_id: bytes, message: List[bytes]) -> None:
        """The SUBMIT of a request: now (FBC01), or at the next flush_submits() (FBC02)."""
        if not self.v2:
            self._send_now(message)
            return
        if not self._pending and self._on_pending is not None:
            self._on_pending()
        self._pending.append(request_id)

    def flush_submits(self) -> int:
        """Send the FBC02 SUBMITs gathered since the last call (as FBC01 ones if the
        book has fallen back meanwhile); returns how many messages."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        records = []
        for request_id in pending:
            entry = self._entries.get(request_id)
            if entry is not None and entry.sent and entry.message is not None:  # not forgotten meanwhile
                message = entry.message
                records.append((request_id, message[3], message[SUBMIT_PAYLOAD_AT:]))
        if self.v2 and len(records) > 1:
            messages = submit_batch_messages(records)
            for request_id, _, _ in records:
                self._entries[request_id].batched = True
        else:
            # A lone request goes as FBC01: the broker takes it the same way, and a single
            # call() costs what it did before FBC02 (measured ~5-10 % less than one record).
            messages = [submit_message(request_id, options, payload) for request_id, options, payload in records]
            for request_id, _, _ in records:
                self._entries[request_id].batched = False
        for message in messages:
            self._send(message)
        return len(messages)

    def _send_now(self, message: List[bytes]) -> None:
        """Send an FBC01 message (STATUS, RESULT, CANCEL, an FBC01 SUBMIT) after the
        SUBMITs gathered before it: the broker must see them in the order they were made
        (a STATUS sent ahead of its request's batch would find it unknown)."""
        if self._pending:
            self.flush_submits()
        self._send(message)

    def _leave(self, request_id: bytes, entry: Entry) -> None:
        """An entry that was removed from _entries leaves the window: held ones move up."""
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

    def submit(self, request_id: bytes, message: List[bytes], future: Any, multipart: bool) -> None:
        self._submit(Entry(request_id, message, future, multipart))

    def _submit(self, new: Entry) -> None:
        request_id = new.request_id
        entry = self._entries.get(request_id)
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

    def submit_many(self, commands: List[Entry]) -> None:
        """Enter each submit command (an Entry, handoff.submit_command's)."""
        for command in commands:
            if type(command) is not Entry:
                raise TypeError(f"a submit command is an Entry, not {type(command).__name__}")
            self._submit(command)

    def watch(self, request_id: bytes, future: Any, multipart: bool) -> None:
        """RESULT: wait for the outcome of an id (submitted by anyone)."""
        entry = self._entries.get(request_id)
        if entry is None:
            self._enter(request_id, Entry(request_id, None, future, multipart))
            return
        entry.add(future, multipart)
        if entry.sent:
            self._send_now(result_message(request_id))

    def query(self, request_id: bytes, future: Any) -> None:
        """STATUS: the future gets a Status."""
        self._start_waiting()
        self._prune_queries()
        self._queries.setdefault(request_id, deque()).append(future)
        self._send_now(status_message(request_id))

    def admin(self, request_id: bytes, message: List[bytes], future: Any) -> None:
        """A dead-letter command (DEAD, REQUEUE, REQUEUE_ALL) about request_id: the
        future gets the first reply about that id among ADMIN_KINDS (a Reply)."""
        self._start_waiting()
        if len(self._admin) >= 64:
            # As for queries: callers that gave up leave done futures behind.
            for rid in [rid for rid, fs in self._admin.items() if all(f.done() for f in fs)]:
                del self._admin[rid]
        self._admin.setdefault(request_id, deque()).append(future)
        self._send_now(message)

    def _prune_queries(self) -> None:
        # A caller that gave up waiting (status() timed out) cancelled its future:
        # without this, a broker that never answers would make them pile up.
        if len(self._queries) < 64:
            return
        for request_id in [rid for rid, fs in self._queries.items() if all(f.done() for f in fs)]:
            del self._queries[request_id]

    def cancel(self, request_id: bytes) -> None:
        """CANCEL: the futures waiting for the id get the broker's answer (CANCELLED,
        or the outcome it already had); a request still held here is cancelled here."""
        entry = self._entries.get(request_id)
        if entry is not None:
            if not entry.sent:
                self._finish(request_id, _cancelled_reply(request_id))
            else:
                entry.cancelling = True
        # Sent even for a request held here: the id may be another client's.
        self._send_now(cancel_message(request_id))

    def forget(self, request_id: bytes, future: Any, cancel: bool = True) -> None:
        """A future cancelled by its owner waits no more; with `cancel`, the request
        is cancelled at the broker too (the other futures waiting for it get CANCELLED).
        A request still held here never reaches the broker."""
        entry = self._entries.get(request_id)
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

    def fail_all(self, exc: BaseException) -> None:
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

    def on_message(self, frames: Sequence[bytes]) -> Optional[Reply]:
        """Handle one received message (FBC01, or FBC02 REPLIES: each of its replies);
        returns the (last) reply, None if malformed."""
        self._quiet_since = self._heard = self._clock()
        if frames and frames[0] == CLIENT_SIGNATURE_V2:
            return self._on_replies(frames)
        reply = decode_reply(frames)
        if reply is not None:
            self.on_reply(reply)
        return reply

    def _on_replies(self, frames: Sequence[bytes]) -> Optional[Reply]:
        """An FBC02 REPLIES message. The two replies of every request, ACCEPTED and OK,
        are handled here as on_reply would, without a Reply each (they are most of what
        a client reads); the others are decoded and go to on_reply."""
        records = reply_records(frames)
        if records is None:
            return None
        self.heard_v2 = True
        entries = self._entries
        last: Optional[Reply] = None
        at = 3
        for request_id, kind, n in records:
            if kind == R_OK and n:
                # Out of the book at once: one lookup of the id, not two.
                entry = entries.pop(request_id, None)
                if entry is not None:
                    self._finish_ok_at(request_id, entry, frames, at, n)
            elif kind == R_ACCEPTED and not n:
                entry = entries.get(request_id)
                if entry is not None and entry.sent:
                    entry.accepted = True
            else:
                last = decode_reply([CLIENT_SIGNATURE, kind, request_id, *frames[at : at + n]])
                if last is not None:
                    self.on_reply(last)
            at += n
        return last

    def on_reply(self, reply: Reply) -> None:
        """Act on one decoded reply."""
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

    def _finished_entry(self, request_id: bytes) -> Entry:
        """The entry of a request whose outcome came, out of the book and the window."""
        entry = self._entries.pop(request_id)
        self._left(request_id, entry)
        return entry

    def _left(self, request_id: bytes, entry: Entry) -> None:
        """A finished request's entry, taken out of the book, leaves the window."""
        if entry.checked:
            self.refetched += 1
        self._leave(request_id, entry)

    def _give(self, future: Any, value: Any, exc: Optional[BaseException]) -> None:
        """deliver(future, value, exc) (the compiled book calls the sync Client's in C)."""
        self._deliver(future, value, exc)

    def _fail_entry(self, entry: Entry, exc: Optional[BaseException]) -> None:
        """Every future waiting for the entry gets `exc`."""
        if entry.future is not None:
            self._give(entry.future, None, exc)
        if entry.others is not None:
            for sink in entry.others:
                self._give(sink.future, None, exc)

    def _finish(self, request_id: bytes, reply: Reply) -> None:
        if reply.kind == R_OK:
            self._finish_ok(request_id, reply.frames)
            return
        self._fail_entry(self._finished_entry(request_id), reply.error)

    def _finish_ok_at(self, request_id: bytes, entry: Entry, frames: Sequence[bytes], at: int, n: int) -> None:
        """The answer in frames[at:at + n] (of a REPLIES message) of the request whose
        entry was just taken out of the book."""
        self._left(request_id, entry)
        self._answer(entry, list(frames[at : at + n]))

    def _finish_ok(self, request_id: bytes, frames: List[bytes]) -> None:
        """The answer (its frames) of a request this book waits for."""
        self._answer(self._finished_entry(request_id), frames)

    def _answer(self, entry: Entry, frames: List[bytes]) -> None:
        """The answer's frames to every future waiting for the entry."""
        if entry.future is not None:
            self._give(entry.future, frames if entry.multipart else b"".join(frames), None)
        if entry.others is not None:
            for sink in entry.others:
                self._give(sink.future, frames if sink.multipart else b"".join(frames), None)

    # -- the lazy pirate ---------------------------------------------------------------

    def next_check(self) -> Optional[float]:
        """Seconds until tick() has work (0: now), None while nothing is in flight."""
        if not self._in_flight:
            return None
        return max(0.0, self._quiet_since + self.check_interval - self._clock())

    def tick(self) -> int:
        """If the broker has been silent for check_interval while requests are in
        flight, ask RESULT for up to check_batch of them; returns how many."""
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
            self._entries[request_id].checked = True
            # RESULT rather than STATUS: the same answers (STATUS while it runs,
            # UNKNOWN if lost), but it also makes this socket a waiter, so an outcome
            # still reaches it after its connection or the broker (with a store) changed.
            self._send_now(result_message(request_id))
        self.checks += len(batch)
        return len(batch)


__all__ = ["Deliver", "Entry", "RequestBook"]
