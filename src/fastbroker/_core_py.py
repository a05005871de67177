"""Pure-Python broker core: the same interface and behaviour as the compiled ``_core``.

It is the fallback where the extension cannot be built and the yardstick the
compiled core is measured against. Like the compiled module, which includes its parts
(``core/<part>.pxi``), it is only their sum: the parts live in ``fastbroker.core``,
one module per compiled file, with the same classes and methods in the same order (as
msgpack's ``fallback.py`` mirrors ``_cmsgpack``). Payload frames travel as
``zmq.Frame`` objects received with ``copy=False``, so they are shared, not copied,
here too.
"""

from __future__ import annotations

# The parts BrokerCore composes: the compiled module shows its cdef parts too, under
# the same names (re-exported, not API).
from fastbroker.core.attempts import Attempts as Attempts
from fastbroker.core.broker_core import BrokerCore
from fastbroker.core.client_side import ClientSide as ClientSide
from fastbroker.core.clock import Clock as Clock, monotonic
from fastbroker.core.counters import Counters as Counters
from fastbroker.core.deadline_heap import DeadlineHeap
from fastbroker.core.events import Events as Events
from fastbroker.core.idle_workers import IdleWorkers
from fastbroker.core.job_queue import JobQueue as JobQueue
from fastbroker.core.journal import Journal as Journal
from fastbroker.core.kept_outcomes import KeptOutcomes as KeptOutcomes
from fastbroker.core.reply_batches import ReplyBatches as ReplyBatches
from fastbroker.core.request_ids import RequestIds
from fastbroker.core.request_table import RequestTable
from fastbroker.core.worker_sessions import WorkerSessions as WorkerSessions
from fastbroker.core.worker_side import WorkerSide as WorkerSide

# The API, as the compiled module's.
__all__ = ["BrokerCore", "DeadlineHeap", "IdleWorkers", "RequestIds", "RequestTable", "monotonic"]
