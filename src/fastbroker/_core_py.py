"""Pure-Python broker core: the same interface and behaviour as the compiled ``_core``.

It is the fallback where the extension cannot be built and the yardstick the
compiled core is measured against. Payload frames travel as ``zmq.Frame`` objects
received with ``copy=False``, so they are shared, not copied, here too.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import os
import time
from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Tuple

import zmq

from fastbroker import protocol
from fastbroker._common import check_count, check_heartbeat, check_max_queue, check_retention, check_retention_bytes, check_timeout, check_tries
from fastbroker.protocol import CLIENT_SIGNATURE, CMD_ANSWER, CMD_CANCEL, CMD_DISCONNECT, CMD_FAILED, CMD_HEARTBEAT, CMD_READY, CMD_TASK, DEFAULT_HEARTBEAT, DEFAULT_LIVENESS, DEFAULT_RETENTION, DEFAULT_RETENTION_BYTES, MAX_CREDIT, MAX_LIVENESS, MIN_LIVENESS, WORKER_SIGNATURE

monotonic = time.monotonic

_QUEUED = 1
_RUNNING = 2
_MAX_POLL_MS = 3_600_000


def _address_key(routing_frames: list) -> bytes:
    # Length-prefixed routing frames, as the compiled core keys its idle workers.
    return b"".join(len(f).to_bytes(4, "little") + bytes(f) for f in routing_frames)


class RequestIds:
    """The 16-byte request-id index on its own (for tests): id -> 32-bit value."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self._ids: Dict[bytes, int] = {}

    @staticmethod
    def _check(key: bytes) -> None:
        if len(key) != protocol.REQUEST_ID_SIZE:
            raise ValueError("a request id is 16 bytes")

    def insert(self, key: bytes, value: int) -> None:
        """Add key -> value; KeyError if key is there already."""
        self._check(key)
        if key in self._ids:
            raise KeyError(key)
        self._ids[key] = value

    def get(self, key: bytes) -> Optional[int]:
        """The value of key, or None."""
        self._check(key)
        return self._ids.get(key)

    def delete(self, key: bytes) -> bool:
        """Remove key; False if it was not there."""
        self._check(key)
        return self._ids.pop(key, None) is not None

    @property
    def growing(self) -> bool:
        """Always False: a dict grows in one step."""
        return False

    def __len__(self) -> int:
        return len(self._ids)


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
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            raise ValueError(f"key must be in [0, {protocol.HEAP_KEY_LIMIT})")
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
    __slots__ = (
        "key", "task_id", "env", "payload", "state", "tries_left", "worker", "failed_on",
        "timeout", "tries", "attempts", "cid", "waiters", "failure", "arrived",
    )

    def __init__(self, key: int, task_id: bytes, env: list, payload: list, tries_left: int) -> None:
        self.key = key
        self.task_id = task_id
        self.env = env
        self.payload = payload
        self.state = _QUEUED
        self.tries_left = tries_left
        self.worker: Optional[_Session] = None  # the DEALER worker running this attempt
        self.failed_on: Optional[_Session] = None  # the worker whose FAILED caused the retry
        self.timeout: Optional[float] = None  # per attempt
        self.tries = tries_left  # as given, -1: unlimited (for STATUS)
        self.attempts = 0
        # FBC01 requests only: the client's id, the identities told the outcome,
        # and the latest FAILED's (type, message) frames.
        self.cid: Optional[bytes] = None
        self.waiters: List[bytes] = []
        self.failure: Optional[list] = None
        self.arrived = 0.0  # when it entered the broker (for the latency histogram)


_OUTCOME_CODES = (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED)


class _Outcome:
    """A finished FBC01 request's outcome, kept for RESULT and duplicate SUBMITs."""

    __slots__ = ("code", "body", "finished", "size", "attempts", "tries")

    def __init__(self, code: bytes, body: list, finished: float, attempts: int, tries: int) -> None:
        self.code = code
        self.body = body
        self.finished = finished
        self.size = sum(len(f) for f in body) + protocol.RESULT_OVERHEAD
        self.attempts = attempts
        self.tries = tries


class _Session:
    """A DEALER worker known to the broker: where it is, its credit, its jobs."""

    __slots__ = ("key", "env", "credit", "jobs", "ghosts", "expiry")

    def __init__(self, key: bytes, env: list) -> None:
        self.key = key
        self.env = env  # routing frames and the empty delimiter
        self.credit = 0
        self.jobs: Dict[int, _Request] = {}
        # Jobs it still works on that ended without it (timed out, answered
        # elsewhere): their credit stays taken until it answers or fails them.
        self.ghosts = 0
        self.expiry = 0.0


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
        heartbeat: float = DEFAULT_HEARTBEAT,
        liveness: int = DEFAULT_LIVENESS,
        epoch: Optional[bytes] = None,
        retention: float = DEFAULT_RETENTION,
        retention_bytes: int = DEFAULT_RETENTION_BYTES,
        max_queue: Optional[int] = None,
    ) -> None:
        self._max_queue = check_max_queue(max_queue)
        self._retention = check_retention(retention)
        self._retention_bytes = check_retention_bytes(retention_bytes)
        self._by_cid: Dict[bytes, _Request] = {}  # FBC01 requests in the broker
        self._outcomes: "OrderedDict[bytes, _Outcome]" = OrderedDict()  # oldest first
        self._retained_bytes = 0
        self._latency_counts = [0] * (len(protocol.LATENCY_BOUNDS) + 1)
        self._latency_sum = 0.0
        self._events_on = False
        self._events: List[tuple] = []
        # Durable store support: what changed this turn, and replies held until it is stored.
        self._journal_on = False
        self._journal: List[tuple] = []
        self._held: List[list] = []
        self._timeout = check_timeout(timeout)
        self._tries = check_tries(tries)
        self._heartbeat = check_heartbeat(heartbeat)
        self._liveness = check_count("liveness", liveness, MIN_LIVENESS, MAX_LIVENESS)
        self._sessions: Dict[bytes, _Session] = {}
        self._next_tick = 0.0  # next heartbeat to the workers
        self._next_check = 0.0  # earliest time a worker may have gone silent too long
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
        self._counters = dict.fromkeys(protocol.COUNTERS, 0)
        self._drops = [0] * len(protocol.DROP_REASONS)
        self._last_drop: Optional[int] = None
        self._closed = False

    @property
    def timeout(self) -> Optional[float]:
        return self._timeout

    @property
    def tries(self) -> Optional[int]:
        return self._tries

    @property
    def heartbeat(self) -> float:
        return self._heartbeat

    @property
    def max_queue(self) -> Optional[int]:
        return self._max_queue

    def _queue_full(self) -> bool:
        return self._max_queue is not None and self._n_queued >= self._max_queue

    @property
    def liveness(self) -> int:
        return self._liveness

    @property
    def last_drop(self) -> Optional[str]:
        """Reason text of the latest dropped message, or None."""
        return None if self._last_drop is None else protocol.DROP_REASONS[self._last_drop]

    def stats(self) -> dict:
        """Counters since start and current gauges, as a dict of ints."""
        result = dict(self._counters)
        result["queued"] = self._n_queued
        result["running"] = len(self._table) - self._n_queued
        result["idle_workers"] = len(self._idle)
        result["workers"] = len(self._sessions)
        result["retained"] = len(self._outcomes)
        result["retained_bytes"] = self._retained_bytes
        result["drops"] = {
            protocol.DROP_REASONS[i]: n for i, n in enumerate(self._drops) if n
        }
        result["latency"] = {
            "bounds": protocol.LATENCY_BOUNDS,
            "counts": list(self._latency_counts),
            "count": sum(self._latency_counts),
            "sum": self._latency_sum,
        }
        return result

    def _stats_values(self) -> list:
        """The values of a STATS reply, in the order of protocol.stats_fields()."""
        s = self.stats()
        return ([s[k] for k in protocol.COUNTERS + protocol.GAUGES] + list(self._latency_counts)
                + [sum(self._latency_counts), int(self._latency_sum * 1e6)])

    def record_events(self, on: bool) -> None:
        """Keep worker and abort events for events() (off: none are kept)."""
        self._events_on = bool(on)
        if not on:
            self._events.clear()

    def events(self) -> List[tuple]:
        """Events since the last call, oldest first: (kind, data, n); see protocol.EVENT_KINDS."""
        events, self._events = self._events, []
        return events

    # -- durable store support (docs/ARCHITECTURE.md, "The store") ---------------

    def journal(self, on: bool) -> None:
        """Journal on: FBC01 changes are recorded for journal_take(), every FBC01 reply
        is held until release_held(), and run() returns RUN_JOURNAL after a turn that
        left either. So nothing is promised to a client before it is stored."""
        self._journal_on = bool(on)

    def journal_take(self) -> List[tuple]:
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries),
        ("forget", id)."""
        journal, self._journal = self._journal, []
        return journal

    def release_held(self) -> int:
        """Send the replies held since the last call; returns how many."""
        held, self._held = self._held, []
        for message in held:
            self._send_reply(message)
        return len(held)

    def restore_request(self, cid: bytes, payload: List[bytes], timeout: Optional[float], tries: int, attempts: int) -> None:
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        if len(cid) != protocol.REQUEST_ID_SIZE or not payload:
            raise ValueError("a request needs a 16-byte id and a payload")
        if cid in self._by_cid or cid in self._outcomes:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        tries_left = -1 if tries < 0 else max(tries - attempts, 0)
        if tries_left == 0:
            raise ValueError(f"request {cid.hex()} has no tries left")
        request = self._enqueue([], list(payload), tries_left, timeout)
        self._counters["requests"] -= 1  # restored, not received
        request.cid = cid
        request.tries = tries
        request.attempts = attempts
        self._by_cid[cid] = request

    def restore_outcome(self, cid: bytes, code: bytes, body: List[bytes], attempts: int, tries: int, age: float) -> None:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first)."""
        if len(cid) != protocol.REQUEST_ID_SIZE or code not in _OUTCOME_CODES:
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        if cid in self._by_cid or cid in self._outcomes:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        outcome = _Outcome(code, list(body), monotonic() - max(age, 0.0), attempts, tries)
        self._keep(cid, outcome)

    def _event(self, kind: int, data: bytes, n: int = 0) -> None:
        if not self._events_on:
            return
        if len(self._events) >= protocol.EVENT_QUEUE:
            self._counters["events_lost"] += 1
            return
        self._events.append((protocol.EVENT_KINDS[kind], bytes(data[: protocol.EVENT_DATA_MAX]), n))

    def disconnect_workers(self) -> int:
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        sessions = list(self._sessions.values())
        for session in sessions:
            self._send_command(session.env, CMD_DISCONNECT)
            # Closing: a job on its last try must not be reported as aborted.
            self._forget(session, requeue=False)
        return len(sessions)

    def close(self) -> None:
        """Release every message the core holds (queued jobs, idle workers)."""
        self._closed = True
        self._sessions.clear()
        self._table = RequestTable()
        self._idle = IdleWorkers()
        self._heap = DeadlineHeap()
        self._by_key.clear()
        self._waiting.clear()
        self._retry.clear()
        self._n_queued = 0
        self._by_cid.clear()
        self._outcomes.clear()
        self._retained_bytes = 0

    def run(self, wake_fd: int = -1, max_wait: Optional[float] = None, stop_on_drop: bool = False,
            stop_on_event: bool = False) -> int:
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
            if self._outcomes:
                self._forget_outcomes(now)
            if self._sessions and (now >= self._next_tick or now >= self._next_check):
                self._tick(now)
            self._dispatch(now)
            if stop_on_drop and self._last_drop is not None:
                return protocol.RUN_DROP
            if stop_on_event and self._events:
                return protocol.RUN_EVENT
            if self._journal_on and (self._journal or self._held):
                return protocol.RUN_JOURNAL
            # Poll at least once, and act on what was read before returning.
            if polled and t_end is not None and now >= t_end:
                return protocol.RUN_TIMEOUT
            polled = True
            next_t = t_end
            top = self._heap.peek()
            if top is not None and (next_t is None or top[0] < next_t):
                next_t = top[0]
            if self._sessions:
                next_t = min(t for t in (next_t, self._next_tick, self._next_check) if t is not None)
            if self._outcomes:
                first = next(iter(self._outcomes.values())).finished + self._retention
                next_t = first if next_t is None else min(next_t, first)
            if next_t is None:
                ms = None
            elif next_t <= now:
                ms = 0
            else:
                # Round up: waking before the deadline would only spin.
                # Capped: zmq_poll takes an int, and a request may wait ~49 days.
                ms = min(int((next_t - now) * 1000.0) + 1, _MAX_POLL_MS)
            try:
                ready = dict(poller.poll(ms))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    return protocol.RUN_WOKEN
                raise
            if wake_fd >= 0 and wake_fd in ready:
                return protocol.RUN_WOKEN
            # Ready messages first, so jobs arriving in the same turn find them.
            if self._workers in ready:
                self._drain(self._workers, self._on_ready)
            if self._answers in ready:
                self._drain(self._answers, self._on_answer)
            if self._requests in ready:
                self._drain(self._requests, self._on_request)

    # -- message handling -----------------------------------------------------

    def _drain(self, socket: zmq.Socket, handle) -> None:
        for _ in range(protocol.RECV_BATCH):
            try:
                frames = socket.recv_multipart(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return
            if len(frames) > protocol.MAX_FRAMES:
                self._drop(protocol.DROP_TOO_MANY_FRAMES)
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
        if len(frames) >= 2 and len(frames[1]) == 5 and frames[1].bytes == CLIENT_SIGNATURE:
            self._on_client(frames)
            return
        d = self._delimiter(frames)
        if d < 1:
            self._drop(protocol.DROP_REQUEST_NO_DELIMITER)
            return
        if d == len(frames) - 1:
            self._drop(protocol.DROP_REQUEST_NO_PAYLOAD)
            return
        if self._queue_full():
            # The original protocol's only "no": the empty answer, at once.
            self._counters["rejected"] += 1
            self._send_envelope(frames[: d + 1], [b""])
            return
        tries_left = -1 if self._tries is None else self._tries
        self._enqueue(frames[: d + 1], frames[d + 1 :], tries_left, self._timeout)

    def _enqueue(self, env: list, payload: list, tries_left: int, timeout: Optional[float]) -> _Request:
        request = self._table._new(env, payload, tries_left)
        request.timeout = timeout
        request.arrived = monotonic()
        self._by_key[request.key] = request
        self._waiting.append(request)
        self._n_queued += 1
        self._counters["requests"] += 1
        return request

    # -- the FBC01 client protocol (docs/PROTOCOL.md section 10) ---------------

    def _on_client(self, frames: list) -> None:
        if len(frames) < 3 or len(frames[2]) != 1:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        handler = self._client_commands.get(frames[2].bytes)
        if handler is None:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        if len(frames) < 4 or len(frames[3]) != protocol.REQUEST_ID_SIZE:
            self._drop(protocol.DROP_CLIENT_BAD_ID)
            return
        handler(self, frames[0].bytes, frames[3].bytes, frames[4:])

    def _reply(self, identity: bytes, code: bytes, cid: bytes, body: Optional[list] = None) -> None:
        message = [identity, CLIENT_SIGNATURE, code, cid] + (body or [])
        if self._journal_on:
            self._held.append(message)
        else:
            self._send_reply(message)

    def _send_reply(self, message: list) -> None:
        # A client that is gone or not reading loses the reply: ROUTER drops it.
        try:
            self._requests.send_multipart(message, zmq.DONTWAIT, copy=False)
        except zmq.Again:
            pass

    def _client_submit(self, identity: bytes, cid: bytes, body: list) -> None:
        if len(body) < 2:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        options = body[0].bytes
        flags = timeout_ms = tries = 0
        if len(options) == protocol.OPTIONS_SIZE:
            flags = options[0]
            timeout_ms = int.from_bytes(options[1:5], "big")
            tries = int.from_bytes(options[5:9], "big")
        if (len(options) not in (0, protocol.OPTIONS_SIZE) or flags & ~protocol.OPT_KNOWN_FLAGS
                or timeout_ms > protocol.MAX_REQUEST_TIMEOUT_MS):
            self._reject(identity, cid, protocol.REJECT_BAD_OPTIONS)
            return
        ack = not flags & protocol.OPT_NO_ACK
        request = self._by_cid.get(cid)
        if request is not None:
            self._counters["duplicates"] += 1
            self._add_waiter(request, identity)
            if ack:
                self._reply(identity, protocol.R_ACCEPTED, cid)
            return
        outcome = self._outcomes.get(cid)
        if outcome is not None:
            self._counters["duplicates"] += 1
            if ack:
                self._reply(identity, protocol.R_ACCEPTED, cid)
            self._reply(identity, outcome.code, cid, outcome.body)
            return
        if self._queue_full():
            self._reject(identity, cid, protocol.REJECT_QUEUE_FULL)
            return
        if tries == 0:
            tries_left = -1 if self._tries is None else self._tries
        else:
            tries_left = min(tries, protocol.MAX_REQUEST_TRIES)
        timeout = self._timeout if timeout_ms == 0 else timeout_ms / 1000.0
        request = self._enqueue([], body[1:], tries_left, timeout)
        request.cid = cid
        request.waiters.append(identity)
        self._by_cid[cid] = request
        if self._journal_on:
            self._journal.append(("submit", cid, [f.bytes for f in body[1:]], timeout, tries_left))
        if ack:
            self._reply(identity, protocol.R_ACCEPTED, cid)

    def _reject(self, identity: bytes, cid: bytes, reason: int) -> None:
        self._counters["rejected"] += 1
        self._reply(identity, protocol.R_REJECTED, cid, [bytes([reason]), protocol.REJECT_REASONS[reason].encode()])

    def _client_status(self, identity: bytes, cid: bytes, body: list) -> None:
        if body:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        self._reply_status(identity, cid)

    def _reply_status(self, identity: bytes, cid: bytes) -> None:
        request = self._by_cid.get(cid)
        if request is not None:
            state = protocol.STATE_QUEUED if request.state == _QUEUED else protocol.STATE_RUNNING
            attempts, tries = request.attempts, request.tries
        else:
            outcome = self._outcomes.get(cid)
            if outcome is None:
                self._reply(identity, protocol.R_UNKNOWN, cid)
                return
            state, attempts, tries = protocol.STATE_DONE, outcome.attempts, outcome.tries
        self._reply(identity, protocol.R_STATUS, cid, [
            bytes([state]), attempts.to_bytes(4, "big"), max(tries, 0).to_bytes(4, "big")])

    def _client_result(self, identity: bytes, cid: bytes, body: list) -> None:
        if body:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        request = self._by_cid.get(cid)
        if request is not None:
            self._add_waiter(request, identity)
            self._reply_status(identity, cid)
            return
        outcome = self._outcomes.get(cid)
        if outcome is None:
            self._reply(identity, protocol.R_UNKNOWN, cid)
        else:
            self._reply(identity, outcome.code, cid, outcome.body)

    def _client_cancel(self, identity: bytes, cid: bytes, body: list) -> None:
        if body:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        request = self._by_cid.get(cid)
        if request is None:
            outcome = self._outcomes.get(cid)
            if outcome is None:
                self._reply(identity, protocol.R_UNKNOWN, cid)
            else:
                self._reply(identity, outcome.code, cid, outcome.body)
            return
        if request.state == _QUEUED:
            # Its queue entry is skipped when it reaches the front (the request is gone).
            self._n_queued -= 1
        else:
            self._heap.remove(request.key)
            session = request.worker
            if session is not None:
                self._send_command(session.env, CMD_CANCEL, [request.task_id])
            self._detach(request, by_worker=False)
        self._finish(request)
        self._counters["cancelled"] += 1
        self._conclude(request, protocol.R_CANCELLED, [])
        # Not made a waiter: on a full list it would push out a submitter.
        if identity not in request.waiters:
            self._reply(identity, protocol.R_CANCELLED, cid)

    def _client_stats(self, identity: bytes, cid: bytes, body: list) -> None:
        if body:
            self._drop(protocol.DROP_CLIENT_BAD_COMMAND)
            return
        names = ",".join(protocol.stats_fields()).encode("ascii")
        values = b"".join(v.to_bytes(8, "big") for v in self._stats_values())
        self._reply(identity, protocol.R_STATS, cid, [names, values])

    _client_commands = {
        protocol.C_SUBMIT: _client_submit,
        protocol.C_STATS: _client_stats,
        protocol.C_STATUS: _client_status,
        protocol.C_RESULT: _client_result,
        protocol.C_CANCEL: _client_cancel,
    }

    @staticmethod
    def _add_waiter(request: _Request, identity: bytes) -> None:
        if identity not in request.waiters:
            request.waiters.append(identity)
            if len(request.waiters) > protocol.MAX_WAITERS:
                del request.waiters[0]

    def _conclude(self, request: _Request, code: bytes, body: list) -> None:
        """Tell every waiter of a finished FBC01 request its outcome, and keep it."""
        cid = request.cid
        for identity in request.waiters:
            self._reply(identity, code, cid, body)
        del self._by_cid[cid]
        if self._journal_on:
            self._journal.append(("finish", cid, code, [bytes(f) for f in body], request.attempts, request.tries))
        self._keep(cid, _Outcome(code, body, monotonic(), request.attempts, request.tries))

    def _keep(self, cid: bytes, outcome: _Outcome) -> None:
        if self._retention <= 0 or outcome.size > self._retention_bytes:
            # Not kept (too big alone: forgotten at once, the others stay).
            if self._retention > 0:
                self._counters["expired_results"] += 1
            if self._journal_on:
                self._journal.append(("forget", cid))
            return
        self._outcomes[cid] = outcome
        self._retained_bytes += outcome.size
        while self._retained_bytes > self._retention_bytes:
            self._forget_first_outcome()

    def _forget_first_outcome(self) -> None:
        cid, outcome = self._outcomes.popitem(last=False)
        self._retained_bytes -= outcome.size
        self._counters["expired_results"] += 1
        if self._journal_on:
            self._journal.append(("forget", cid))

    def _forget_outcomes(self, now: float) -> None:
        limit = now - self._retention
        while self._outcomes and next(iter(self._outcomes.values())).finished <= limit:
            self._forget_first_outcome()

    def _on_ready(self, frames: list) -> None:
        """A message on the workers endpoint: an original REQ worker's ready, or FBW01."""
        d = self._delimiter(frames)
        if d < 1:
            self._drop(protocol.DROP_READY_NO_DELIMITER)
            return
        body = frames[d + 1 :]
        if len(body) == 1:
            # The same length-prefixed address key as the compiled core, so both treat
            # a second "ready" from one address alike.
            self._idle._push_env(_address_key(frames[:d]), frames[: d + 1])
            self._counters["ready"] += 1
            return
        if not body or body[0].bytes != WORKER_SIGNATURE:
            self._drop(protocol.DROP_READY_BAD_FRAMES)
            return
        command = body[1].bytes
        handler = self._commands.get(command)
        if handler is None:
            self._drop(protocol.DROP_WORKER_BAD_COMMAND)
            return
        key = _address_key(frames[:d])
        session = self._sessions.get(key)
        if session is not None:
            session.expiry = monotonic() + self._heartbeat * self._liveness
        handler(self, key, session, frames[: d + 1], body[2:])

    def _worker_ready(self, key: bytes, session: Optional[_Session], env: list, args: list) -> None:
        if len(args) != 1 or len(args[0]) != 4:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        credit = int.from_bytes(args[0].bytes, "big")
        if credit > MAX_CREDIT:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if session is None:
            session = _Session(key, env)
            session.expiry = monotonic() + self._heartbeat * self._liveness
            self._sessions[key] = session
            self._counters["workers_joined"] += 1
            self._event(0, env[0].bytes)
            if len(self._sessions) == 1:
                self._next_tick = monotonic() + self._heartbeat
                self._next_check = session.expiry
            else:
                self._next_check = min(self._next_check, session.expiry)
        session.credit = credit
        self._counters["ready"] += 1
        self._offer(session)

    def _worker_answer(self, key: bytes, session: Optional[_Session], env: list, args: list) -> None:
        if len(args) < 2:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        # Accepted even from a worker the broker has forgotten: the job may still
        # be waiting for it. That worker is then told to register again.
        self._answer(args[0].bytes, args[1:], session)
        if session is None:
            self._send_command(env, CMD_DISCONNECT)

    def _worker_failed(self, key: bytes, session: Optional[_Session], env: list, args: list) -> None:
        if len(args) != 3:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
            return
        if session is None:
            self._send_command(env, CMD_DISCONNECT)
        if len(args[0]) != protocol.TASK_ID_SIZE:
            self._drop(protocol.DROP_ANSWER_BAD_ID)
            return
        request = self._table._requests.get(args[0].bytes)
        if request is None or request.worker is not session or session is None:
            # Not the attempt in progress (answered, timed out, or another worker's).
            self._drop(protocol.DROP_ANSWER_UNKNOWN)
            self._settle_ghost(session)
            return
        self._counters["failed"] += 1
        self._heap.remove(request.key)
        self._detach(request)
        request.failed_on = session
        if request.cid is not None:
            request.failure = args[1:3]
        self._retry_or_abort(request)

    def _worker_heartbeat(self, key: bytes, session: Optional[_Session], env: list, args: list) -> None:
        if args:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
        elif session is None:
            self._send_command(env, CMD_DISCONNECT)

    def _worker_disconnect(self, key: bytes, session: Optional[_Session], env: list, args: list) -> None:
        if args:
            self._drop(protocol.DROP_WORKER_BAD_FRAMES)
        elif session is not None:
            self._counters["workers_left"] += 1
            self._event(1, session.env[0].bytes)
            self._forget(session)

    _commands = {
        CMD_READY: _worker_ready,
        CMD_ANSWER: _worker_answer,
        CMD_FAILED: _worker_failed,
        CMD_HEARTBEAT: _worker_heartbeat,
        CMD_DISCONNECT: _worker_disconnect,
    }

    def _send_command(self, env: list, command: bytes, body: Optional[list] = None) -> None:
        try:
            self._workers.send_multipart(env + [WORKER_SIGNATURE, command] + (body or []), zmq.DONTWAIT, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM:
                raise
            # A worker that is gone is found out by its silence.

    def _offer(self, session: _Session) -> None:
        """Keep the worker in the idle FIFO exactly while it has spare credit."""
        if len(session.jobs) + session.ghosts < session.credit:
            if session.key not in self._idle._workers:
                self._idle._push_env(session.key, session)
        else:
            self._idle._workers.pop(session.key, None)

    def _detach(self, request: _Request, by_worker: bool = True) -> None:
        """The attempt in progress is over. If its worker ended it (answer, FAILED,
        death), its credit is free; if it ended without the worker (timeout, an
        answer from another attempt), the worker is still busy with it: the credit
        stays taken, as a ghost, until the worker answers or fails it."""
        session = request.worker
        if session is not None:
            request.worker = None
            del session.jobs[request.key]
            if not by_worker:
                session.ghosts += 1
            elif self._sessions.get(session.key) is session:
                self._offer(session)

    def _settle_ghost(self, session: Optional[_Session]) -> None:
        """The worker answered or failed a job that had ended without it: free that credit."""
        if session is not None and session.ghosts:
            session.ghosts -= 1
            if self._sessions.get(session.key) is session:
                self._offer(session)

    def _forget(self, session: _Session, requeue: bool = True) -> None:
        """The worker is gone: its jobs go back to the front of the queue at once
        (unless the broker is closing: requeue=False leaves them to their fate)."""
        del self._sessions[session.key]
        self._idle._workers.pop(session.key, None)
        for request in list(session.jobs.values()):
            self._detach(request)
            if requeue:
                self._heap.remove(request.key)
                self._counters["requeued"] += 1
                self._retry_or_abort(request)

    def _tick(self, now: float) -> None:
        """Forget workers silent past liveness, at the moment the earliest one may
        be; heartbeat the others every interval. Expiries only move later, so the
        earliest one seen in a scan is when the next scan is due."""
        beat = now >= self._next_tick
        if beat:
            self._next_tick = now + self._heartbeat
        earliest = now + self._heartbeat * self._liveness
        for session in list(self._sessions.values()):
            if now >= session.expiry:
                self._counters["workers_dead"] += 1
                self._event(2, session.env[0].bytes)
                self._forget(session)
            else:
                earliest = min(earliest, session.expiry)
                if beat:
                    self._send_command(session.env, CMD_HEARTBEAT)
        self._next_check = earliest

    def _on_answer(self, frames: list) -> None:
        if len(frames) < 2:
            self._drop(protocol.DROP_ANSWER_TOO_SHORT)
            return
        self._answer(frames[0].bytes, frames[1:], None)

    def _answer(self, task_id: bytes, body: list, session: Optional[_Session]) -> None:
        """Deliver the first answer for a task; later ones are dropped. `session` is
        the answering DEALER worker, None for a PUSH answer."""
        if len(task_id) != protocol.TASK_ID_SIZE:
            self._drop(protocol.DROP_ANSWER_BAD_ID)
            return
        request = self._table._requests.pop(task_id, None)
        if request is None:
            self._drop(protocol.DROP_ANSWER_UNKNOWN)
            self._settle_ghost(session)
            return
        del self._by_key[request.key]
        own = session is not None and request.worker is session
        if not own:
            self._settle_ghost(session)
        self._detach(request, own)
        self._send_to_client(request, body)
        latency = monotonic() - request.arrived
        self._latency_counts[bisect.bisect_left(protocol.LATENCY_BOUNDS, latency)] += 1
        self._latency_sum += latency
        if request.state == _QUEUED:
            # Answered by an earlier attempt while waiting for a retry; the queue
            # entry is skipped when it reaches the front (the request is gone).
            self._n_queued -= 1
            self._counters["late_answers"] += 1
        else:
            self._heap.remove(request.key)
        self._counters["answered"] += 1

    def _send_to_client(self, request: _Request, body: list) -> None:
        if request.cid is not None:
            self._conclude(request, protocol.R_OK, body)
            return
        self._send_envelope(request.env, body)

    def _send_envelope(self, env: list, body: list) -> None:
        # A client that is gone or not reading loses its answer: ROUTER drops it.
        try:
            self._requests.send_multipart(env + body, zmq.DONTWAIT, copy=False)
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
            self._detach(request, by_worker=False)
            self._retry_or_abort(request)

    def _retry_or_abort(self, request: _Request) -> None:
        """An attempt ended without an answer: queue the job ahead of new requests,
        or, with no tries left, send the client the empty answer."""
        if request.tries_left == 0:
            self._finish(request)
            if request.cid is None:
                self._event(3, request.task_id, request.attempts)
                self._send_to_client(request, [b""])
            elif request.failure is not None:
                self._event(4, request.cid, request.attempts)
                self._conclude(request, protocol.R_FAILED, request.failure)
            else:
                self._event(5, request.cid, request.attempts)
                self._conclude(request, protocol.R_TIMED_OUT, [])
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
            worker = idle._pop_env()
            if request.failed_on is not None and worker is request.failed_on and len(idle):
                # Retry a failed job on another worker when one is idle.
                other = idle._pop_env()
                self._offer(worker)
                worker = other
            session = worker if isinstance(worker, _Session) else None
            if session is None:
                message = worker + [request.task_id] + request.payload
            else:
                message = session.env + [WORKER_SIGNATURE, CMD_TASK, request.task_id] + request.payload
            # ROUTER_MANDATORY makes the send fail for a worker that is gone; the
            # job then stays at the front for the next idle worker.
            try:
                self._workers.send_multipart(message, zmq.DONTWAIT, copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    raise
                self._counters["unreachable_workers"] += 1
                if session is not None:
                    self._counters["workers_dead"] += 1
                    self._event(2, session.env[0].bytes)
                    self._forget(session)
                continue
            queue.popleft()
            request.failed_on = None
            if session is not None:
                request.worker = session
                session.jobs[request.key] = request
                self._offer(session)
            self._n_queued -= 1
            request.state = _RUNNING
            if request.tries_left > 0:
                request.tries_left -= 1
            request.attempts += 1
            if self._journal_on and request.cid is not None:
                self._journal.append(("start", request.cid, request.attempts))
            if request.timeout is not None:
                self._heap._insert(request.key, now + request.timeout)
            self._counters["dispatched"] += 1


__all__ = ["BrokerCore", "DeadlineHeap", "IdleWorkers", "RequestTable", "monotonic"]
