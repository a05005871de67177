"""How an FBC01 request ended, as exceptions and a status record (docs/PROTOCOL.md section 10)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from fastbroker._common import BrokerError


class TaskFailed(BrokerError):
    """The request's last attempt failed in the worker: ``type_name`` and ``message``
    are those of the exception its ``process`` raised."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> Tuple[type, Tuple[str, str]]:  # picklable with its two arguments
        return (type(self), (self.type_name, self.message))


class TaskTimedOut(BrokerError):
    """Every attempt of the request timed out (or lost its worker); no tries are left."""


class TaskCancelled(BrokerError):
    """The request was cancelled (by this client or another) before it had another outcome."""


class Rejected(BrokerError):
    """The broker refused the SUBMIT: ``code`` is one of REJECT_* in fastbroker._common."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"rejected by the broker: {reason} (code {code})")
        self.code = code
        self.reason = reason

    def __reduce__(self) -> Tuple[type, Tuple[int, str]]:
        return (type(self), (self.code, self.reason))


class UnknownRequest(BrokerError):
    """The broker does not know the request id (never submitted, or its outcome was forgotten)."""


class Status(NamedTuple):
    """What the broker says about a request id.

    ``state``: "queued", "running", "done" or "unknown"; ``attempt``: attempts made
    so far (for "running": the number of the attempt running, 1 for the first);
    ``tries``: the request's most attempts, None when unlimited or unknown."""

    state: str
    attempt: int = 0
    tries: Optional[int] = None

    def describe(self) -> str:
        """One line for people, e.g. "running (attempt 2 of 3)"."""
        of = f" of {self.tries}" if self.tries is not None else ", tries unlimited"
        if self.state == "running":
            return f"running (attempt {self.attempt}{of})"
        if self.state == "queued":
            return f"queued ({self.attempt} attempts made{of})" if self.attempt else "queued"
        if self.state == "done":
            return f"done (after {self.attempt} attempt{'s' if self.attempt != 1 else ''})"
        return self.state


class DeadRequest(NamedTuple):
    """A request the broker gave up on (its last try ended FAILED or TIMED_OUT), kept
    with its payload in the dead-letter until requeued or past retention.

    ``outcome``: "failed" or "timed_out"; ``error_type`` and ``error_message``: the
    last FAILED's (empty for "timed_out"); ``attempts`` made; ``tries``: its most
    attempts (None: unlimited); ``age``: seconds since it was given up; its payload's
    size in ``payload_bytes`` and ``payload_frames``."""

    request_id: bytes
    outcome: str
    error_type: str
    error_message: str
    attempts: int
    tries: Optional[int]
    age: float
    payload_bytes: int
    payload_frames: int

    def describe(self) -> str:
        """One line for people: id, outcome, error, attempts, age and size."""
        what = f"failed: {self.error_type}: {self.error_message}" if self.outcome == "failed" else "timed out"
        if self.outcome == "failed" and not self.error_message:
            what = f"failed: {self.error_type}"
        return (
            f"{self.request_id.hex()}  {what}  ({self.attempts} attempt{'s' if self.attempts != 1 else ''}, "
            f"{self.age:.1f} s ago, {self.payload_bytes} B in {self.payload_frames} frame"
            f"{'s' if self.payload_frames != 1 else ''})"
        )


class DeadLetters(NamedTuple):
    """The broker's answer to DEAD: ``total`` dead requests kept, ``requests`` the
    oldest of them (at most the limit asked, and at most MAX_DEAD_LIST)."""

    total: int
    requests: List[DeadRequest]


class Requeued(NamedTuple):
    """The broker's answer to REQUEUE_ALL: ``requeued`` requests queued again, ``dead``
    still kept dead (those left when the queue was full)."""

    requeued: int
    dead: int


__all__ = [
    "TaskFailed",
    "TaskTimedOut",
    "TaskCancelled",
    "Rejected",
    "UnknownRequest",
    "Status",
    "DeadRequest",
    "DeadLetters",
    "Requeued",
]
