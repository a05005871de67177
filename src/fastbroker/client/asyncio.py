"""``AsyncClient``: the FBC01 client on asyncio (zmq.asyncio), one reader task per client.

The same logic as ``fastbroker.Client`` (fastbroker.client.book.RequestBook:
routing replies by id, the lazy pirate); only the loop around the socket differs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from types import TracebackType
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Type,
    Union,
    overload,
)

import zmq
import zmq.asyncio

from fastbroker import security
from fastbroker._common import BrokerError, check_seconds
from fastbroker.addresses import Addresses, split_addresses
from fastbroker.client.outcomes import DeadLetters, Requeued, Status
from fastbroker.client.protocol import (
    DEFAULT_WINDOW,
    DEFAULT_WINDOW_BYTES,
    Payload,
    Progress,
    RequestDefaults,
    check_dead_limit,
    check_request_id,
    dead_message,
    dead_result,
    encode_options,
    iter_with_len,
    new_request_id,
    payload_frames,
    requeue_all_message,
    requeue_all_result,
    requeue_message,
    requeue_result,
    submit_message,
)
from fastbroker.client.shards import merge_dead, search_order
from fastbroker.client.sync import Client, _handoff, _wire, connect_dealer
from fastbroker.protocol import RECV_BATCH

log = logging.getLogger("fastbroker.async_client")


class AsyncRequestFuture(asyncio.Future):
    """An AsyncClient's future for one request; ``request_id`` is its 16-byte id.

    ``cancel()`` also tells the client (which tells the broker, for a submitted
    request): an override rather than a done-callback, which would cost every request
    a callback scheduled on the event loop when it finishes."""

    request_id: bytes
    _on_cancel: Optional[Callable[[AsyncRequestFuture], None]] = None

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True


class _MapSlot:
    """A request of ``AsyncClient.map``: what a future does for it, cheaper (an
    asyncio future is made only when the map waits for this very one)."""

    __slots__ = ("request_id", "value", "exc", "finished", "waiter")

    def __init__(self, request_id: bytes) -> None:
        self.request_id = request_id
        self.value: Any = None
        self.exc: Optional[BaseException] = None
        self.finished = False
        self.waiter: Optional[asyncio.Future] = None

    def done(self) -> bool:
        return self.finished

    def resolve(self, value: Any, exc: Optional[BaseException]) -> None:
        if self.finished:
            return  # told its outcome once
        self.value, self.exc = value, exc
        self.finished = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def result(self) -> Any:
        if not self.finished:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.outcome()

    def outcome(self) -> Any:
        """The answer of a finished slot, or its exception raised."""
        if self.exc is not None:
            raise self.exc
        return self.value


def _deliver(future: Any, value: Any, exc: Optional[BaseException]) -> None:
    if type(future) is _MapSlot:
        future.resolve(value, exc)
        return
    if future.done():
        return  # cancelled by its owner meanwhile
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


class _Sender:
    """An AsyncClient's sends on one socket: each message at once in one call of the
    compiled wire (pyzmq's asyncio send_multipart costs a call and a flag operation a
    frame and a future a message) or, when the socket's queue is full, kept in order
    and sent by a task that waits for room."""

    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self.socket = socket
        self.plain = zmq.Socket.shadow(socket.underlying)  # the wire's: it does not own the socket
        self.outbox: Deque[List[bytes]] = deque()
        self.draining: Optional[asyncio.Task] = None

    def send(self, frames: List[bytes]) -> None:
        try:
            if self.outbox or not _wire.send_message(self.plain, frames):
                self.outbox.append(frames)
                if self.draining is None:
                    self.draining = asyncio.get_running_loop().create_task(self._drain())
                return
            self.notice_events()
        except zmq.ZMQError as exc:
            log.debug("send failed: %s", exc)

    def notice_events(self) -> None:
        """After libzmq calls made past pyzmq's asyncio socket: they may have taken the
        socket's edge-triggered signal, so the reader's poll (or the task waiting for
        room) would not wake for what is pending; asked for EVENTS, the asyncio socket
        looks and wakes them."""
        self.socket.get(zmq.EVENTS)

    async def _drain(self) -> None:
        try:
            while self.outbox:
                # pyzmq 27's stub gives poll() a timeout only; the method takes flags too.
                await self.socket.poll(None, zmq.POLLOUT)  # type: ignore[call-arg]
                while self.outbox and _wire.send_message(self.plain, self.outbox[0]):
                    self.outbox.popleft()
                self.notice_events()
        except zmq.ZMQError as exc:
            # The socket is gone (closed, its context ended): none of these can go.
            log.debug("send failed: %s; %d message(s) not sent", exc, len(self.outbox))
            self.outbox.clear()
        finally:
            self.draining = None

    async def close(self) -> None:
        """What is still waiting for room is not sent (as pyzmq's queued sends at close)."""
        draining = self.draining
        self.outbox.clear()
        if draining is not None:
            draining.cancel()
            try:
                await draining
            except asyncio.CancelledError:
                pass


class AsyncClient(RequestDefaults):
    """An FBC01 client for asyncio; see ``fastbroker.Client`` for the behaviour.

    ``submit()`` and ``result()`` return an asyncio future (``await`` it for the
    answer); ``call``, ``status``, ``cancel`` and ``close`` are coroutines; ``map``
    is an async iterator. Use it from one event loop, e.g. ``async with
    AsyncClient(address) as client: ...``. ``context`` may be a zmq.asyncio.Context
    or a plain zmq.Context (shadowed). ``curve_server_key`` and ``curve_secret``: as
    for ``Client``.
    """

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
        if context is None:
            self.context: zmq.asyncio.Context = zmq.asyncio.Context(1)
        elif isinstance(context, zmq.asyncio.Context):
            self.context = context
        else:
            self.context = zmq.asyncio.Context.shadow(context.underlying)
        self._sockets: List[zmq.asyncio.Socket] = []
        try:
            for one in self.addresses:
                self._sockets.append(connect_dealer(self.context, one, curve))
        except BaseException:
            for sock in self._sockets:
                sock.close(0)
            if self._own_context:
                self.context.term()
            raise
        self._senders = [_Sender(sock) for sock in self._sockets]
        sends = [sender.send for sender in self._senders]
        self._book, self._books = self._new_books(sends, _deliver, failover, self._flush_soon)
        self._reader: Optional[asyncio.Task] = None
        self._closed = False
        # Every submitted future's cancel hook: one bound method for them all (one made
        # per request was one object more a request for the collector to walk).
        self._cancel_hook = self._on_request_cancelled
        self._released = False  # close() has closed the sockets (the reader may close the client before)

    # -- the API -------------------------------------------------------------------------

    def _flush_soon(self) -> None:
        # The first request of a batch: the rest of this callback's submits join it,
        # and it goes when the event loop next runs its callbacks.
        asyncio.get_running_loop().call_soon(self._book.flush_submits)

    def _start(self) -> None:
        if self._closed:
            raise BrokerError("client closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"fastbroker-client {self.address}"
            )

    def submit(
        self,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        request_id: Optional[bytes] = None,
    ) -> AsyncRequestFuture:
        """Send a request; await the future for the answer (or the outcome's exception).
        Cancelling the future cancels the request at the broker too. It never blocks:
        beyond the client's window the request waits in the client (see Client)."""
        return self._submit(payload, self._options(timeout, tries), request_id)

    def submit_many(
        self, payloads: Iterable[Payload], *, timeout: Optional[float] = None, tries: Optional[int] = None
    ) -> List[AsyncRequestFuture]:
        """submit() of each payload: the futures in the payloads' order."""
        options = self._options(timeout, tries)
        return [self._submit(payload, options, None) for payload in payloads]

    def _submit(self, payload: Payload, options: bytes, request_id: Optional[bytes]) -> AsyncRequestFuture:
        frames, multipart = payload_frames(payload)
        rid = new_request_id() if request_id is None else check_request_id(request_id)
        self._start()
        future = AsyncRequestFuture()
        future.request_id = rid
        future._on_cancel = self._cancel_hook
        self._book.submit(rid, submit_message(rid, options, frames), future, multipart)
        return future

    def stats(self) -> Dict[str, int]:
        """This client's flow-control figures: see Client.stats()."""
        return self._book.stats()

    # The answer's type follows the payload's: bytes for bytes, a list of frames for frames.
    @overload
    async def call(
        self, payload: bytes, *, timeout: Optional[float] = ..., tries: Optional[int] = ..., wait: Optional[float] = ...
    ) -> bytes: ...
    @overload
    async def call(
        self,
        payload: Sequence[bytes],
        *,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
        wait: Optional[float] = ...,
    ) -> List[bytes]: ...
    async def call(
        self,
        payload: Payload,
        *,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        wait: Optional[float] = None,
    ) -> Union[bytes, List[bytes]]:
        """submit() and await the outcome; TimeoutError after `wait` s (the request is cancelled then)."""
        future = self.submit(payload, timeout=timeout, tries=tries)
        try:
            return await asyncio.wait_for(future, wait)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no outcome from {self.address} within {wait} s") from None

    async def status(self, request_id: Any, wait: Optional[float] = 5.0) -> Status:
        """What the broker says about the id; TimeoutError if it says nothing within `wait` s."""
        rid = check_request_id(request_id)
        self._start()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._book.query(rid, future)
        try:
            return await asyncio.wait_for(future, wait)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no status from {self.address} within {wait} s") from None

    async def cancel(self, request_id: Any) -> None:
        """Ask the broker to cancel the request; this client's futures for it get
        TaskCancelled, or the outcome it already had."""
        rid = check_request_id(request_id)
        self._start()
        self._book.cancel(rid)

    # -- the dead-letter ---------------------------------------------------------------

    async def dead(self, limit: int = 100, wait: Optional[float] = 5.0) -> DeadLetters:
        """The broker's dead-letter: see Client.dead()."""
        check_dead_limit(limit)
        answers = []
        for shard in range(len(self._books)):
            rid = new_request_id()
            answers.append(dead_result(await self._admin(shard, rid, dead_message(rid, limit), wait)))
        return merge_dead(answers, limit)

    async def requeue(self, request_id: Any, wait: Optional[float] = 5.0) -> bool:
        """Queue a dead request again: see Client.requeue()."""
        rid = check_request_id(request_id)
        for shard in search_order(rid, len(self._books)):
            if requeue_result(await self._admin(shard, rid, requeue_message(rid), wait)):
                return True
        return False

    async def requeue_all(self, wait: Optional[float] = 5.0) -> Requeued:
        """Queue every dead request again: see Client.requeue_all()."""
        answers = []
        for shard in range(len(self._books)):
            rid = new_request_id()
            answers.append(requeue_all_result(await self._admin(shard, rid, requeue_all_message(rid), wait)))
        return Requeued(sum(a.requeued for a in answers), sum(a.dead for a in answers))

    async def _admin(self, shard: int, request_id: bytes, message: List[bytes], wait: Optional[float]) -> Any:
        self._start()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._books[shard].admin(request_id, message, future)
        try:
            return await asyncio.wait_for(future, wait)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer from {self.addresses[shard]} within {wait} s") from None

    def result(self, request_id: Any, *, multipart: bool = False) -> AsyncRequestFuture:
        """A future for the outcome of an id submitted by this client or another
        (RESULT). Cancelling it only stops waiting."""
        rid = check_request_id(request_id)
        self._start()
        future = AsyncRequestFuture()
        future.request_id = rid
        future._on_cancel = self._on_watch_cancelled
        self._book.watch(rid, future, multipart)
        return future

    @overload
    def map(
        self,
        iterable: Union[Iterable[bytes], AsyncIterable[bytes]],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> AsyncIterator[bytes]: ...
    @overload
    def map(
        self,
        iterable: Union[Iterable[Sequence[bytes]], AsyncIterable[Sequence[bytes]]],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> AsyncIterator[List[bytes]]: ...
    @overload
    def map(
        self,
        iterable: Union[Iterable[Payload], AsyncIterable[Payload]],
        *,
        window: Optional[int] = ...,
        progress: bool = ...,
        timeout: Optional[float] = ...,
        tries: Optional[int] = ...,
    ) -> AsyncIterator[Union[bytes, List[bytes]]]: ...
    def map(
        self,
        iterable: Union[Iterable[Payload], AsyncIterable[Payload]],
        *,
        window: Optional[int] = None,
        progress: bool = False,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
    ) -> AsyncIterator[Union[bytes, List[bytes]]]:
        """An async iterator of the answers in input order, at most `window` (default:
        the client's for each broker of its list) submitted and not yet yielded (see
        Client.map). `iterable` may be a plain or an async iterable."""
        window = self._map_window(window)
        encode_options(timeout, tries)
        return self._map(iterable, window, progress, timeout, tries)

    async def _map(
        self, iterable: Any, window: int, progress: bool, timeout: Optional[float], tries: Optional[int]
    ) -> AsyncIterator[Any]:
        is_async = hasattr(iterable, "__aiter__")
        if is_async:
            source: Any = iterable.__aiter__()
            total = None
        else:
            items, total = iter_with_len(iterable)
            source = iter(items)
        bar = Progress(sys.stderr, total) if progress else None
        in_flight: Deque[_MapSlot] = deque()
        options = self._options(timeout, tries)
        book = self._book
        map_commands = _handoff.map_commands
        # Refilled by batches (a quarter of the window at least), as Client.map does.
        refill_at = window - max(1, window // 4)
        try:
            exhausted = False
            while True:
                if not exhausted and not is_async and len(in_flight) <= refill_at:
                    self._start()
                    # A plain iterable: the batch made in one call (client/handoff.py), as
                    # Client.map's, and given to the book in one.
                    commands, exhausted = map_commands(source, window - len(in_flight), options, in_flight, _MapSlot)
                    if self._closed:  # closed meanwhile (by a payload's iterator)
                        raise BrokerError("client closed")
                    book.submit_many(commands)
                elif not exhausted and len(in_flight) <= refill_at:
                    self._start()
                    while len(in_flight) < window:  # an async iterable: one await an item
                        try:
                            payload = await source.__anext__()
                        except StopAsyncIteration:
                            exhausted = True
                            break
                        if self._closed:  # meanwhile (an async iterable's await)
                            raise BrokerError("client closed")
                        frames, multipart = payload_frames(payload)
                        slot = _MapSlot(new_request_id())
                        book.submit(slot.request_id, submit_message(slot.request_id, options, frames), slot, multipart)
                        in_flight.append(slot)
                if not in_flight:
                    return
                slot = in_flight[0]
                # An answer already there is taken without a coroutine made to await it.
                answer = slot.outcome() if slot.finished else await slot.result()
                in_flight.popleft()
                if bar is not None:
                    bar.update()
                yield answer
        finally:
            # Stopped early: the requests still in flight are cancelled at the broker.
            if not self._closed:
                for slot in in_flight:
                    if not slot.finished:
                        book.forget(slot.request_id, slot, True)
            if bar is not None:
                bar.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop the reader task; futures still pending fail with BrokerError("client closed")."""
        if self._released:
            return
        self._closed = self._released = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._book.fail_all(BrokerError("client closed"))
        for sender in self._senders:
            await sender.close()
        for socket in self._sockets:
            socket.close(Client.linger_ms)
        if self._own_context:
            self.context.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------

    def _on_request_cancelled(self, future: AsyncRequestFuture) -> None:
        if not self._closed:
            self._book.forget(future.request_id, future, True)

    def _on_watch_cancelled(self, future: AsyncRequestFuture) -> None:
        if not self._closed:
            self._book.forget(future.request_id, future, False)

    async def _read(self) -> None:
        book, books, sockets, senders = self._book, self._books, self._sockets, self._senders
        poller = zmq.asyncio.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        try:
            while True:
                due = book.next_check()
                wait = self.check_interval if due is None else due
                events = dict(await poller.poll(max(1, int(wait * 1000) + 1)))
                for socket, sender, one in zip(sockets, senders, books):
                    if socket.closed or not events.get(socket, 0) & zmq.POLLIN:
                        continue  # (a shadow cannot tell that its socket was closed)
                    # Read at once, on the sender's plain socket, without a future per
                    # message (an asyncio socket's recv returns one): these never block.
                    for frames in _wire.recv_messages(sender.plain, RECV_BATCH):
                        one.on_message(frames)
                    if sender.draining is not None:
                        sender.notice_events()  # the task waiting for room must see it
                book.tick()
                book.flush_submits()  # held requests that the outcomes let in
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the client's reader task failed")
            self._closed = True
            self._book.fail_all(BrokerError("client closed"))


__all__ = ["AsyncClient", "AsyncRequestFuture"]
