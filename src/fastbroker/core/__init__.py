"""The broker core's parts: each compiled ``<part>.pxi`` (included by _core.pyx) beside its pure twin ``<part>.py``."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


def cdef(method: _F) -> _F:
    """Mark a method that is ``cdef`` in the compiled twin (not visible from Python there).

    Only a label for readers and the parity test (tests/test_core_parity.py): the
    method is returned as it is, so it costs nothing when called."""
    setattr(method, "__cdef__", True)  # noqa: B010 (mypy: a function has no such attribute)
    return method
