"""fastbroker beside the job systems a user would pick instead, on one workload, in one
run (issue 16 part 3): ``make bench-peers``, or

    pytest bench/test_peers.py --benchmark-only --benchmark-group-by=group

Workload: N echo jobs of 16 bytes (FASTBROKER_PEERS_N [20000]), one client (this
process) submitting all of them, then collecting every result; with 1 and with 2 worker
processes (groups ``peers-1proc``, ``peers-2proc``). Rows (see bench/README.md, "Peers"):

* ``fastbroker``: ``Client.map``, a ``fastbroker broker`` process, ``fastbroker worker
  bench.test_user_path:Echo --processes N`` (its default credit 1); ``fastbroker-credit64``:
  the same with ``--credit 64``, the user path's setting; ``fastbroker-broker``: that
  broker alone, under the compiled load generators (N FBW02 worker processes in C, the
  FBC02 client in C in this process), what it does when clients and workers cost ~nothing;
* ``dramatiq`` (Redis broker, Results middleware on Redis), ``celery`` (Redis broker and
  result backend), ``rq`` (the default ``Worker``, a fork per job), ``nats`` (JetStream
  work queue, nats-py): each peer as its documentation runs it, and where one of its
  defaults is what limits it, a tuned row beside it that turns that knob
  (``dramatiq-tuned``, ``rq-simpleworker``, ``nats-tuned``; Celery has none: its cost
  is its CPU per job, which the usual flags did not move).

Servers: the benchmark starts Debian's ``redis-server`` and ``nats-server -js`` (and the
fastbroker broker) on free loopback ports with their files in a temporary directory,
once for the module, and stops them after; every worker process is started for its row
and stopped after it.

extra_info per row: jobs/s (median over FASTBROKER_PEERS_ROUNDS [1] rounds), CPU per
job in µs by role (``client``: this process; ``server``: the redis, nats or fastbroker
broker process; ``workers``: every worker process tree, forked children included) over
the measured rounds, its total, the median of FASTBROKER_PEERS_RTT [200] single-job round
trips (submit one, wait for its result), and each as a ratio to the ``fastbroker`` and
``fastbroker-credit64`` rows of the same group and run.

A peer whose package (the ``bench-peers`` extra) or server (the Debian package) is
missing is skipped with how to install it; with FASTBROKER_PEERS_REQUIRED=1 (``make
bench-peers``) it fails instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import pytest

from bench import e2e
from bench.peers import common, fastbroker_peer
from bench.peers.nats_peer import NatsPeer
from bench.peers.redis_peers import CeleryPeer, DramatiqPeer, RqPeer
from bench.peers.redis_url import REDIS_URL_ENV

N = common.PEERS_N
PROCESSES = (1, 2)
REFERENCES = ("fastbroker", "fastbroker-credit64")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    tuned: bool
    setup: str
    """What the row runs, for extra_info (the knob of a tuned row); {n}: the worker processes."""


ROWS = [
    Row("fastbroker", "fastbroker", False, "fastbroker worker --processes {n} (credit 1: its default)"),
    Row("fastbroker-credit64", "fastbroker", True, "fastbroker worker --processes {n} --credit 64"),
    Row("fastbroker-broker", "loadgen", True, "the broker alone: {n} compiled FBW02 workers, a compiled FBC02 client"),
    Row("dramatiq", "dramatiq", False, "dramatiq --processes {n} (8 threads, worker_timeout 1000 ms)"),
    Row("dramatiq-tuned", "dramatiq", True, "dramatiq --processes {n}, dramatiq_worker_timeout=1"),
    Row("celery", "celery", False, "celery worker --concurrency {n} (prefork, prefetch multiplier 4)"),
    Row("rq", "rq", False, "{n} x rq worker (rq.Worker: a fork per job)"),
    Row("rq-simpleworker", "rq", True, "{n} x rq worker --worker-class rq.SimpleWorker (no fork)"),
    Row("nats", "nats", False, "{n} workers, fetch(1); client js.publish, one PubAck at a time"),
    Row("nats-tuned", "nats", True, "{n} workers, fetch(64); client js.publish_async (<= 4000 in flight)"),
]
CASES = [(processes, row) for processes in PROCESSES for row in ROWS]
PEERS = {"dramatiq": DramatiqPeer, "celery": CeleryPeer, "rq": RqPeer, "nats": NatsPeer}

_figures: Dict[Tuple[int, str], Dict[str, float]] = {}
"""(processes, row name) -> jobs/s, CPU µs per job, p50 µs: the references' for the ratios."""


# -- servers, once for the module ------------------------------------------------------


@pytest.fixture(scope="module")
def peers_run() -> Iterator[e2e.Run]:
    """A temporary directory for the servers' files and every process's log; every
    process started in it is killed when the module ends, pass or fail."""
    with e2e.temporary_run(argparse.Namespace(transport="tcp"), prefix="fb-peers-") as run:
        yield run


@pytest.fixture(scope="module")
def fastbroker_server(peers_run: e2e.Run) -> Iterator[Tuple[tuple, int]]:
    endpoints, proc = fastbroker_peer.start_broker(peers_run)
    yield endpoints, proc.pid
    common.stop(proc)


@pytest.fixture(scope="module")
def redis_server(peers_run: e2e.Run) -> Iterator[Tuple[str, int]]:
    url, proc = common.start_redis(peers_run)
    os.environ[REDIS_URL_ENV] = url  # for the task modules imported in this process
    yield url, proc.pid
    os.environ.pop(REDIS_URL_ENV, None)
    common.stop(proc)


@pytest.fixture(scope="module")
def nats_server(peers_run: e2e.Run) -> Iterator[Tuple[str, int]]:
    url, proc = common.start_nats(peers_run)
    yield url, proc.pid
    common.stop(proc)


def make_peer(row: Row, request, run: e2e.Run):
    """The row's peer (skipped or failed here if it is not installed) and its server's pid."""
    if row.kind == "fastbroker":
        endpoints, pid = request.getfixturevalue("fastbroker_server")
        return fastbroker_peer.FastbrokerPeer(run, endpoints, 64 if row.tuned else None), pid
    if row.kind == "loadgen":
        if e2e._loadgen is None:
            pytest.skip(f"the compiled load generators are not built ({e2e.LOADGEN_ERROR}): make loadgen")
        endpoints, pid = request.getfixturevalue("fastbroker_server")
        return fastbroker_peer.LoadgenPeer(run, endpoints), pid
    cls = PEERS[row.kind]
    common.require(cls.modules, cls.servers)
    url, pid = request.getfixturevalue("nats_server" if row.kind == "nats" else "redis_server")
    return cls(run, url, row.tuned), pid


# -- the benchmark -----------------------------------------------------------------------


def _check(results: list, expected: list) -> None:
    if results == expected:
        return
    wrong = next((i for i, (a, b) in enumerate(zip(results, expected)) if a != b), None)
    raise AssertionError(f"{len(results)} results for {len(expected)} jobs; first wrong at {wrong}")


def _ratios(processes: int, mine: Dict[str, float], benchmark) -> None:
    for reference in REFERENCES:
        ref = _figures.get((processes, reference))
        if ref is None:
            continue
        benchmark.extra_info[f"vs_{reference.replace('-', '_')}"] = {
            key: round(mine[key] / ref[key], 4) if ref[key] else None for key in mine
        }


@pytest.mark.timeout(common.bench_timeout(N, common.PEERS_ROUNDS, common.RTT_SAMPLES))
@pytest.mark.parametrize("processes, row", CASES, ids=[f"{p}proc-{row.name}" for p, row in CASES])
def test_peer(benchmark, request, peers_run: e2e.Run, processes: int, row: Row) -> None:
    benchmark.group = f"peers-{processes}proc"
    peer, server_pid = make_peer(row, request, peers_run)
    walls: List[float] = []
    try:
        workers = peer.start(processes)
        peer.call(0)  # the first job through: every connection made
        rtts = []
        for i in range(common.RTT_SAMPLES):
            start = time.perf_counter()
            peer.call(i % N)
            rtts.append(time.perf_counter() - start)

        def one_round() -> None:
            start = time.perf_counter()
            results = peer.run_all()
            walls.append(time.perf_counter() - start)
            _check(results, peer.expected)

        meter = common.TreeMeter({"server": [server_pid], "workers": workers})
        benchmark.pedantic(one_round, rounds=common.PEERS_ROUNDS, iterations=1, warmup_rounds=0)
        cpu = meter.per_job(N * len(walls))
    finally:
        peer.close()
    rate = N / statistics.median(walls)
    total = round(sum(cpu.values()), 1)
    p50 = statistics.median(rtts) * 1e6 if rtts else 0.0
    benchmark.extra_info.update(
        peer=row.kind,
        setup=row.setup.format(n=processes),
        processes=processes,
        jobs=N,
        rounds=len(walls),
        jobs_per_s=round(rate),
        cpu_us_per_job=cpu,
        cpu_us_per_job_total=total,
        rtt_p50_us=round(p50),
        rtt_samples=len(rtts),
    )
    mine = {"jobs_per_s": rate, "cpu_us_per_job": total, "rtt_p50_us": p50}
    if row.name in REFERENCES:
        _figures[(processes, row.name)] = mine
    _ratios(processes, mine, benchmark)
