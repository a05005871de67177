"""SIGINT/SIGTERM handling shared by the broker and worker commands."""

from __future__ import annotations

import os
import signal
from typing import Callable, List, Optional

EXIT_SECOND_SIGNAL = 130

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
"""What stops a broker or a worker process (a supervisor blocks them across a fork)."""


def install_stop_handlers(stop: Callable[[], None], wake_fd: Optional[int] = None) -> None:
    """First SIGINT or SIGTERM calls `stop`; a second one exits at once.

    With `wake_fd`, a signal that lands while a loop waits in C without the GIL
    is also written to that pipe, which the loop polls, so `stop` runs at once.
    """
    received: List[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            os._exit(EXIT_SECOND_SIGNAL)
        received.append(signum)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if wake_fd is not None:
        signal.set_wakeup_fd(wake_fd, warn_on_full_buffer=False)
    # A supervisor's child starts with them blocked (supervisor.supervise): one that came
    # meanwhile is delivered now, to these handlers.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
