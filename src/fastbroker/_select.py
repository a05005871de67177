"""Chooses the compiled parts or their pure twins: the broker core, the worker's
session, the client's wire and its book, compiled by default, pure Python on request or as a
fallback.

This module alone reads FASTBROKER_PURE; everything else asks it.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Callable, Mapping, Optional

PURE_ENV = "FASTBROKER_PURE"
CORE_NAMES = ("compiled", "pure")


def pure_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """True when FASTBROKER_PURE is set to anything but empty or 0."""
    return environ.get(PURE_ENV, "").strip() not in ("", "0")


def load(name: str) -> ModuleType:
    """Import the core called `name` ("compiled" or "pure"); ImportError if unavailable."""
    if name == "compiled":
        import fastbroker._core as _core

        return _core
    if name == "pure":
        from fastbroker import _core_py

        return _core_py
    raise ValueError(f"unknown core {name!r}: choose one of {', '.join(CORE_NAMES)}")


def _prefer_compiled(
    what: str, compiled: Callable[[], ModuleType], pure: Callable[[], ModuleType]
) -> tuple[ModuleType, str]:
    """The compiled `what` unless FASTBROKER_PURE asks for the pure one or the compiled one
    cannot be imported (then the pure one, with one RuntimeWarning saying why)."""
    if pure_requested():
        return pure(), "pure"
    try:
        return compiled(), "compiled"
    except ImportError as exc:
        warnings.warn(
            f"fastbroker: compiled {what} unavailable ({exc}); using the pure-Python {what}",
            RuntimeWarning,
            stacklevel=4,
        )
        return pure(), "pure"


def _default() -> tuple[ModuleType, str]:
    return _prefer_compiled("core", lambda: load("compiled"), lambda: load("pure"))


core, core_name = _default()


def resolve(name: Optional[str]) -> ModuleType:
    """The core to use for an explicit choice, or the default one for None."""
    return core if name is None else load(name)


_worker_session: Optional[tuple[ModuleType, str]] = None


def worker_session() -> tuple[ModuleType, str]:
    """The worker's session module (its ``Session`` and ``CreditGate``) and its name: the
    compiled one (fastbroker.worker._session) or the pure twin (fastbroker.worker.session),
    by the core's rule (_prefer_compiled). Chosen once."""
    global _worker_session
    if _worker_session is None:

        def compiled() -> ModuleType:
            from fastbroker.worker import _session  # type: ignore[attr-defined]

            return _session

        def pure() -> ModuleType:
            from fastbroker.worker import session

            return session

        _worker_session = _prefer_compiled("worker session", compiled, pure)
    return _worker_session


_client_wire: Optional[tuple[ModuleType, str]] = None


def client_wire() -> tuple[ModuleType, str]:
    """The client's wire module (``recv_messages``, ``send_message``) and its name: the
    compiled one (fastbroker.client._wire) or the pure twin (fastbroker.client.wire), by
    the core's rule (_prefer_compiled). Chosen once."""
    global _client_wire
    if _client_wire is None:

        def compiled() -> ModuleType:
            from fastbroker.client import _wire  # type: ignore[attr-defined]

            return _wire

        def pure() -> ModuleType:
            from fastbroker.client import wire

            return wire

        _client_wire = _prefer_compiled("client wire", compiled, pure)
    return _client_wire


_client_book: Optional[tuple[ModuleType, str]] = None


def client_book() -> tuple[ModuleType, str]:
    """The client's book module (its ``RequestBook``) and its name: the compiled one
    (fastbroker.client._book) or the pure twin (fastbroker.client.book), by the core's
    rule (_prefer_compiled). Chosen once."""
    global _client_book
    if _client_book is None:

        def compiled() -> ModuleType:
            from fastbroker.client import _book  # type: ignore[attr-defined]

            return _book

        def pure() -> ModuleType:
            from fastbroker.client import book

            return book

        _client_book = _prefer_compiled("client book", compiled, pure)
    return _client_book
