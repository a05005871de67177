"""The client side: the thread-backed Client, the asyncio AsyncClient, ReqClient and FBC01 without I/O."""

from __future__ import annotations

from fastbroker.client.asyncio import AsyncClient, AsyncRequestFuture
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
from fastbroker.client.sync import Client, ReqClient, RequestFuture, TaskAborted, connect_dealer

__all__ = [
    "AsyncClient",
    "AsyncRequestFuture",
    "Client",
    "DeadLetters",
    "DeadRequest",
    "Rejected",
    "Requeued",
    "ReqClient",
    "RequestFuture",
    "Status",
    "TaskAborted",
    "TaskCancelled",
    "TaskFailed",
    "TaskTimedOut",
    "UnknownRequest",
    "connect_dealer",
]
