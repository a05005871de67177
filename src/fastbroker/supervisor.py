"""Process supervision shared by ``fastbroker worker --processes N`` (worker/pool.py)
and ``fastbroker broker --shards N`` (server/shards.py): fork N children, pass
SIGINT/SIGTERM on to them, and restart a child that dies unexpectedly: at once when it
had been serving (it ran for CRASH_LOOP_WINDOW or more) or was killed by a signal from
outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: the OOM killer, an operator); with a
back-off only when it keeps failing right after it starts (a crash loop), so that it
does not spin. Each restart is logged with its cause. After a stop was requested,
nothing is restarted; a child that exits with EXIT_CONFIG (a configuration error) is
not restarted either.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Callable, List, Optional, Tuple

from fastbroker.signals import STOP_SIGNALS

EXIT_CONFIG = 2
"""A child's exit status for a configuration error: restarting would only repeat it."""

PARENT_CHECK_INTERVAL = 1.0
"""Seconds between a child's checks that its parent is still there."""

RESTART_DELAY = 0.5
"""Seconds before restarting a child that failed right after it started; doubles at
each such failure in a row..."""
RESTART_DELAY_MAX = 10.0
"""...up to this."""
CRASH_LOOP_WINDOW = 2.0
"""A child that exits on its own sooner than this after it started is in a crash loop
(back-off); one that ran longer had been serving, and is restarted at once."""
EXTERNAL_SIGNALS = frozenset((signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
"""Signals that come from outside the child (the OOM killer, an operator, a chaos test):
its death is not its own doing, so it is restarted at once."""


def restart_policy(exitcode: int, ran: float, delay: float) -> Tuple[float, float, str]:
    """(seconds before the restart, the back-off for the next failure, the cause in
    words) for a child that exited with `exitcode` (-N: signal N) after `ran` seconds,
    when the back-off stood at `delay`."""
    if exitcode < 0:
        try:
            cause = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            cause = f"killed by signal {-exitcode}"
    else:
        cause = f"exit status {exitcode}"
    if ran >= CRASH_LOOP_WINDOW or -exitcode in EXTERNAL_SIGNALS:
        return 0.0, RESTART_DELAY, cause
    return delay, min(delay * 2, RESTART_DELAY_MAX), cause + f" {ran:.1f} s after it started (crash loop: back-off)"


def stop_when_orphaned(
    stop: Callable[[], None], stopped: Callable[[], bool], parent_pid: int, log: logging.Logger
) -> None:
    """In a child, on a thread of its own: call `stop` once the parent is gone (a
    supervisor that was SIGKILLed must not leave its children running)."""
    while not stopped():
        if os.getppid() != parent_pid:
            log.warning("supervisor %d is gone; stopping", parent_pid)
            stop()
            return
        threading.Event().wait(PARENT_CHECK_INTERVAL)


class _Slot:
    """One of the children, over its successive restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[BaseProcess] = None
        self.exited = True  # the current process's exit was handled (or none was started)
        self.started = 0.0
        self.delay = RESTART_DELAY
        self.restart_at: Optional[float] = None


def supervise(
    count: int, target: Callable[[int, int], None], what: str, log: logging.Logger, config_error_stops_all: bool = False
) -> int:
    """Fork `count` children, child i running ``target(i, parent_pid)`` (which must
    end with os._exit), until all have exited after a stop (SIGINT/SIGTERM to this
    process, passed on to each) or for good. `what` names the children in the log
    ("worker": "worker process 1234 died..."). With `config_error_stops_all`, a child
    that exits with EXIT_CONFIG stops the others too (SIGTERM): the whole set is useless
    without it. Returns the highest exit status of the last child of each slot (0 when
    all stopped cleanly; 1 for one killed by a signal)."""
    # fork: what the children run was imported here and needs no pickling; the caller
    # makes no ZeroMQ context before this, so none is inherited.
    mp = multiprocessing.get_context("fork")
    parent_pid = os.getpid()
    slots = [_Slot(i) for i in range(count)]
    stopping: List[int] = []  # signals received
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def start(slot: _Slot) -> BaseProcess:
        process = mp.Process(
            target=target, args=(slot.index, parent_pid), name=f"{what}-{slot.index}".replace(" ", "-")
        )
        slot.process = process
        # SIGINT and SIGTERM stay blocked across the fork: the child inherits this process's
        # handler (forward), which in the child would signal the child itself, again and
        # again. Blocked, a signal waits until the child has its own handlers
        # (signals.install_stop_handlers unblocks them); here, until the child is listed.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        slot.exited = False
        slot.started = time.monotonic()
        slot.restart_at = None
        return process

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for slot in slots:
            proc = slot.process
            if proc is not None and proc.exitcode is None and proc.pid is not None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass
        try:
            os.write(wake_w, b"\0")  # the main loop waits on this pipe too
        except OSError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        for slot in slots:
            start(slot)
        log.info("started %d %s processes: %s", count, what, [s.process.pid for s in slots if s.process])
        stop_all = (lambda: forward(signal.SIGTERM, None)) if config_error_stops_all else None
        _wait(slots, start, stopping, wake_r, what, log, stop_all)
    finally:
        os.close(wake_r)
        os.close(wake_w)
    codes = [slot.process.exitcode for slot in slots if slot.process is not None]
    return max(((code or 0) if (code or 0) >= 0 else 1) for code in codes)


def _wait(
    slots: List[_Slot],
    start: Callable[[_Slot], BaseProcess],
    stopping: List[int],
    wake_r: int,
    what: str,
    log: logging.Logger,
    stop_all: Optional[Callable[[], None]],
) -> None:
    """Wait for the children; restart those that die while no stop was requested."""
    while True:
        if stopping:
            for slot in slots:
                slot.restart_at = None
        # A slot not yet exited has a process (start() sets it first).
        running = [(slot, slot.process) for slot in slots if not slot.exited and slot.process is not None]
        restarts = [slot.restart_at for slot in slots if slot.restart_at is not None]
        if not running and not restarts:
            return
        now = time.monotonic()
        timeout = max(0.0, min(restarts) - now) if restarts else None
        multiprocessing.connection.wait([wake_r, *(process.sentinel for _, process in running)], timeout)
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
        for slot, process in running:
            # exitcode polls: it also catches a child that died before this wait began.
            if process.exitcode is not None:
                process.join()
                slot.exited = True
                if _on_exit(slot, stopping, what, log) and stop_all is not None and not stopping:
                    log.error("stopping every %s process", what)
                    stop_all()
        now = time.monotonic()
        for slot in slots:
            if slot.restart_at is not None and now >= slot.restart_at and not stopping:
                restarted = start(slot)
                log.warning("restarted %s process %d as pid %s", what, slot.index, restarted.pid)


def _on_exit(slot: _Slot, stopping: List[int], what: str, log: logging.Logger) -> bool:
    """Schedule the restart of a child that exited; True if it had a configuration error."""
    proc = slot.process
    assert proc is not None
    code = proc.exitcode
    if stopping:
        log.info("%s process %s exited with %s", what, proc.pid, code)
        return False
    if code == EXIT_CONFIG:
        # A configuration error would only repeat itself.
        log.error("%s process %s exited with status %d (configuration error); not restarting", what, proc.pid, code)
        return True
    assert code is not None
    ran = time.monotonic() - slot.started
    wait, slot.delay, cause = restart_policy(code, ran, slot.delay)
    slot.restart_at = time.monotonic() + wait
    log.warning(
        "%s process %s died unexpectedly (%s, after %.1f s); restarting %s",
        what,
        proc.pid,
        cause,
        ran,
        "at once" if wait == 0 else f"in {wait:.1f} s",
    )
    return False


__all__ = ["supervise", "restart_policy", "stop_when_orphaned", "EXIT_CONFIG"]
