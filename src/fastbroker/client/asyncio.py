"""``AsyncClient``: the FBC01 client on asyncio (zmq.asyncio), one reader task per client.

The same logic as ``fastbroker.Client`` (fastbroker.client.book.RequestBook:
routing replies by id, the lazy pirate); only the loop around the socket differs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections import deque
from types import TracebackType
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
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
from fastbroker.client.sync import Client, _wire, connect_dealer
from fastbroker.protocol import RECV_BATCH

log = logging.getLogger("fastbroker.async_client")


class AsyncRequestFuture(asyncio.Future):
    """An AsyncClient's future for one request; ``request_id`` is its 16-byte id."""

    request_id: bytes


def _deliver(future: asyncio.Future, value: Any, exc: Optional[BaseException]) -> None:
    if future.done():
        return  # cancelled by its owner meanwhile
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


def _send(socket: zmq.asyncio.Socket, frames: List[bytes]) -> None:
    # pyzmq sends at once when it can and queues in order when it cannot. What it
    # returns is an asyncio.Future; its hints say only Awaitable.
    socket.send_multipart(frames).add_done_callback(_ignore_send_result)  # type: ignore[attr-defined]


def _ignore_send_result(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("send failed: %s", future.exception())


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
        sends = [functools.partial(_send, sock) for sock in self._sockets]
        self._book, self._books = self._new_books(sends, _deliver, failover, self._flush_soon)
        self._reader: Optional[asyncio.Task] = None
        self._closed = False

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
        future.add_done_callback(self._on_request_done)
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
        future.add_done_callback(self._on_watch_done)
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
        in_flight: Deque[AsyncRequestFuture] = deque()
        try:
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < window:
                    try:
                        payload = await source.__anext__() if is_async else next(source)
                    except (StopIteration, StopAsyncIteration):
                        exhausted = True
                        break
                    in_flight.append(self.submit(payload, timeout=timeout, tries=tries))
                if not in_flight:
                    return
                answer = await in_flight.popleft()
                if bar is not None:
                    bar.update()
                yield answer
        finally:
            for future in in_flight:
                future.cancel()
            if bar is not None:
                bar.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop the reader task; futures still pending fail with BrokerError("client closed")."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._book.fail_all(BrokerError("client closed"))
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

    def _on_request_done(self, future: asyncio.Future) -> None:
        if future.cancelled() and not self._closed:
            self._book.forget(future.request_id, future, True)  # type: ignore[attr-defined]

    def _on_watch_done(self, future: asyncio.Future) -> None:
        if future.cancelled() and not self._closed:
            self._book.forget(future.request_id, future, False)  # type: ignore[attr-defined]

    async def _read(self) -> None:
        book, books, sockets = self._book, self._books, self._sockets
        # The same sockets as plain (blocking-API) ones, which the wire reads: an asyncio
        # socket's recv returns a future. A shadow does not own its socket.
        plains = [zmq.Socket.shadow(socket.underlying) for socket in sockets]
        poller = zmq.asyncio.Poller()
        for socket in sockets:
            poller.register(socket, zmq.POLLIN)
        try:
            while True:
                due = book.next_check()
                wait = self.check_interval if due is None else due
                events = dict(await poller.poll(max(1, int(wait * 1000) + 1)))
                for socket, plain, one in zip(sockets, plains, books):
                    if socket.closed or not events.get(socket, 0) & zmq.POLLIN:
                        continue  # (a shadow cannot tell that its socket was closed)
                    # Read at once, without a future per message: these never block.
                    for frames in _wire.recv_messages(plain, RECV_BATCH):
                        one.on_message(frames)
                book.tick()
                book.flush_submits()  # held requests that the outcomes let in
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the client's reader task failed")
            self._closed = True
            self._book.fail_all(BrokerError("client closed"))


__all__ = ["AsyncClient", "AsyncRequestFuture"]
