"""How an FBC01 request ended, as exceptions and a status record (docs/PROTOCOL.md section 10)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

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


__all__ = ["TaskFailed", "TaskTimedOut", "TaskCancelled", "Rejected", "UnknownRequest", "Status"]
