"""Pure-Python broker core: the same interface and behaviour as the compiled ``_core``.

It is the fallback where the extension cannot be built and the yardstick the
compiled core is measured against. Payload frames travel as ``zmq.Frame`` objects
received with ``copy=False``, so they are shared, not copied, here too.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Tuple

import zmq

from fastbroker import _common
from fastbroker._common import check_timeout, check_tries

monotonic = time.monotonic

_QUEUED = 1
_RUNNING = 2


def _address_key(routing_frames: list) -> bytes:
    # Length-prefixed routing frames, as the compiled core keys its idle workers.
    return b"".join(len(f).to_bytes(4, "little") + bytes(f) for f in routing_frames)


class IdleWorkers:
    """Workers that asked for a job, oldest first; O(1) push, pop and removal by address."""

    def __init__(self) -> None:
        self._workers: "OrderedDict[bytes, list]" = OrderedDict()

    def _push_env(self, key: bytes, env: list) -> None:
        # Re-inserting moves the address to the back: its earlier "ready" is stale.
        self._workers.pop(key, None)
        self._workers[key] = env

    def _pop_env(self) -> Optional[list]:
        if not self._workers:
            return None
        return self._workers.popitem(last=False)[1]

    def push(self, address: bytes) -> None:
        """Mark the worker at `address` idle (again: its earlier entry is replaced)."""
        if len(address) > 255:
            raise ValueError("a worker address is at most 255 bytes")
        self._push_env(_address_key([address]), [address, b""])

    def pop(self) -> Optional[bytes]:
        """Address of the oldest idle worker, removed; None if there is none."""
        env = self._pop_env()
        return None if env is None else bytes(env[0])

    def remove(self, address: bytes) -> bool:
        """Forget an idle worker; False if it was not idle."""
        return self._workers.pop(_address_key([address]), None) is not None

    def __contains__(self, address: bytes) -> bool:
        return _address_key([address]) in self._workers

    def __len__(self) -> int:
        return len(self._workers)


class DeadlineHeap:
    """Attempt deadlines, soonest first. Removal marks the entry dead (O(1)); dead
    entries are skipped when they surface and purged when they outnumber live ones."""

    def __init__(self) -> None:
        self._heap: List[list] = []
        self._entries: Dict[int, list] = {}
        self._seq = itertools.count()

    def push(self, key: int, deadline: float) -> None:
        """Set key's deadline (an existing one is replaced)."""
        if not 0 <= key < _common.HEAP_KEY_LIMIT:
            raise ValueError(f"key must be in [0, {_common.HEAP_KEY_LIMIT})")
        self._insert(key, deadline)

    def _insert(self, key: int, deadline: float) -> None:
        self.remove(key)
        entry = [float(deadline), next(self._seq), key, True]
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)

    def remove(self, key: int) -> bool:
        """Forget key's deadline; False if it had none."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        entry[3] = False
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._entries):
            self._heap = [e for e in self._heap if e[3]]
            heapq.heapify(self._heap)
        return True

    def _top(self) -> Optional[list]:
        heap = self._heap
        while heap and not heap[0][3]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def peek(self) -> Optional[Tuple[float, int]]:
        """(deadline, key) of the soonest deadline, or None."""
        top = self._top()
        return None if top is None else (top[0], top[2])

    def pop(self) -> Tuple[float, int]:
        """Remove and return (deadline, key) of the soonest deadline; IndexError if empty."""
        top = self._top()
        if top is None:
            raise IndexError("pop from an empty DeadlineHeap")
        heapq.heappop(self._heap)
        del self._entries[top[2]]
        return (top[0], top[2])

    def __len__(self) -> int:
        return len(self._entries)


class _Request:
    __slots__ = ("key", "task_id", "env", "payload", "state", "tries_left")

    def __init__(self, key: int, task_id: bytes, env: list, payload: list, tries_left: int) -> None:
        self.key = key
        self.task_id = task_id
        self.env = env
        self.payload = payload
        self.state = _QUEUED
        self.tries_left = tries_left


class RequestTable:
    """Requests in the broker, keyed by 16-byte task ids (8-byte epoch + counter)."""

    def __init__(self, epoch: Optional[bytes] = None) -> None:
        if epoch is None:
            epoch = os.urandom(8)
        if len(epoch) != 8:
            raise ValueError("epoch must be 8 bytes")
        self._epoch = epoch
        self._counter = itertools.count(1)
        self._requests: Dict[bytes, _Request] = {}

    def _new(self, env: list, payload: list, tries_left: int) -> _Request:
        key = next(self._counter)
        task_id = self._epoch + key.to_bytes(8, "little")
        request = _Request(key, task_id, env, payload, tries_left)
        self._requests[task_id] = request
        return request

    def add(self) -> bytes:
        """Register an (empty) request and return its task id."""
        return self._new([], [], -1).task_id

    def discard(self, task_id: bytes) -> bool:
        """Forget a request; False if the id is unknown or stale."""
        return self._requests.pop(task_id, None) is not None

    def __contains__(self, task_id: bytes) -> bool:
        return task_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)


class BrokerCore:
    """Routes requests to workers that asked, with per-attempt deadlines and tries.

    ``run()`` polls the three sockets and a wake fd; it returns when the fd is
    readable, a signal interrupts the poll, ``max_wait`` seconds pass, or (with
    ``stop_on_drop``) a message was dropped.
    """

    def __init__(
        self,
        requests: zmq.Socket,
        workers: zmq.Socket,
        answers: zmq.Socket,
        timeout: Optional[float] = None,
        tries: Optional[int] = None,
        *,
        epoch: Optional[bytes] = None,
    ) -> None:
        self._timeout = check_timeout(timeout)
        self._tries = check_tries(tries)
        self._requests = requests
        self._workers = workers
        self._answers = answers
        self._table = RequestTable(epoch)
        self._idle = IdleWorkers()
        self._heap = DeadlineHeap()
        self._by_key: Dict[int, _Request] = {}
        self._waiting: Deque[_Request] = deque()
        self._retry: Deque[_Request] = deque()
        self._n_queued = 0
        self._counters = dict.fromkeys(_common.COUNTERS, 0)
        self._drops = [0] * len(_common.DROP_REASONS)
        self._last_drop: Optional[int] = None
        self._closed = False

    @property
    def timeout(self) -> Optional[float]:
        return self._timeout

    @property
    def tries(self) -> Optional[int]:
        return self._tries

    @property
    def last_drop(self) -> Optional[str]:
        """Reason text of the latest dropped message, or None."""
        return None if self._last_drop is None else _common.DROP_REASONS[self._last_drop]

    def stats(self) -> dict:
        """Counters since start and current gauges, as a dict of ints."""
        result = dict(self._counters)
        result["queued"] = self._n_queued
        result["running"] = len(self._table) - self._n_queued
        result["idle_workers"] = len(self._idle)
        result["drops"] = {
            _common.DROP_REASONS[i]: n for i, n in enumerate(self._drops) if n
        }
        return result

    def close(self) -> None:
        """Release every message the core holds (queued jobs, idle workers)."""
        self._closed = True
        self._table = RequestTable()
        self._idle = IdleWorkers()
        self._heap = DeadlineHeap()
        self._by_key.clear()
        self._waiting.clear()
        self._retry.clear()
        self._n_queued = 0

    def run(self, wake_fd: int = -1, max_wait: Optional[float] = None, stop_on_drop: bool = False) -> int:
        """Serve until woken; returns one of _common.RUN_*. Raises zmq.ZMQError on a socket error."""
        if self._closed:
            raise RuntimeError("BrokerCore is closed")
        poller = zmq.Poller()
        poller.register(self._requests, zmq.POLLIN)
        poller.register(self._workers, zmq.POLLIN)
        poller.register(self._answers, zmq.POLLIN)
        if wake_fd >= 0:
            poller.register(wake_fd, zmq.POLLIN)
        t_end = None if max_wait is None else monotonic() + max(0.0, max_wait)
        self._last_drop = None
        polled = False
        while True:
            now = monotonic()
            self._expire(now)
            self._dispatch(now)
            if stop_on_drop and self._last_drop is not None:
                return _common.RUN_DROP
            # Poll at least once, and act on what was read before returning.
            if polled and t_end is not None and now >= t_end:
                return _common.RUN_TIMEOUT
            polled = True
            next_t = t_end
            top = self._heap.peek()
            if top is not None and (next_t is None or top[0] < next_t):
                next_t = top[0]
            if next_t is None:
                ms = None
            elif next_t <= now:
                ms = 0
            else:
                # Round up: waking before the deadline would only spin.
                ms = int((next_t - now) * 1000.0) + 1
            try:
                ready = dict(poller.poll(ms))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    return _common.RUN_WOKEN
                raise
            if wake_fd >= 0 and wake_fd in ready:
                return _common.RUN_WOKEN
            # Ready messages first, so jobs arriving in the same turn find them.
            if self._workers in ready:
                self._drain(self._workers, self._on_ready)
            if self._answers in ready:
                self._drain(self._answers, self._on_answer)
            if self._requests in ready:
                self._drain(self._requests, self._on_request)

    # -- message handling -----------------------------------------------------

    def _drain(self, socket: zmq.Socket, handle) -> None:
        for _ in range(_common.RECV_BATCH):
            try:
                frames = socket.recv_multipart(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return
            if len(frames) > _common.MAX_FRAMES:
                self._drop(_common.DROP_TOO_MANY_FRAMES)
                continue
            handle(frames)

    def _drop(self, reason: int) -> None:
        self._counters["dropped"] += 1
        self._drops[reason] += 1
        self._last_drop = reason

    @staticmethod
    def _delimiter(frames: list) -> int:
        for i, frame in enumerate(frames):
            if len(frame) == 0:
                return i
        return -1

    def _on_request(self, frames: list) -> None:
        d = self._delimiter(frames)
        if d < 1:
            self._drop(_common.DROP_REQUEST_NO_DELIMITER)
            return
        if d == len(frames) - 1:
            self._drop(_common.DROP_REQUEST_NO_PAYLOAD)
            return
        tries_left = -1 if self._tries is None else self._tries
        request = self._table._new(frames[: d + 1], frames[d + 1 :], tries_left)
        self._by_key[request.key] = request
        self._waiting.append(request)
        self._n_queued += 1
        self._counters["requests"] += 1

    def _on_ready(self, frames: list) -> None:
        d = self._delimiter(frames)
        if d < 1:
            self._drop(_common.DROP_READY_NO_DELIMITER)
            return
        if len(frames) != d + 2:
            self._drop(_common.DROP_READY_BAD_FRAMES)
            return
        # The same length-prefixed address key as the compiled core, so both treat
        # a second "ready" from one address alike.
        self._idle._push_env(_address_key(frames[:d]), frames[: d + 1])
        self._counters["ready"] += 1

    def _on_answer(self, frames: list) -> None:
        if len(frames) < 2:
            self._drop(_common.DROP_ANSWER_TOO_SHORT)
            return
        task_id = frames[0].bytes
        if len(task_id) != _common.TASK_ID_SIZE:
            self._drop(_common.DROP_ANSWER_BAD_ID)
            return
        request = self._table._requests.pop(task_id, None)
        if request is None:
            self._drop(_common.DROP_ANSWER_UNKNOWN)
            return
        del self._by_key[request.key]
        self._send_to_client(request, frames[1:])
        if request.state == _QUEUED:
            # Answered by an earlier attempt while waiting for a retry; the queue
            # entry is skipped when it reaches the front (the request is gone).
            self._n_queued -= 1
            self._counters["late_answers"] += 1
        else:
            self._heap.remove(request.key)
        self._counters["answered"] += 1

    def _send_to_client(self, request: _Request, body: list) -> None:
        # A client that is gone or not reading loses its answer: ROUTER drops it.
        try:
            self._requests.send_multipart(request.env + body, zmq.DONTWAIT, copy=False)
        except zmq.Again:
            pass

    def _expire(self, now: float) -> None:
        heap = self._heap
        while True:
            top = heap.peek()
            if top is None or top[0] > now:
                return
            heap.pop()
            request = self._by_key[top[1]]
            self._counters["timeouts"] += 1
            if request.tries_left == 0:
                self._finish(request)
                self._send_to_client(request, [b""])
                self._counters["aborted"] += 1
            else:
                request.state = _QUEUED
                self._retry.append(request)
                self._n_queued += 1
                self._counters["retried"] += 1

    def _finish(self, request: _Request) -> None:
        del self._table._requests[request.task_id]
        del self._by_key[request.key]

    def _next_queue(self) -> Optional[Deque[_Request]]:
        for queue in (self._retry, self._waiting):
            while queue:
                request = queue[0]
                if request.state == _QUEUED and request.task_id in self._table._requests:
                    return queue
                queue.popleft()
        return None

    def _dispatch(self, now: float) -> None:
        idle = self._idle
        while len(idle):
            queue = self._next_queue()
            if queue is None:
                return
            request = queue[0]
            env = idle._pop_env()
            # ROUTER_MANDATORY makes the send fail for a worker that is gone; the
            # job then stays at the front for the next idle worker.
            try:
                self._workers.send_multipart(
                    env + [request.task_id] + request.payload, zmq.DONTWAIT, copy=False
                )
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    raise
                self._counters["unreachable_workers"] += 1
                continue
            queue.popleft()
            self._n_queued -= 1
            request.state = _RUNNING
            if request.tries_left > 0:
                request.tries_left -= 1
            if self._timeout is not None:
                self._heap._insert(request.key, now + self._timeout)
            self._counters["dispatched"] += 1


__all__ = ["BrokerCore", "DeadlineHeap", "IdleWorkers", "RequestTable", "monotonic"]
