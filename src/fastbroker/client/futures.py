"""client/futures.py: ``RequestFuture``, the sync ``Client``'s future for one request: a
``concurrent.futures.Future`` that makes its Condition only when someone needs it.

A plain Future makes a Condition (an RLock, a deque, two dicts) when it is made, and
takes it for every call. A client that submits thousands of requests in a row made as
many Conditions, and the garbage collector, which walks every container object still
alive each time enough have been made, cost the caller more than the rest of submit():
8–17 µs a request in a burst of 30,000 against 3.5–5 with the collector off. Here the
Condition, the waiter and callback lists come when first needed: by whoever waits
(``result()``, ``exception()`` or ``concurrent.futures.wait``/``as_completed`` before
the outcome), adds a callback or cancels. An outcome set while none of them exists (the
usual case: the caller asks for the result once it is there) needs none of them.

Every method of Future that uses the Condition reaches it through ``_condition``, a
property here, so they all keep working unchanged. ``_MADE`` (one lock for all these
futures) makes the Condition appear, and the outcome set without one, one at a time:
whoever finds no Condition under it knows that nobody waits and no callback waits.
Nothing is allocated while it is held (the Condition and lists are made before, the
attributes they go to exist from the start): an allocation can start a pass of the
collector, whose finalizers may use another of these futures; and it is reentrant for
what is left (a signal handler's Python code runs between any two instructions). The
compiled ``deliver`` (client/_handoff.pxi) settles a future with no Condition in C,
without the lock: there its reads and writes, with no Python code between them, are
one step under the GIL, which is all the lock gives ``_settle``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures._base import (  # the states Future's own methods compare with
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, Callable, List, Optional

_MADE = threading.RLock()
_OVER = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class RequestFuture(concurrent.futures.Future):
    """A Client's future for one request; ``request_id`` is its 16-byte id.

    ``cancel()`` also tells the client (which tells the broker, for a submitted request):
    an override rather than a done-callback, which would cost every request a lock
    round and a call when it finishes."""

    request_id: bytes
    _on_cancel: Optional[Callable[[RequestFuture], None]] = None
    # Until the Condition is made: nothing waits, nothing to call back (see the module).
    _waiters: Any
    _done_callbacks: Any

    def __init__(
        self, request_id: bytes = b"", on_cancel: Optional[Callable[[RequestFuture], None]] = None
    ) -> None:  # Future.__init__ without its Condition
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._made: Optional[threading.Condition] = None
        self._state = PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        # Set here, so that replacing them under _MADE allocates nothing.
        self._waiters = ()
        self._done_callbacks = ()

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        made = self._made
        if made is None:
            # Made before the lock (see the module).
            condition = threading.Condition()
            waiters: List[Any] = []
            callbacks: List[Any] = []
            with _MADE:
                if self._made is None:
                    self._waiters = waiters
                    self._done_callbacks = callbacks
                    self._made = condition
                made = self._made
        return made

    def cancel(self) -> bool:
        """Future.cancel(), and the client told once, by the call that cancelled it."""
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True

    # Read without the Condition: a state is one attribute, and an outcome is written
    # before the state that says it is there.
    def done(self) -> bool:
        return self._state in _OVER

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    # As Future's: the traceback's frame must not keep the future alive
                    # (a cycle through its exception for the collector).
                    del self
            return self._result
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)

    def set_result(self, result: Any) -> None:
        if self._made is None and self._settle(result, None):
            return
        super().set_result(result)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if self._made is None and self._settle(None, exception):
            return
        super().set_exception(exception)

    def _settle(self, result: Any, exception: Optional[BaseException]) -> bool:
        """The outcome, if there is still no Condition (nobody to wake); False if one
        was made meanwhile (Future's own method then does it)."""
        with _MADE:
            if self._made is not None:
                return False
            over = self._state in _OVER
            if not over:
                self._result, self._exception = result, exception
                self._state = FINISHED
        if over:  # (its repr takes the Condition, so not under _MADE)
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
        return True
