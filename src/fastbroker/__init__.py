"""fastbroker: a ZeroMQ task broker where workers ask for jobs when they are ready."""

from __future__ import annotations

from fastbroker._common import BrokerError, ConfigError
from fastbroker._select import core_name
from fastbroker.client.asyncio import AsyncClient
from fastbroker.client.outcomes import (
    DeadLetters,
    DeadRequest,
    Rejected,
    Requeued,
    Status,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    UnknownRequest,
)
from fastbroker.client.sync import Client, ReqClient, TaskAborted
from fastbroker.server.broker import Broker
from fastbroker.worker.base import ReqWorker, Worker, WorkerBase

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Broker",
    "BrokerError",
    "Client",
    "ConfigError",
    "DeadLetters",
    "DeadRequest",
    "Rejected",
    "Requeued",
    "ReqClient",
    "ReqWorker",
    "Status",
    "TaskAborted",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimedOut",
    "UnknownRequest",
    "Worker",
    "WorkerBase",
    "core_name",
    "__version__",
]
