"""Chooses the compiled parts or their pure twins: the broker core, the worker's
session, the client's wire and its book, the log store's index; compiled by default,
pure Python on request or as a fallback.

This module alone reads FASTBROKER_PURE; everything else asks it.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Mapping, Optional

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
    what: str, compiled: Callable[[], ModuleType], pure: Callable[[], ModuleType], stacklevel: int = 4
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
            stacklevel=stacklevel,
        )
        return pure(), "pure"


def _default() -> tuple[ModuleType, str]:
    return _prefer_compiled("core", lambda: load("compiled"), lambda: load("pure"))


core, core_name = _default()


def resolve(name: Optional[str]) -> ModuleType:
    """The core to use for an explicit choice, or the default one for None."""
    return core if name is None else load(name)


# The parts that have a compiled twin beside the core: what each is called in warnings,
# its compiled module and its pure one.
TWINS = {
    "worker session": ("fastbroker.worker._session", "fastbroker.worker.session"),
    "client wire": ("fastbroker.client._wire", "fastbroker.client.wire"),
    "client book": ("fastbroker.client._book", "fastbroker.client.book"),
    # Compiled inside the book's module (client/_handoff.pxi, included by _book.pyx).
    "client handoff": ("fastbroker.client._book", "fastbroker.client.handoff"),
    "log index": ("fastbroker.server._log_index", "fastbroker.server.log_index"),
}
_chosen: Dict[str, tuple[ModuleType, str]] = {}


def twin(what: str) -> tuple[ModuleType, str]:
    """The module chosen for one of TWINS and its name ("compiled" or "pure"), by the
    core's rule (_prefer_compiled). Chosen once."""
    if what not in _chosen:
        compiled, pure = TWINS[what]
        _chosen[what] = _prefer_compiled(
            what, lambda: importlib.import_module(compiled), lambda: importlib.import_module(pure), stacklevel=5
        )
    return _chosen[what]


def worker_session() -> tuple[ModuleType, str]:
    """The worker's session module (its ``open_sessions`` and ``Session``) and its name."""
    return twin("worker session")


def client_wire() -> tuple[ModuleType, str]:
    """The client's wire module (``recv_messages``, ``send_message``) and its name."""
    return twin("client wire")


def log_index() -> tuple[ModuleType, str]:
    """The log store's index module (its ``LogIndex``) and its name."""
    return twin("log index")


def client_book() -> tuple[ModuleType, str]:
    """The client's book module (its ``RequestBook``) and its name."""
    return twin("client book")


def client_handoff() -> tuple[ModuleType, str]:
    """The sync client's hand-over between its callers and its I/O thread (``MapSlot``,
    ``deliver``, ``submit_command``, ``map_commands``) and its name."""
    return twin("client handoff")
