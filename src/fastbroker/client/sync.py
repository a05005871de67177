"""Clients: ``Client`` (FBC01: a DEALER socket, many requests in flight, from any
thread) and ``ReqClient`` (the original request protocol: a REQ socket, one
request at a time)."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sys
import threading
from collections import deque
from typing import (
    TYPE_CHECKING,
    Any,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    TypeVar,
    Union,
    overload,
)

import zmq

from fastbroker import _select, security
from fastbroker._common import BrokerError, Closeable, ConfigError, check_seconds, zmq_reason
from fastbroker.addresses import Addresses, split_addresses
from fastbroker.client.futures import RequestFuture
from fastbroker.client.outcomes import DeadLetters, Requeued, Status
from fastbroker.client.protocol import (
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    Payload as _Payload,
    Progress,
    RequestDefaults,
    check_dead_limit,
    check_request_id,
    dead_message,
    dead_result,
    encode_options,
    iter_with_len,
    new_request_id,
    requeue_all_message,
    requeue_all_result,
    requeue_message,
    requeue_result,
)
from fastbroker.client.shards import merge_dead, search_order
from fastbroker.protocol import RECV_BATCH
from fastbroker.wakepipe import WakePipe

if TYPE_CHECKING:  # the pure twin's; the compiled Entry has the same fields
    from fastbroker.client.book import Entry

# Whole messages in and out of the I/O thread's sockets: compiled (one call per message)
# or the pure twin, by the core's rule.
_wire = _select.client_wire()[0]
# The hand-over of requests and outcomes between the callers and the I/O thread
# (MapSlot, deliver, submit_command, map_commands): compiled or the pure twin.
_handoff = _select.client_handoff()[0]
# Plain ints: pyzmq's constants are enum flags, whose operators cost microseconds each.
_POLLIN = int(zmq.POLLIN)
_POLLIN_OUT = int(zmq.POLLIN | zmq.POLLOUT)

log = logging.getLogger("fastbroker.client")

Payload = Union[bytes, List[bytes]]


class TaskAborted(BrokerError):
    """The broker gave up on the request after its last try (the empty answer)."""


class ReqClient(Closeable):
    """Sends a request and waits for its answer, as a plain REQ client of the
    original broker would. ``timeout`` (seconds) bounds each wait; when it passes,
    the socket is replaced (a REQ socket cannot send twice) and TimeoutError is
    raised — the request may still run on a worker. ``curve_server_key`` and
    ``curve_secret``: as for ``Client``."""

    def __init__(
        self,
        address: str,
        context: Optional[zmq.Context] = None,
        *,
        timeout: Optional[float] = None,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._curve = security.client_keys(curve_server_key, curve_secret)
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self._socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        security.apply_curve(socket, self._curve)
        socket.connect(self.address)
        return socket

    def request_multipart(self, frames: List[bytes]) -> List[bytes]:
        """Send payload frames; return the answer frames. TaskAborted on the empty answer."""
        if not frames:
            raise ValueError("a request needs at least one frame")
        self._socket.send_multipart(frames)
        if self.timeout is not None and not self._socket.poll(int(self.timeout * 1000)):
            self._socket.close()
            self._socket = self._connect()
            raise TimeoutError(f"no answer from {self.address} within {self.timeout} s")
        answer = self._socket.recv_multipart()
        if answer == [b""]:
            raise TaskAborted("the broker gave up on the request after its last try")
        return answer

    def request(self, payload: bytes) -> bytes:
        """Send one payload frame; return the answer's frames joined."""
        return b"".join(self.request_multipart([payload]))

    def close(self) -> None:
        self._socket.close()
        if self._own_context:
            self.context.term()


_Socket = TypeVar("_Socket", bound=zmq.Socket)


def connect_dealer(context: zmq.Context[_Socket], address: str, curve: Optional[security.CurveKeys] = None) -> _Socket:
    """A DEALER socket connected to `address` (a CURVE client with `curve`); ConfigError
    for a bad address. The socket is of the context's kind (a zmq.asyncio one for a
    zmq.asyncio.Context)."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, Client.linger_ms)
    security.apply_curve(socket, curve)
    try:
        socket.connect(address)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise ConfigError(f"cannot connect to {address!r}: {zmq_reason(exc)}") from None
    except (TypeError, UnicodeError, ValueError) as exc:
        socket.close(0)
        raise ConfigError(f"cannot connect to {address!r}: {exc}") from None
    return socket


_CLOSE = ("close",)


class Client(RequestDefaults, Closeable):
    """An FBC01 client (docs/PROTOCOL.md section 10): a DEALER socket with many
    requests in flight, each with its own id, timeout and tries.

    Thread-safe: any number of threads submit through one Client. A thread of its
    own owns the socket; the others hand it commands through a queue and a wake-up
    pipe. ``timeout`` (seconds per attempt) and ``tries`` are the defaults of every
    request (None: the broker's). With ``ack=False`` the broker sends no ACCEPTED.
    When the broker has been silent for ``check_interval`` seconds while requests
    are pending, the client sends RESULT for them (which also makes this socket a
    waiter again) and submits again (same id) those the broker lost (the lazy
    pirate, section 10.7).

    ``protocol``: 2 (the default) sends requests as FBC02 batches, all those a turn
    of the I/O thread has, and reads the broker's batched replies; 1 speaks FBC01, one
    message per request. Against a broker that does not speak FBC02, the client falls
    back to FBC01 by itself, after ``check_interval`` (docs/PROTOCOL.md section 12).

    Flow control: at most ``window`` requests (and ``window_bytes`` bytes of payload)
    are in flight at the broker; the others wait in this client, in order, and go as
    outcomes come back. ``submit()`` never blocks: it queues the request and returns
    its future at once (so a caller that submits without end holds its requests in
    memory; ``map`` pulls from its iterable only as answers come). The default keeps
    the broker's replies to this client below its high-water mark, so none is ever
    dropped; ``stats()`` gives the figures.

    ``curve_server_key`` (the broker's public key file) and ``curve_secret`` (this
    client's secret key file), given together, make the socket a CURVE client of a
    broker run with ``curve_secret`` and ``authorized_keys`` (fastbroker.security).
    A client whose key the broker does not accept never connects: its requests wait.
    """

    linger_ms: int = 500
    """How long closing may wait to deliver the last messages (e.g. a CANCEL)."""

    def __init__(
        self,
        address: Addresses,
        context: Optional[zmq.Context] = None,
        *,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        ack: bool = True,
        check_interval: float = 2.0,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        protocol: int = 2,
        curve_server_key: Optional[security.KeyPath] = None,
        curve_secret: Optional[security.KeyPath] = None,
        failover_after: Optional[float] = None,
    ) -> None:
        self.addresses = split_addresses(address)
        self.address = ",".join(self.addresses)
        self._set_defaults(timeout, tries, ack, check_interval, window, window_bytes, protocol)
        failover = (
            3 * self.check_interval if failover_after is None else check_seconds("failover_after", failover_after)
        )
        curve = security.client_keys(curve_server_key, curve_secret)
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context(1)
        self._sockets: List[zmq.Socket] = []
        try:
            for one in self.addresses:
                self._sockets.append(connect_dealer(self.context, one, curve))
        except BaseException:
            for sock in self._sockets:
                sock.close(0)
            if self._own_context:
                self.context.term()
            raise
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = WakePipe()
        # True from a wake-up until the I/O thread takes the commands: a burst of
        # submits writes the pipe once, not once per request.
        self._wake_pending = False
        # The "submit_many" command's list that submit() still adds to, until the I/O
        # thread takes it or another command is queued after it (None: no such list).
        self._open_batch: Optional[List[Entry]] = None
        # Held while checking `_closed` and queueing, so nothing is queued after
        # the close command (it would never be served).
        self._lock = threading.Lock()
        self._closed = False
        # Every submitted future's cancel hook: one bound method for them all (one made
        # per request was one object more a request for the collector to walk).
        self._cancel_hook = self._on_request_cancelled
        # One outbox and one book per broker; with several, a ShardedBook routes.
        self._outboxes: List[Deque[List[bytes]]] = [deque() for _ in self._sockets]
        self._book, self._books = self._new_books([o.append for o in self._outboxes], _handoff.deliver, failover)
        self._thread = threading.Thread(target=self._loop, name=f"fastbroker-client {self.address}", daemon=True)
        self._thread.start()

    # -- the API -------------------------------------------------------------------------

    def submit(
        self,
        payload: _Payload,
        *,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        request_id: Optional[bytes] = None,
    ) -> RequestFuture:
        """Send a request; the future's result is the answer (bytes joined for a bytes
        payload, the list of frames for a sequence of frames) or one of TaskFailed,
        TaskTimedOut, TaskCancelled, Rejected. ``future.cancel()`` cancels the request
        at the broker too. ``request_id``: 16 bytes (default: a new uuid4)."""
        command, future = _handoff.submit_request(payload, self._options(timeout, tries), request_id, self._cancel_hook)
        self._post_submit(command)
        return future

    def submit_many(
        self, payloads: Iterable[_Payload], *, timeout: Optional[float] = None, tries: Optional[int] = None
    ) -> List[RequestFuture]:
        """submit() of each payload, in one hand-over to the I/O thread: the futures in
        the payloads' order. Like submit(), it never blocks."""
        options = self._options(timeout, tries)
        commands, futures = [], []
        submit_request, on_cancel = _handoff.submit_request, self._cancel_hook
        for payload in payloads:
            command, future = submit_request(payload, options, None, on_cancel)
            commands.append(command)
            futures.append(future)
        if commands:
            self._post(("submit_many", commands))
        return futures

    def stats(self) -> Dict[str, int]:
        """This client's flow-control figures (read without a lock: a snapshot that may
        be a message old): ``in_flight`` requests and ``in_flight_bytes`` at the broker,
        ``queued`` in this client, and the lazy pirate's ``checks`` (RESULTs sent),
        ``refetched`` (outcomes that came after one) and ``resubmitted``."""
        return self._book.stats()

    # The answer's type follows the payload's: bytes for bytes, a list of frames for frames.
    @overload
    def call(
        self, payload: bytes, *, timeout: Optional[float] = ..., tries: Optional[int] = ..., wait: Optional[float] = ...
    ) -> bytes: ...
    @overload
    def call(
        self,
        payload: Sequence[bytes],
        *,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
        wait: Optional[float] = ...,
    ) -> List[bytes]: ...
    def call(
        self,
        payload: _Payload,
        *,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        wait: Optional[float] = None,
    ) -> Union[bytes, List[bytes]]:
        """submit() and wait for the outcome: the answer, or the outcome's exception.
        TimeoutError after `wait` seconds (None: no limit); the request is cancelled then."""
        future = self.submit(payload, timeout=timeout, tries=tries)
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no outcome from {self.address} within {wait} s") from None

    def status(self, request_id: Any, wait: Optional[float] = 5.0) -> Status:
        """What the broker says about the id; TimeoutError if it says nothing within `wait` s."""
        rid = check_request_id(request_id)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("query", rid, future))
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no status from {self.address} within {wait} s") from None

    def cancel(self, request_id: Any) -> None:
        """Ask the broker to cancel the request (it need not be this client's); this
        client's futures for it get TaskCancelled, or the outcome it already had."""
        self._post(("cancel", check_request_id(request_id)))

    # -- the dead-letter ---------------------------------------------------------------

    def dead(self, limit: int = 100, wait: Optional[float] = 5.0) -> DeadLetters:
        """The broker's dead-letter: how many requests it gave up on (FAILED or
        TIMED_OUT after their last try) and keeps with their payload, and the oldest
        `limit` of them (0 to MAX_DEAD_LIST = 1000). TimeoutError after `wait` s.
        With several brokers: theirs together, the oldest first."""
        check_dead_limit(limit)
        answers = []
        for shard in range(len(self._books)):
            rid = new_request_id()
            answers.append(dead_result(self._admin(shard, rid, dead_message(rid, limit), wait)))
        return merge_dead(answers, limit)

    def requeue(self, request_id: Any, wait: Optional[float] = 5.0) -> bool:
        """Queue a dead request again (same id and payload, every try anew): True if
        it was, False if the broker has no dead request of that id (unknown, queued,
        running, or done otherwise: status() says which); Rejected when its queue is
        full. Its new outcome: result(request_id). With several brokers, they are asked
        in order from the id's home."""
        rid = check_request_id(request_id)
        for shard in search_order(rid, len(self._books)):
            if requeue_result(self._admin(shard, rid, requeue_message(rid), wait)):
                return True
        return False

    def requeue_all(self, wait: Optional[float] = 5.0) -> Requeued:
        """Queue every dead request again, oldest first, while the broker's queue has
        room: how many were, and how many are still dead (summed over the brokers)."""
        answers = []
        for shard in range(len(self._books)):
            rid = new_request_id()
            answers.append(requeue_all_result(self._admin(shard, rid, requeue_all_message(rid), wait)))
        return Requeued(sum(a.requeued for a in answers), sum(a.dead for a in answers))

    def _admin(self, shard: int, request_id: bytes, message: List[bytes], wait: Optional[float]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("admin", shard, request_id, message, future))
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from {self.addresses[shard]} within {wait} s") from None

    def result(self, request_id: Any, *, multipart: bool = False) -> RequestFuture:
        """A future for the outcome of an id, submitted by this client or another (e.g.
        before a restart): RESULT. UnknownRequest if the broker does not know it.
        Cancelling this future only stops waiting (the request goes on)."""
        rid = check_request_id(request_id)
        future = RequestFuture()
        future.request_id = rid
        future._on_cancel = self._on_watch_cancelled
        self._post(("watch", rid, future, multipart))
        return future

    @overload
    def map(
        self,
        iterable: Iterable[bytes],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> Iterator[bytes]: ...
    @overload
    def map(
        self,
        iterable: Iterable[Sequence[bytes]],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> Iterator[List[bytes]]: ...
    @overload
    def map(
        self,
        iterable: Iterable[_Payload],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> Iterator[Union[bytes, List[bytes]]]: ...
    def map(
        self,
        iterable: Iterable[_Payload],
        *,
        window: Optional[int] = None,
        progress: bool = False,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
    ) -> Iterator[Union[bytes, List[bytes]]]:
        """The answers to the payloads, in their order, with at most `window` requests
        (default: the client's window for each broker of its list, as the window is per
        broker) submitted and not yet yielded; it takes items
        from `iterable` only as answers come, so any iterable streams in bounded
        memory. Iterating raises the exception of the first request that failed
        when it reaches it; requests still in flight are cancelled when iteration
        stops early. ``progress``: a progress bar on stderr."""
        window = self._map_window(window)
        encode_options(timeout, tries)  # bad options fail here, not at the first next()
        return self._map(iterable, window, progress, timeout, tries)

    def _map(
        self, iterable: Iterable[_Payload], window: int, progress: bool, timeout: Optional[float], tries: Optional[int]
    ) -> Iterator[Any]:
        items, total = iter_with_len(iterable)
        bar = Progress(sys.stderr, total) if progress else None
        in_flight: Deque[Any] = deque()  # the MapSlots of the requests not yet yielded
        source = iter(items)
        options = self._options(timeout, tries)
        event = threading.Event()  # set by the I/O thread when the slot waited for is done
        # Refilled by batches (a quarter of the window at least), each one hand-over
        # to the I/O thread: a submit() per item costs a lock and a queue put each.
        refill_at = window - max(1, window // 4)
        map_commands = _handoff.map_commands
        try:
            exhausted = False
            while True:
                if not exhausted and len(in_flight) <= refill_at:
                    commands, exhausted = map_commands(source, window - len(in_flight), options, in_flight)
                    if commands:
                        self._post(("submit_many", commands))
                if not in_flight:
                    return
                answer = in_flight.popleft().result(event)
                if bar is not None:
                    bar.update()
                yield answer
        finally:
            # Stopped early: the requests still in flight are cancelled at the broker.
            cancelled = [("forget", slot.request_id, slot, True) for slot in in_flight if not slot.done]
            if cancelled and not self._closed:
                try:
                    self._post(("forget_many", cancelled))
                except BrokerError:
                    pass  # closed meanwhile: nothing to tell the broker any more
            if bar is not None:
                bar.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the I/O thread; futures still pending fail with BrokerError("client closed")."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(_CLOSE)
            self._wake.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # -- between threads -----------------------------------------------------------------

    def _post(self, command: tuple) -> None:
        with self._lock:
            if self._closed:
                raise BrokerError("client closed")
            self._commands.put(command)
            self._open_batch = None  # submits from now on go after this command
            if not self._wake_pending:
                self._wake_pending = True
                self._wake.wake()

    def _post_submit(self, command: Entry) -> None:
        """Queue a submit() command: in the batch of submits still waiting for the I/O
        thread if there is one (the I/O thread then runs them in one compiled call,
        and this one costs no queue put), else as a new batch."""
        with self._lock:
            if self._closed:
                raise BrokerError("client closed")
            batch = self._open_batch
            if batch is None:
                batch = self._open_batch = []
                self._commands.put(("submit_many", batch))
                if not self._wake_pending:
                    self._wake_pending = True
                    self._wake.wake()
            batch.append(command)

    def _on_request_cancelled(self, future: RequestFuture) -> None:
        try:
            self._post(("forget", future.request_id, future, True))
        except BrokerError:
            pass  # closed: nothing to tell the broker any more

    def _on_watch_cancelled(self, future: RequestFuture) -> None:
        try:
            self._post(("forget", future.request_id, future, False))
        except BrokerError:
            pass

    # -- the I/O thread ------------------------------------------------------------------

    def _serve_commands(self) -> bool:
        """Run the queued commands; False once the close command is reached."""
        book = self._book
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            kind = command[0]
            if kind == "submit_many":  # submit(), submit_many() and map() queue these
                if command[1] is self._open_batch:
                    with self._lock:  # closed to submit() before it is read
                        if command[1] is self._open_batch:
                            self._open_batch = None
                book.submit_many(command[1])
            elif kind == "forget":
                book.forget(command[1], command[2], command[3])
            elif kind == "forget_many":
                for one in command[1]:
                    book.forget(one[1], one[2], one[3])
            elif kind == "query":
                book.query(command[1], command[2])
            elif kind == "watch":
                book.watch(command[1], command[2], command[3])
            elif kind == "cancel":
                book.cancel(command[1])
            elif kind == "admin":
                self._books[command[1]].admin(command[2], command[3], command[4])
            else:
                return False

    @staticmethod
    def _flush(outbox: Deque[List[bytes]], socket: zmq.Socket) -> None:
        send = _wire.send_message
        while outbox:
            if not send(socket, outbox[0]):
                return  # the socket's queue is full: POLLOUT says when to go on
            outbox.popleft()

    def _loop(self) -> None:
        book, books, sockets, outboxes = self._book, self._books, self._sockets, self._outboxes
        poller = zmq.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        poller.register(self._wake.read_fd, zmq.POLLIN)
        # What each socket is polled for now: changed only when its outbox fills or
        # empties (a modify() and pyzmq's enum operators cost microseconds a socket a turn).
        polled_for = [_POLLIN] * len(sockets)
        try:
            running = True
            while running:
                due = book.next_check()
                for i, outbox in enumerate(outboxes):
                    wanted = _POLLIN_OUT if outbox else _POLLIN
                    if polled_for[i] != wanted:
                        poller.modify(sockets[i], wanted)
                        polled_for[i] = wanted
                events = dict(poller.poll(None if due is None else max(1, int(due * 1000) + 1)))
                if self._wake.read_fd in events:
                    self._wake.drain()
                    # Before taking the commands: one posted from now on wakes again.
                    self._wake_pending = False
                running = self._serve_commands()
                for socket, one in zip(sockets, books):
                    if events.get(socket, 0) & _POLLIN:
                        self._receive(socket, one)
                book.tick()
                book.flush_submits()  # FBC02: this turn's requests, batched
                for socket, outbox in zip(sockets, outboxes):
                    if outbox:
                        self._flush(outbox, socket)
        except Exception:
            log.exception("the client's I/O thread failed")
        finally:
            with self._lock:
                self._closed = True
            # Commands queued before the close command still wait for an answer.
            self._serve_leftovers()
            book.fail_all(BrokerError("client closed"))
            for socket in sockets:
                socket.close()
            if self._own_context:
                self.context.term()
            self._wake.close()

    @staticmethod
    def _receive(socket: zmq.Socket, book: Any) -> None:
        on_message = book.on_message
        for frames in _wire.recv_messages(socket, RECV_BATCH):
            on_message(frames)

    def _serve_leftovers(self) -> None:
        closed = BrokerError("client closed")
        deliver = _handoff.deliver
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "submit_many":
                for one in command[1]:
                    deliver(one.future, None, closed)
            elif command[0] in ("query", "watch"):
                deliver(command[2], None, closed)
            elif command[0] == "admin":
                deliver(command[4], None, closed)
