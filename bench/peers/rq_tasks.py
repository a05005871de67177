"""The RQ job function of the peer benchmark (RQ pickles the call: bytes go as they are)."""

from __future__ import annotations


def echo(payload: bytes) -> bytes:
    return payload
