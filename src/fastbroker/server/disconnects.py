"""DisconnectWatch: tells the broker's loop at once when a peer of its workers socket
disconnects, so that a worker whose process died has its jobs back in the queue without
waiting for its heartbeats to lapse (docs/PROTOCOL.md 4.8).

libzmq's socket monitor reports that *a* connection ended, not whose (ZMQ_ROUTER_NOTIFY,
which would say whose, is a draft API that pyzmq's wheels do not build). So the loop
answers a report by probing every DEALER worker (BrokerCore.probe_workers: a HEARTBEAT
to each; the send fails, ROUTER_MANDATORY, for exactly those whose connection is gone).
The monitor is read on a thread of its own, which only sets a flag and wakes the loop:
the core is touched by the loop's thread alone.

The monitor's pipe holds at most 1000 unread events (its high-water mark); libzmq drops
a later one. That loses no disconnection: the pipe is full only while 1000 reports wait,
and the probe that the next of them causes, which comes after the dropped event, finds
every connection that has ended by then, that one included. So nothing is counted.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("fastbroker")

POLL_MS = 200
"""How often the watcher looks at its stop flag while no event comes."""


class DisconnectWatch:
    """Calls ``on_disconnect()`` (from its own thread) each time a connection of
    ``socket`` ends; ``close()`` stops it. Create and close it in the thread that uses
    ``socket``."""

    def __init__(self, socket: zmq.Socket, on_disconnect: Callable[[], None]) -> None:
        self._socket = socket
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._on_disconnect = on_disconnect
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastbroker-disconnects", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        monitor = self._monitor
        while not self._stop.is_set():
            try:
                if not monitor.poll(POLL_MS):
                    continue
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:  # the context is ending: nothing more to watch
                log.debug("disconnect watch ends: %s", exc)
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_disconnect()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is already closed
        self._monitor.close(linger=0)
