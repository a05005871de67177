"""The many-core setup, as docs/OPERATIONS.md "Many-core setup" describes it: one broker process,
one ``fastbroker worker MODULE:CLASS WORKERS_ADDR --processes 2`` of DEALER
``fastbroker.Worker``s (FBW01), and an FBC01 ``fastbroker.Client`` with many requests
in flight.

test_cli.py already runs a pool of two *ReqWorker* processes (REQ/PUSH) fed by REQ
clients one request each, and checks that both children ran a job and that SIGTERM
stops them (plus restarts and back-off of a dying child); test_worker_processes.py
runs *separate* worker processes (one per ``fastbroker worker``), never a pool. Here:
the pool of DEALER workers as the broker sees it (its figures via STATS, as
``fastbroker stats`` reads them: 2 workers registered, 2 left by DISCONNECT, none
dead), 200 pipelined FBC01 jobs answered by both children (the answers carry the
worker's pid), two jobs provably running at once in the two processes, and a clean
stop on SIGTERM.

Concurrency is shown without any timing threshold: each of two "meet" jobs records
its start, then blocks (bounded by MEET_LIMIT) until both have started, and returns
its start and end times (CLOCK_MONOTONIC, comparable between processes). Run at the
same time, they overlap; run one after the other, the first one's end comes before
the second one's start and the test fails.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, List, Tuple

import zmq

from fastbroker import Client
from fastbroker.client.sync import connect_dealer
from fastbroker.server.metrics import request_stats
from fastbroker.worker.pool import cpus_for
from rigs import descendants, pid_alive, wait_until

from workers_for_tests import MEET_LIMIT

WAIT = 10.0
"""Bound of every wait for something that should take well under a second."""
JOBS = 200
PROCESSES = 2


def parse_answer(answer: bytes, payload: bytes) -> Tuple[int, float, float]:
    """(pid, start, end) of an answer; asserts it answers `payload`."""
    pid, start, end, rest = answer.split(b" ", 3)
    assert rest == payload, (answer, payload)
    return int(pid), float(start), float(end)


def broker_figures(socket: zmq.Socket) -> Dict[str, int]:
    figures = request_stats(socket, WAIT)
    assert figures is not None, "the broker did not answer STATS"
    return figures


def broker_and_pool(procs, ctx, tmp_path, core_name, *pool_options: str):
    """A broker process on ipc, a STATS socket to it, and a pool of PROCESSES PidWorkers
    (with `pool_options`) that the broker counts: (addrs, stats socket, broker, pool)."""
    addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
    broker = procs.start(["-v", "broker", "--core", core_name, *addrs], "broker")
    wait_until(
        lambda: "broker on requests=" in broker.stderr_path.read_text(errors="replace") or broker.poll() is not None,
        timeout=WAIT,
        message="the broker's 'broker on' log line",
    )
    assert broker.poll() is None and f"core={core_name})" in broker.stderr_path.read_text(), procs.output()
    stats = connect_dealer(ctx, addrs[0])
    stats.setsockopt(zmq.LINGER, 0)
    args = ["worker", "workers_for_tests:PidWorker", addrs[1], "--processes", str(PROCESSES), *pool_options]
    pool = procs.start(args, "pool")
    wait_until(
        lambda: broker_figures(stats)["workers"] == PROCESSES,
        timeout=WAIT,
        message=f"the broker to count {PROCESSES} workers\n{procs.output()}",
    )
    return addrs, stats, broker, pool


def test_one_broker_and_a_pool_of_two_dealer_worker_processes(procs, ctx, tmp_path, core_name):
    addrs, stats, broker, pool = broker_and_pool(procs, ctx, tmp_path, core_name)
    children = set(descendants(pool.pid))
    assert len(children) == PROCESSES, children

    with Client(addrs[0], ctx) as client:
        # Many jobs in flight at once; each answer names the process that ran it.
        payloads = [b"job-%d" % n for n in range(JOBS)]
        ran: List[int] = []
        for payload, answer in zip(payloads, client.map(payloads, window=64, timeout=WAIT)):
            ran.append(parse_answer(answer, payload)[0])
        assert len(ran) == JOBS
        assert set(ran) == children, f"jobs ran on {set(ran)}; the pool's children are {children}"

        # Two jobs that can only end quickly if they run at the same time.
        meet = tmp_path / "meet"
        meet.mkdir()
        pair = [f"meet:{meet}:{tag}".encode() for tag in "ab"]
        futures = [client.submit(p, timeout=MEET_LIMIT + WAIT) for p in pair]
        (pid_a, start_a, end_a), (pid_b, start_b, end_b) = (
            parse_answer(f.result(MEET_LIMIT + WAIT), p) for f, p in zip(futures, pair)
        )
    assert {pid_a, pid_b} == children, "one job in each process"
    assert max(start_a, start_b) < min(end_a, end_b), (
        f"the two jobs did not overlap: a {start_a:.3f}-{end_a:.3f}, b {start_b:.3f}-{end_b:.3f}"
    )

    figures = broker_figures(stats)
    assert figures["answered"] == JOBS + 2 and figures["requeued"] == 0 and figures["workers_dead"] == 0, figures

    # SIGTERM to the pool: it passes it on; each child hangs up (DISCONNECT) and exits.
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
    for pid in children:
        wait_until(lambda: not pid_alive(pid), timeout=WAIT, message=f"pool child {pid} to exit")
    figures = wait_until(
        lambda: (lambda f: f["workers"] == 0 and f)(broker_figures(stats)),
        timeout=WAIT,
        message=f"the broker to forget the workers\n{procs.output()}",
    )
    assert figures["workers_joined"] == figures["workers_left"] == PROCESSES, figures
    assert figures["workers_dead"] == 0 and figures["idle_workers"] == 0, figures
    assert broker.poll() is None
    assert "Traceback" not in procs.output(), procs.output()
    stats.close(0)


def test_cpu_affinity_pins_each_pool_process_to_one_cpu(procs, ctx, tmp_path, core_name):
    # The children's CPUs as the kernel holds them (sched_getaffinity of each pid): one
    # each, those of cpus_for() (the CPUs this test may use, in order, round again).
    *_, pool = broker_and_pool(procs, ctx, tmp_path, core_name, "--cpu-affinity")
    children = descendants(pool.pid)
    assert len(children) == PROCESSES, children
    pinned = sorted(sorted(os.sched_getaffinity(pid)) for pid in children)
    assert pinned == sorted([cpu] for cpu in cpus_for(PROCESSES)), pinned
    assert len(os.sched_getaffinity(pool.pid)) == len(os.sched_getaffinity(0)), "the parent is not pinned"
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
