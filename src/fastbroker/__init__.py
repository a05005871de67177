"""fastbroker: a ZeroMQ task broker where workers ask for jobs when they are ready."""

from __future__ import annotations

from fastbroker._common import BrokerError, ConfigError
from fastbroker._select import core_name
from fastbroker.broker import Broker
from fastbroker.client import ReqClient, TaskAborted
from fastbroker.worker import ReqWorker, Worker, WorkerBase

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerError",
    "ConfigError",
    "ReqClient",
    "ReqWorker",
    "TaskAborted",
    "Worker",
    "WorkerBase",
    "core_name",
    "__version__",
]
