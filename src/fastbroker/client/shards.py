"""ShardedBook: a client's requests over several brokers (docs/OPERATIONS.md "Shards",
docs/PROTOCOL.md section 14). No I/O: one RequestBook per broker does each broker's
part (its window, its lazy pirate, its socket through its ``send``); this routes.

- **Home.** A request's home is broker ``crc32(id) mod N`` of the list, so any client
  given the same list finds a request without a directory. A new request goes to its
  home, or to the next broker of the list (wrapping round) that is not *down*; this
  client records where it sent one that is not at home.
- **Finding an id** (result, status, cancel of an id this client did not place): the
  brokers are asked in order from its home; the first that knows it answers (UNKNOWN
  from every one: unknown).
- **Down.** A broker is down when something sent to it has waited ``failover_after``
  seconds without a word from it. Its requests then move to the next broker that is
  not down, with the same ids (a request it had accepted may so run twice, as after
  any crash; the client keeps the first outcome). While down it is probed (STATS) each
  ``check_interval``; its first word makes it live again, for new requests.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Callable, Dict, List, Optional

from fastbroker.client.book import Deliver, RequestBook  # the pure twin, for the type hints
from fastbroker.client.outcomes import DeadLetters, Status, UnknownRequest

log = logging.getLogger("fastbroker.client")

PROBE_ID = b"fastbroker-probe"
"""The id of the STATS a client sends a broker that is down (any 16 bytes do)."""


def home_shard(request_id: bytes, shards: int) -> int:
    """The broker of a list of `shards` that a request id belongs to: crc32(id) mod N."""
    return zlib.crc32(request_id) % shards


def search_order(request_id: bytes, shards: int) -> List[int]:
    """The brokers to ask about an id, in order: its home, then the next ones round."""
    first = home_shard(request_id, shards)
    return [(first + k) % shards for k in range(shards)]


def merge_dead(answers: List[DeadLetters], limit: int) -> DeadLetters:
    """The dead-letters of several brokers as one: the totals summed, the oldest
    `limit` requests of them all."""
    requests = sorted((d for a in answers for d in a.requests), key=lambda d: -d.age)
    return DeadLetters(sum(a.total for a in answers), requests[:limit])


class _Chain:
    """A future's stand-in while an id is looked for broker after broker: the books
    deliver to it as to any future (the client's deliver calls its set_result or
    set_exception), and it passes on the first answer that is not "unknown"."""

    __slots__ = ("sharded", "future", "request_id", "order", "multipart", "kind")

    def __init__(
        self, sharded: ShardedBook, future: Any, request_id: bytes, order: List[int], multipart: bool, kind: str
    ) -> None:
        self.sharded = sharded
        self.future = future
        self.request_id = request_id
        self.order = order  # the brokers still to ask, in order
        self.multipart = multipart
        self.kind = kind  # "watch" (RESULT) or "query" (STATUS)

    def done(self) -> bool:
        return bool(self.future.done())

    def set_result(self, value: Any) -> None:
        self._settle(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def _settle(self, value: Any, exc: Optional[BaseException]) -> None:
        """An answer from the broker asked last: the next one is asked on "unknown"."""
        unknown = isinstance(exc, UnknownRequest) or (isinstance(value, Status) and value.state == "unknown")
        if unknown and self.order and not self.done():
            book = self.sharded.books[self.order.pop(0)]
            if self.kind == "watch":
                book.watch(self.request_id, self, self.multipart)
            else:
                book.query(self.request_id, self)
            return
        self.sharded.deliver(self.future, value, exc)


class ShardedBook:
    """The RequestBook interface over one RequestBook per broker (``books``, built by
    the client with the same ``deliver`` as this object's: the books resolve futures
    themselves, and a chain of brokers asked in turn is a future to them, a _Chain)."""

    def __init__(
        self, deliver: Deliver, check_interval: float, failover_after: float, clock: Callable[[], float]
    ) -> None:
        self.deliver = deliver
        self.check_interval = check_interval
        self.failover_after = failover_after
        self._clock = clock
        self.books: List[RequestBook] = []
        self.down: List[Optional[float]] = []  # since when each broker is down, None: live
        self.placed: Dict[bytes, int] = {}  # this client's requests not at their home broker
        self.failovers = 0
        """Requests moved to another broker because theirs was down."""
        self._next_probe: List[float] = []

    def add(self, book: RequestBook) -> None:
        self.books.append(book)
        self.down.append(None)
        self._next_probe.append(0.0)

    # -- routing -----------------------------------------------------------------------

    def _order(self, request_id: bytes) -> List[int]:
        return search_order(request_id, len(self.books))

    def _search(self, request_id: bytes) -> List[int]:
        """The brokers to ask about an id, from its home; those down last (one that
        does not answer would hold the question up)."""
        order = self._order(request_id)
        return [s for s in order if self.down[s] is None] + [s for s in order if self.down[s] is not None]

    def _live(self, request_id: bytes) -> int:
        order = self._order(request_id)
        for shard in order:
            if self.down[shard] is None:
                return shard
        return order[0]  # all down: its home, where it waits

    def _holder(self, request_id: bytes) -> int:
        return self.placed.get(request_id, home_shard(request_id, len(self.books)))

    # -- the RequestBook interface -------------------------------------------------------

    def submit(self, request_id: bytes, message: List[bytes], future: Any, multipart: bool) -> None:
        self.books[self._submit_shard(request_id)].submit(request_id, message, future, multipart)

    def submit_many(self, commands: List[Any]) -> None:
        """Each submit command (the books' Entry) to its broker's book."""
        for command in commands:
            self.books[self._submit_shard(command.request_id)].submit_many([command])

    def _submit_shard(self, request_id: bytes) -> int:
        """The book a new request goes to."""
        # The common case first, without building the search order: the home is live
        # and the id was not placed elsewhere.
        shard = zlib.crc32(request_id) % len(self.books)
        if self.down[shard] is not None or (self.placed and request_id in self.placed):
            shard = self.placed.get(request_id, -1)
            if shard < 0:
                shard = self._live(request_id)
                self.placed[request_id] = shard
        return shard

    def watch(self, request_id: bytes, future: Any, multipart: bool) -> None:
        shard = self.placed.get(request_id)
        if shard is not None:
            self.books[shard].watch(request_id, future, multipart)
            return
        order = self._search(request_id)
        self.books[order[0]].watch(
            request_id, _Chain(self, future, request_id, order[1:], multipart, "watch"), multipart
        )

    def query(self, request_id: bytes, future: Any) -> None:
        shard = self.placed.get(request_id)
        if shard is not None:
            self.books[shard].query(request_id, future)
            return
        order = self._search(request_id)
        self.books[order[0]].query(request_id, _Chain(self, future, request_id, order[1:], False, "query"))

    def cancel(self, request_id: bytes) -> None:
        shard = self.placed.get(request_id)
        if shard is not None:
            self.books[shard].cancel(request_id)
            return
        # Another client's, perhaps placed away from home: every broker is told (one
        # that does not have it answers UNKNOWN, which nobody waits for).
        for book in self.books:
            book.cancel(request_id)

    def forget(self, request_id: bytes, future: Any, cancel: bool = True) -> None:
        self.books[self._holder(request_id)].forget(request_id, future, cancel)

    def flush_submits(self) -> int:
        return sum(book.flush_submits() for book in self.books)

    def next_check(self) -> Optional[float]:
        # Once a turn of the client's loop: one pass, one look at the clock.
        now = self._clock()
        earliest: Optional[float] = None
        for shard, book in enumerate(self.books):
            due = book.next_check()
            if book.waiting:
                silence = max(0.0, book.last_heard + self.failover_after - now)
                due = silence if due is None else min(due, silence)
            if self.down[shard] is not None:
                probe = max(0.0, self._next_probe[shard] - now)
                due = probe if due is None else min(due, probe)
            if due is not None and (earliest is None or due < earliest):
                earliest = due
        return earliest

    def tick(self) -> int:
        now = self._clock()
        for shard, book in enumerate(self.books):
            since = self.down[shard]
            if since is not None:
                if book.last_heard > since:
                    self.down[shard] = None
                    log.info("broker %d of the list is back", shard)
                elif now >= self._next_probe[shard]:
                    self._next_probe[shard] = now + self.check_interval
                    book.probe(PROBE_ID)
            elif book.waiting and now - book.last_heard >= self.failover_after:
                self._fail_over(shard, now)
        if self.placed and len(self.placed) > 1024:
            # Forget where requests that have finished were placed.
            self.placed = {rid: s for rid, s in self.placed.items() if self.books[s].holds(rid)}
        return sum(book.tick() for book in self.books)

    def _fail_over(self, shard: int, now: float) -> None:
        self.down[shard] = now
        self._next_probe[shard] = now + self.check_interval
        taken = self.books[shard].surrender()
        log.warning(
            "broker %d of the list silent for %.1f s: %d request(s) move to the next brokers",
            shard,
            now - self.books[shard].last_heard,
            len(taken),
        )
        for request_id, entry in taken:
            target = self._live(request_id)
            if target == shard:  # every broker is down: keep it, to wait here
                self.books[shard].adopt(request_id, entry)
                continue
            self.failovers += 1
            if target == home_shard(request_id, len(self.books)):
                self.placed.pop(request_id, None)
            else:
                self.placed[request_id] = target
            self.books[target].adopt(request_id, entry)

    def stats(self) -> Dict[str, Any]:
        """The books' figures summed, and ``failovers``, ``down`` (brokers down now) and
        ``shards`` (each book's own figures)."""
        each = [book.stats() for book in self.books]
        total: Dict[str, Any] = {k: sum(one[k] for one in each) for k in each[0] if k != "protocol"}
        total["protocol"] = min(one["protocol"] for one in each)
        total["failovers"] = self.failovers
        total["down"] = sum(1 for d in self.down if d is not None)
        total["shards"] = each
        return total

    def fail_all(self, exc: BaseException) -> None:
        for book in self.books:
            book.fail_all(exc)

    @property
    def pending(self) -> int:
        return sum(book.pending for book in self.books)


__all__ = ["ShardedBook", "home_shard", "search_order", "merge_dead"]
