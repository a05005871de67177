"""The worker side: the Worker classes users subclass, their session with the broker, the process pool."""

from __future__ import annotations

from fastbroker.worker.base import READY, ReqWorker, Worker, WorkerBase, WorkerStats

__all__ = ["WorkerBase", "ReqWorker", "Worker", "WorkerStats", "READY"]
