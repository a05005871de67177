"""fastbroker: a ZeroMQ task broker where workers ask for jobs when they are ready."""

from __future__ import annotations

from fastbroker._common import BrokerError, ConfigError
from fastbroker._select import core_name
from fastbroker.broker import Broker
from fastbroker.async_client import AsyncClient
from fastbroker.client import Client, ReqClient, TaskAborted
from fastbroker.outcomes import Rejected, Status, TaskCancelled, TaskFailed, TaskTimedOut, UnknownRequest
from fastbroker.worker import ReqWorker, Worker, WorkerBase

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Broker",
    "BrokerError",
    "Client",
    "ConfigError",
    "Rejected",
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
