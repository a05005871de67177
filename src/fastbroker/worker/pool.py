"""Runs one or several processes of a worker class for ``fastbroker worker``.

With several processes, the parent forwards SIGINT/SIGTERM to its children and
restarts a child that dies unexpectedly, with a back-off so a child that dies at
once does not spin; after a stop was requested, nothing is restarted.
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
from typing import Any, Callable, List, Mapping, Optional

import zmq

from fastbroker._common import ConfigError, zmq_reason
from fastbroker.signals import install_stop_handlers

log = logging.getLogger("fastbroker.worker")

EXIT_CONFIG = 2

PARENT_CHECK_INTERVAL = 1.0

RESTART_DELAY = 0.5
"""Seconds before restarting a child that died; doubles at each death in a row..."""
RESTART_DELAY_MAX = 10.0
"""...up to this."""
RESTART_RESET_AFTER = 30.0
"""A child that ran this long died of something new: the next restart is quick again."""


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
    cls: type, requests_addr: str, answers_addr: Optional[str], parent_pid: int, options: Optional[Mapping[str, Any]]
) -> None:
    # Out of the terminal's process group: Ctrl-C reaches the parent only, which
    # passes it on once (a second SIGINT would make the child exit at once).
    os.setpgrp()
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


def run_pool(
    cls: type,
    requests_addr: str,
    answers_addr: Optional[str],
    processes: int,
    options: Optional[Mapping[str, Any]] = None,
) -> int:
    """Run `processes` workers; signals to this process are passed on to each.
    Returns the highest exit status of the last child of each slot (0 when all
    stopped cleanly)."""
    if processes == 1:
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
            target=_child, args=(cls, requests_addr, answers_addr, parent_pid, options), name=f"worker-{slot.index}"
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
    ran = time.monotonic() - slot.started
    if ran >= RESTART_RESET_AFTER:
        slot.delay = RESTART_DELAY
    slot.restart_at = time.monotonic() + slot.delay
    log.warning(
        "worker process %s died unexpectedly (exit status %s after %.1f s); restarting in %.1f s",
        proc.pid,
        code,
        ran,
        slot.delay,
    )
    slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX)


__all__ = ["run_pool", "run_one", "make_worker"]
