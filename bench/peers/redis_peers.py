"""The peers on Redis: Dramatiq (RedisBroker + Results middleware on the Redis backend),
Celery (Redis as broker and result backend) and RQ. Each row flushes the server first,
starts its workers as a user would (the peer's own command line) and waits, bounded,
until every worker process is up; the client side runs in this process.

The peers' packages are imported only when a row starts (after ``common.require``).
"""

from __future__ import annotations

import subprocess
import time
from typing import Dict, List, Optional

from bench import e2e
from bench.peers import common
from bench.peers.redis_url import REDIS_URL_ENV

RQ_QUEUE = "peers"


class RedisPeer:
    """What the Redis peers share: the server, the worker processes, the stop."""

    modules: tuple = ("redis",)
    servers: tuple = ("redis-server",)
    expected: list = common.PAYLOADS

    def __init__(self, run: e2e.Run, url: str, tuned: bool) -> None:
        self.run, self.url, self.tuned = run, url, tuned
        self.procs: List[subprocess.Popen] = []

    def _fresh(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()

    def _start(self, argv: List[str], name: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start the peer's own command (a console script of this environment)."""
        argv = [common.script(argv[0]), *argv[1:]]
        proc = common.start(self.run, argv, name, env={REDIS_URL_ENV: self.url, **(env or {})}, python=False)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            common.stop(proc)


class DramatiqPeer(RedisPeer):
    """``dramatiq bench.peers.dramatiq_tasks --processes N`` (8 threads a process, its
    default); the client sends every message, then ``get_result(block=True)`` of each.
    Tuned: ``dramatiq_worker_timeout=1`` (environment). The Redis broker has no blocking
    fetch: a worker that found its queue empty sleeps 5-10 ms, then twice as long at each
    miss up to ``worker_timeout`` (default 1000 ms) before it polls again, so a lone job
    waits for the next poll; with 1 ms it waits at most about 1 ms (and an idle worker
    polls Redis about 1000 times a second)."""

    modules = ("dramatiq", "redis")
    expected = common.TEXTS
    TUNED_ENV = {"dramatiq_worker_timeout": "1"}

    def start(self, processes: int) -> List[int]:
        self._fresh()
        from bench.peers import dramatiq_tasks

        self.echo = dramatiq_tasks.echo
        argv = ["dramatiq", "bench.peers.dramatiq_tasks", "--processes", str(processes)]
        proc = self._start(argv, f"dramatiq-{processes}", self.TUNED_ENV if self.tuned else None)
        deadline = time.monotonic() + common.START_LIMIT
        common.wait_for_log(proc, "Worker process is ready for action.", deadline, count=processes)
        return [proc.pid]

    def call(self, i: int) -> None:
        message = self.echo.send(common.TEXTS[i])
        answer = message.get_result(block=True, timeout=int(common.RTT_LIMIT * 1000))
        assert answer == common.TEXTS[i], answer

    def run_all(self) -> list:
        send = self.echo.send
        messages = [send(text) for text in common.TEXTS]
        limit = int(common.round_limit(len(messages)) * 1000)
        return [m.get_result(block=True, timeout=limit) for m in messages]


class CeleryPeer(RedisPeer):
    """``celery -A bench.peers.celery_tasks worker --concurrency N`` (prefork pool, the
    default); the client calls ``echo.delay`` for each job, then ``AsyncResult.get`` of
    each (the Redis backend delivers results by pub/sub: no polling). No tuned row: no
    default limits it (bench/README.md, "Peers")."""

    modules = ("celery", "redis")
    expected = common.TEXTS

    def start(self, processes: int) -> List[int]:
        self._fresh()
        from bench.peers import celery_tasks

        self.app, self.echo = celery_tasks.app, celery_tasks.echo
        name = f"peers{processes}@%h"
        argv = ["celery", "-A", "bench.peers.celery_tasks", "worker", "--concurrency", str(processes), "-n", name]
        proc = self._start(argv, f"celery-{processes}")
        deadline = time.monotonic() + common.START_LIMIT
        # The node answers a ping once its pool's processes are forked and it consumes.
        common.wait_until(lambda: bool(self.app.control.ping(timeout=0.5)), "celery's ping", deadline, proc)
        return [proc.pid]

    def call(self, i: int) -> None:
        answer = self.echo.delay(common.TEXTS[i]).get(timeout=common.RTT_LIMIT)
        assert answer == common.TEXTS[i], answer

    def run_all(self) -> list:
        delay = self.echo.delay
        results = [delay(text) for text in common.TEXTS]
        deadline = time.monotonic() + common.round_limit(len(results))
        return [r.get(timeout=max(0.1, deadline - time.monotonic())) for r in results]


class RqPeer(RedisPeer):
    """N ``rq worker`` processes (the default ``rq.Worker``: it forks a work horse for
    every job); the client enqueues every job, then ``job.latest_result(timeout=...)``
    of each (a blocking XREAD on the job's result stream: no polling). Tuned:
    ``--worker-class rq.SimpleWorker`` (runs the job in the worker process, no fork)."""

    modules = ("rq", "redis")

    def start(self, processes: int) -> List[int]:
        self._fresh()
        import redis
        from rq import Queue, Worker

        self.connection = redis.Redis.from_url(self.url)
        self.queue = Queue(RQ_QUEUE, connection=self.connection)
        argv = ["rq", "worker", "--url", self.url, RQ_QUEUE]
        if self.tuned:
            argv += ["--worker-class", "rq.SimpleWorker"]
        procs = [self._start(argv, f"rq-{processes}-{i}") for i in range(processes)]
        deadline = time.monotonic() + common.START_LIMIT
        for proc in procs:
            common.wait_until(
                lambda: Worker.count(connection=self.connection, queue=self.queue) >= processes,
                "the rq workers to register",
                deadline,
                proc,
            )
        return [proc.pid for proc in procs]

    def _result(self, job, limit: float) -> bytes:
        from rq.results import Result

        result = job.latest_result(timeout=max(1, int(limit)))
        if result is None or result.type != Result.Type.SUCCESSFUL:
            raise RuntimeError(f"rq job {job.id}: no successful result within {limit:.0f} s: {result}")
        return result.return_value

    def call(self, i: int) -> None:
        from bench.peers.rq_tasks import echo

        answer = self._result(self.queue.enqueue(echo, common.PAYLOADS[i]), common.RTT_LIMIT)
        assert answer == common.PAYLOADS[i], answer

    def run_all(self) -> list:
        from bench.peers.rq_tasks import echo

        enqueue = self.queue.enqueue
        jobs = [enqueue(echo, payload) for payload in common.PAYLOADS]
        deadline = time.monotonic() + common.round_limit(len(jobs))
        return [self._result(job, deadline - time.monotonic()) for job in jobs]
