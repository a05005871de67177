"""Errors and argument checks shared by both cores and the Python layer (constants: protocol.py)."""

from __future__ import annotations

import math
from types import TracebackType
from typing import Optional, Sequence, Type, TypeVar

import zmq


class BrokerError(Exception):
    """Base of fastbroker's own errors."""


class ConfigError(BrokerError, ValueError):
    """An invalid broker or worker setting."""


def check_timeout(timeout: float | None) -> float | None:
    """Return a valid per-attempt timeout in seconds, or raise ConfigError."""
    if timeout is None:
        return None
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ConfigError(f"timeout must be a number of seconds, not {timeout!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"timeout must be a finite number >= 0, not {timeout!r}")
    return value


def check_seconds(name: str, value: float, low: float = 0.001, high: float = 3600) -> float:
    """Return a valid duration in seconds within [low, high], or raise ConfigError naming `name`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise ConfigError(f"{name} must be between {low} and {high} seconds, not {value!r}")
    return seconds


def check_heartbeat(heartbeat: float) -> float:
    """Return a valid heartbeat interval in seconds, or raise ConfigError."""
    return check_seconds("heartbeat", heartbeat)


def check_count(name: str, value: int, low: int, high: int) -> int:
    """Return a valid whole number in [low, high], or raise ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def check_tries(tries: int | None) -> int | None:
    """Return a valid number of tries, or raise ConfigError."""
    if tries is None:
        return None
    if isinstance(tries, bool) or not isinstance(tries, int):
        raise ConfigError(f"tries must be a whole number, not {tries!r}")
    if tries <= 0:
        raise ConfigError(f"tries must be at least 1, not {tries}")
    if tries > 2**31 - 1:
        raise ConfigError(f"tries must be below 2**31, not {tries}")
    return tries


def check_retention(retention: float) -> float:
    """Return a valid outcome retention in seconds (0 keeps none), or raise ConfigError."""
    return check_seconds("retention", retention, 0.0, 30 * 86400.0)


def check_max_extend(seconds: float) -> float:
    """Return a valid bound of one EXTEND in seconds, or raise ConfigError."""
    return check_seconds("max_extend", seconds, 0.001, 30 * 86400.0)


MAX_QUEUE_LIMIT = 1 << 31


def check_max_queue(limit: int | None) -> int | None:
    """Return a valid queue bound (None: unbounded), or raise ConfigError."""
    if limit is None:
        return None
    return check_count("max_queue", limit, 1, MAX_QUEUE_LIMIT)


def check_retention_bytes(limit: int) -> int:
    """Return a valid memory bound for kept outcomes, or raise ConfigError."""
    return check_count("retention_bytes", limit, 0, 1 << 48)


_C = TypeVar("_C", bound="Closeable")


class Closeable:
    """`with obj:` calls obj.close() on the way out."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def zmq_reason(exc: zmq.ZMQError) -> str:
    """libzmq's text for the error, as zmq.strerror gives it ("Address already in use").
    pyzmq types ZMQError.errno as Optional; a raised one always has it."""
    return zmq.strerror(exc.errno) if exc.errno is not None else str(exc)


_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def send_message(socket: zmq.Socket, frames: Sequence[bytes]) -> bool:
    """Send the message without blocking; False if the socket's queue is full (nothing
    sent: libzmq counts whole messages against the high-water mark, so only the first
    frame can meet it). send_multipart without its per-frame type checks and enum
    flags: every frame is bytes. The pure clients' and workers' way to send."""
    send = socket.send
    try:
        for i in range(len(frames) - 1):
            send(frames[i], _NOBLOCK_MORE)
        send(frames[-1], _NOBLOCK)
    except zmq.Again:
        return False
    return True
