"""The broker process: the loop around the core, the durable store, metrics and logs."""

from __future__ import annotations

from fastbroker.server.broker import Broker

__all__ = ["Broker"]
