"""core/journal.py: Journal, the changes of FBC01 requests for the durable store, and
the replies held until they are stored (twin of core/journal.pxi).

Owns: the entries since the last take() and the held replies.
Touches: the requests socket, in release() only. Users: ClientSide (submit, finish,
replies), KeptOutcomes (forget), WorkerSide (start), BrokerCore (journal, journal_take,
release_held, and run's RUN_JOURNAL).

Compiled only (absent here): add (an entry's C memory; here an entry is a tuple).

Docs: docs/ARCHITECTURE.md, "The store".
"""

from __future__ import annotations

from typing import List, Optional

import zmq

from fastbroker.core import cdef
from fastbroker.core.counters import Counters
from fastbroker.log_records import encode_entries


class Journal:
    """While ``on``: every FBC01 change is pushed here and every FBC01 reply held,
    so nothing is promised to a client before the store has it."""

    __slots__ = ("on", "ents", "held")

    def __init__(self) -> None:
        self.on = False
        self.ents: List[tuple] = []
        self.held: List[list] = []

    @cdef
    def push(self, entry: tuple) -> None:
        """Record one change: ("submit", id, payload frames, timeout (s or None),
        tries (-1: unlimited)), ("start", id, attempts), ("finish", id, reply code,
        body frames, attempts, tries, payload frames (a dead request's, else []), timeout
        (s or None)) or ("forget", id)."""
        self.ents.append(entry)

    @cdef
    def push_finish(
        self,
        cid: bytes,
        code: bytes,
        body: List[bytes],
        payload: List[bytes],
        attempts: int,
        tries: int,
        timeout: Optional[float],
    ) -> None:
        """Record a request's end: its outcome's body frames, and a dead request's
        payload (FAILED or TIMED_OUT; [] for another outcome) and timeout."""
        self.ents.append(("finish", cid, code, body, attempts, tries, payload, timeout))

    @cdef
    def clear(self) -> None:
        """Forget the entries not taken."""
        self.ents = []

    @cdef
    def take(self) -> List[tuple]:
        """The entries since the last call, in order."""
        ents, self.ents = self.ents, []
        return ents

    @cdef
    def encode(self, now: float) -> bytes:
        """The entries since the last call as the log store's records, each finish
        stamped `now` (Unix time); b"" if none."""
        return encode_entries(self.take(), now)

    @cdef
    def hold(self, message: list) -> None:
        """Keep a reply to a client until release()."""
        self.held.append(message)

    @cdef
    def release(self, socket: zmq.Socket, counters: Counters) -> int:
        """Send the held replies on `socket`; returns how many. A reply whose client
        is gone or not reading is counted (counters.reply_lost)."""
        held, self.held = self.held, []
        for message in held:
            try:
                socket.send_multipart(message, zmq.DONTWAIT, copy=False)
            except zmq.ZMQError as exc:
                if counters.reply_lost(exc.errno) < 0:
                    raise
        return len(held)

    @cdef
    def drop_held(self) -> None:
        """Forget the held replies unsent."""
        self.held = []

    @cdef
    def pending(self) -> bool:
        """Whether entries or held replies wait."""
        return bool(self.ents or self.held)
