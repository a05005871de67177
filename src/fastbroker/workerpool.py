"""Runs one or several processes of a Worker subclass for ``fastbroker worker``."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from typing import List

import zmq

from fastbroker._common import ConfigError
from fastbroker.signals import install_stop_handlers

log = logging.getLogger("fastbroker.worker")


PARENT_CHECK_INTERVAL = 1.0


def _stop_when_orphaned(worker, parent_pid: int) -> None:
    # A pool child must not outlive a pool parent that was SIGKILLed.
    while not worker.stopping:
        if os.getppid() != parent_pid:
            log.warning("worker pool parent %d is gone; stopping", parent_pid)
            worker.stop()
            return
        threading.Event().wait(PARENT_CHECK_INTERVAL)


def run_one(cls: type, requests_addr: str, answers_addr: str, parent_pid: int = 0) -> int:
    """Run one worker in this process until SIGINT/SIGTERM; its job in hand is finished first."""
    try:
        worker = cls(None, requests_addr, answers_addr)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot connect to {requests_addr!r} / {answers_addr!r}: {zmq.strerror(exc.errno)}") from None
    install_stop_handlers(worker.stop)
    if parent_pid:
        threading.Thread(target=_stop_when_orphaned, args=(worker, parent_pid), daemon=True).start()
    try:
        worker.run()
    finally:
        worker.close()
    return 0


def _child(cls: type, requests_addr: str, answers_addr: str, parent_pid: int) -> None:
    # Out of the terminal's process group: Ctrl-C reaches the parent only, which
    # passes it on once (a second SIGINT would make the child exit at once).
    os.setpgrp()
    try:
        code = run_one(cls, requests_addr, answers_addr, parent_pid)
    except ConfigError as exc:
        print(f"fastbroker: error: {exc}", flush=True)
        code = 2
    os._exit(code)


def run_pool(cls: type, requests_addr: str, answers_addr: str, processes: int) -> int:
    """Run `processes` workers; signals to this process are passed on to each.
    Returns the highest exit status of the children (0 when all stopped cleanly)."""
    if processes == 1:
        return run_one(cls, requests_addr, answers_addr)
    # fork: the class was imported here and needs no pickling; no ZeroMQ context
    # exists yet in this process, so none is inherited.
    mp = multiprocessing.get_context("fork")
    children: List[multiprocessing.Process] = [
        mp.Process(target=_child, args=(cls, requests_addr, answers_addr, os.getpid()), name=f"worker-{i}")
        for i in range(processes)
    ]
    for child in children:
        child.start()
    log.info("started %d worker processes: %s", processes, [c.pid for c in children])

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                try:
                    os.kill(child.pid, signum)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for child in children:
        child.join()
    return max((c.exitcode or 0) if (c.exitcode or 0) >= 0 else 1 for c in children)
