"""Runs one or several processes of a worker class for ``fastbroker worker``.

With several processes, fastbroker.supervisor forks them, passes SIGINT/SIGTERM on and
restarts a child that dies unexpectedly (at once, or with a back-off in a crash loop).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, List, Mapping, Optional, Sequence, Union

import zmq

from fastbroker._common import ConfigError, zmq_reason
from fastbroker.signals import install_stop_handlers
from fastbroker.supervisor import EXIT_CONFIG, stop_when_orphaned, supervise

log = logging.getLogger("fastbroker.worker")


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
        watch = (worker.stop, lambda: worker.stopping, parent_pid, log)
        threading.Thread(target=stop_when_orphaned, args=watch, daemon=True).start()
    try:
        worker.run()
    finally:
        worker.close()
    return 0


def cpus_for(processes: int) -> List[int]:
    """The CPU of each of `processes` children with ``--cpu-affinity``: the CPUs this
    process may run on, in order, one per child, round again when there are more
    children than CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    return [allowed[i % len(allowed)] for i in range(processes)]


def run_pool(
    cls: type,
    requests_addr: Union[str, Sequence[str]],
    answers_addr: Union[None, str, Sequence[str]],
    processes: int,
    options: Optional[Mapping[str, Any]] = None,
    cpu_affinity: bool = False,
) -> int:
    """Run `processes` workers; signals to this process are passed on to each.
    With `cpu_affinity`, each process is pinned to one CPU of its own (``cpus_for``).
    Given a list of brokers (and, for a ReqWorker, the list of their answers
    endpoints), process i serves broker i mod N: each process serves one broker, so
    there must be at least as many processes as brokers. Returns the highest exit
    status of the last child of each slot (0 when all stopped cleanly)."""
    brokers = [requests_addr] if isinstance(requests_addr, str) else list(requests_addr)
    answers: List[Optional[str]]
    if answers_addr is None or isinstance(answers_addr, str):
        answers = [answers_addr] * len(brokers)
    else:
        answers = list(answers_addr)
    if len(answers) != len(brokers):
        raise ConfigError(f"{len(brokers)} brokers but {len(answers)} answers endpoints: give one per broker")
    if processes < len(brokers):
        raise ConfigError(
            f"{len(brokers)} brokers need --processes {len(brokers)} or more: each process serves one broker"
        )
    cpus: List[Optional[int]] = list(cpus_for(processes)) if cpu_affinity else [None] * processes
    if processes == 1:
        if cpus[0] is not None:
            os.sched_setaffinity(0, {cpus[0]})
        return run_one(cls, brokers[0], answers[0], 0, options)
    if cpu_affinity:
        log.info("each worker process pinned to one CPU: %s", cpus)

    def child(index: int, parent_pid: int) -> None:
        # Out of the terminal's process group: Ctrl-C reaches the parent only, which
        # passes it on once (a second SIGINT would make the child exit at once).
        os.setpgrp()
        cpu = cpus[index]
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        try:
            code = run_one(cls, brokers[index % len(brokers)], answers[index % len(brokers)], parent_pid, options)
        except ConfigError as exc:
            print(f"fastbroker: error: {exc}", file=sys.stderr, flush=True)
            code = EXIT_CONFIG
        os._exit(code)

    return supervise(processes, child, "worker", log)


__all__ = ["run_pool", "run_one", "make_worker", "cpus_for"]
