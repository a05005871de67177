"""Runs one or several processes of a worker class for ``fastbroker worker``.

With several processes, the parent forwards SIGINT/SIGTERM to its children and
restarts a child that dies unexpectedly: at once when it had been serving (it ran
for CRASH_LOOP_WINDOW or more) or was killed by a signal from outside (SIGKILL,
SIGTERM, SIGINT, SIGHUP: the OOM killer, an operator); with a back-off only when it
keeps failing right after it starts (a crash loop), so that it does not spin. Each
restart is logged with its cause. After a stop was requested, nothing is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any, Callable, List, Mapping, Optional, Tuple

import zmq

from fastbroker._common import ConfigError, zmq_reason
from fastbroker.signals import install_stop_handlers

log = logging.getLogger("fastbroker.worker")

EXIT_CONFIG = 2

PARENT_CHECK_INTERVAL = 1.0

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


def _stop_when_orphaned(worker: Any, parent_pid: int) -> None:
    # A pool child must not outlive a pool parent that was SIGKILLed.
    while not worker.stopping:
        if os.getppid() != parent_pid:
            log.warning("worker pool parent %d is gone; stopping", parent_pid)
            worker.stop()
            return
        threading.Event().wait(PARENT_CHECK_INTERVAL)


def make_worker(
    cls: type, requests_addr: str, answers_addr: Optional[str], options: Optional[Mapping[str, Any]] = None
) -> Any:
    """An instance of `cls`, configured with `options` (Worker subclasses only).
    ConfigError when it cannot connect or an option is invalid."""
    try:
        worker = cls(None, requests_addr, answers_addr)
    except zmq.ZMQError as exc:
        where = requests_addr if answers_addr is None else f"{requests_addr!r} / {answers_addr!r}"
        raise ConfigError(f"cannot connect to {where}: {zmq_reason(exc)}") from None
    if options:
        try:
            worker.configure(**options)
        except BaseException:
            worker.close()
            raise
    return worker


def run_one(
    cls: type,
    requests_addr: str,
    answers_addr: Optional[str],
    parent_pid: int = 0,
    options: Optional[Mapping[str, Any]] = None,
) -> int:
    """Run one worker in this process until SIGINT/SIGTERM; its jobs in hand are finished first."""
    # Handlers first: a signal that arrives while the worker is being built must
    # stop it once built, not reach the handler this process had before (a pool
    # child inherits the parent's, which forwards signals to the children).
    requested = threading.Event()
    built: list = []

    def stop() -> None:
        requested.set()
        if built:
            built[0].stop()

    install_stop_handlers(stop)
    worker = make_worker(cls, requests_addr, answers_addr, options)
    built.append(worker)
    if requested.is_set():
        worker.stop()
    if parent_pid:
        threading.Thread(target=_stop_when_orphaned, args=(worker, parent_pid), daemon=True).start()
    try:
        worker.run()
    finally:
        worker.close()
    return 0


def _child(
    cls: type,
    requests_addr: str,
    answers_addr: Optional[str],
    parent_pid: int,
    options: Optional[Mapping[str, Any]],
    cpu: Optional[int] = None,
) -> None:
    # Out of the terminal's process group: Ctrl-C reaches the parent only, which
    # passes it on once (a second SIGINT would make the child exit at once).
    os.setpgrp()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        code = run_one(cls, requests_addr, answers_addr, parent_pid, options)
    except ConfigError as exc:
        print(f"fastbroker: error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    os._exit(code)


class _Slot:
    """One of the pool's processes, over its successive restarts."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Optional[BaseProcess] = None
        self.exited = True  # the current process's exit was handled (or none was started)
        self.started = 0.0
        self.delay = RESTART_DELAY
        self.restart_at: Optional[float] = None


def cpus_for(processes: int) -> List[int]:
    """The CPU of each of `processes` children with ``--cpu-affinity``: the CPUs this
    process may run on, in order, one per child, round again when there are more
    children than CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    return [allowed[i % len(allowed)] for i in range(processes)]


def run_pool(
    cls: type,
    requests_addr: str,
    answers_addr: Optional[str],
    processes: int,
    options: Optional[Mapping[str, Any]] = None,
    cpu_affinity: bool = False,
) -> int:
    """Run `processes` workers; signals to this process are passed on to each.
    With `cpu_affinity`, each process is pinned to one CPU of its own (``cpus_for``).
    Returns the highest exit status of the last child of each slot (0 when all
    stopped cleanly)."""
    cpus: List[Optional[int]] = list(cpus_for(processes)) if cpu_affinity else [None] * processes
    if processes == 1:
        if cpus[0] is not None:
            os.sched_setaffinity(0, {cpus[0]})
        return run_one(cls, requests_addr, answers_addr, 0, options)
    # fork: the class was imported here and needs no pickling; no ZeroMQ context
    # exists yet in this process, so none is inherited.
    mp = multiprocessing.get_context("fork")
    parent_pid = os.getpid()
    slots = [_Slot(i) for i in range(processes)]
    stopping: List[int] = []  # signals received
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def start(slot: _Slot) -> BaseProcess:
        process = mp.Process(
            target=_child,
            args=(cls, requests_addr, answers_addr, parent_pid, options, cpus[slot.index]),
            name=f"worker-{slot.index}",
        )
        slot.process = process
        process.start()
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
        log.info("started %d worker processes: %s", processes, [s.process.pid for s in slots if s.process])
        if cpu_affinity:
            log.info("each pinned to one CPU: %s", cpus)
        _supervise(slots, start, stopping, wake_r)
    finally:
        os.close(wake_r)
        os.close(wake_w)
    codes = [slot.process.exitcode for slot in slots if slot.process is not None]
    return max(((code or 0) if (code or 0) >= 0 else 1) for code in codes)


def _supervise(slots: List[_Slot], start: Callable[[_Slot], BaseProcess], stopping: List[int], wake_r: int) -> None:
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
                _on_exit(slot, stopping)
        now = time.monotonic()
        for slot in slots:
            if slot.restart_at is not None and now >= slot.restart_at and not stopping:
                restarted = start(slot)
                log.warning("restarted worker process %d as pid %s", slot.index, restarted.pid)


def _on_exit(slot: _Slot, stopping: List[int]) -> None:
    proc = slot.process
    assert proc is not None
    code = proc.exitcode
    if stopping:
        log.info("worker process %s exited with %s", proc.pid, code)
        return
    if code == EXIT_CONFIG:
        # A configuration error would only repeat itself.
        log.error("worker process %s exited with status %d (configuration error); not restarting", proc.pid, code)
        return
    assert code is not None
    ran = time.monotonic() - slot.started
    wait, slot.delay, cause = restart_policy(code, ran, slot.delay)
    slot.restart_at = time.monotonic() + wait
    log.warning(
        "worker process %s died unexpectedly (%s, after %.1f s); restarting %s",
        proc.pid,
        cause,
        ran,
        "at once" if wait == 0 else f"in {wait:.1f} s",
    )


__all__ = ["run_pool", "run_one", "make_worker", "cpus_for"]
