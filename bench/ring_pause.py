"""The pause a growing queue puts in the broker's loop, compiled core.

    .venv/bin/python -m bench.ring_pause [--jobs 1200000] [--window-from 1000000]

A DEALER sends REQ-envelope requests in chunks of RECV_BATCH over inproc, and after
each chunk the core runs turns (``BrokerCore.run(-1, 0)``) until it has queued them
all. Each turn's CPU time is its thread's (``time.thread_time``: a turn preempted by
another process is not counted). It prints median / p99 / p99.9 / max of the turns in
the window from ``--window-from`` queued jobs to the end, and of all turns. A FIFO in
one buffer doubles at 2**20 = 1,048,576 queued (8 MiB copied in one turn); the block
list of core/ring.pxi does not, so its p99.9 stays near its median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Sequence

import zmq

from fastbroker import _core
from fastbroker.protocol import RECV_BATCH


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def measure(jobs: int, window_from: int) -> tuple:
    """The CPU time of every turn, and of the turns once window_from jobs were queued."""
    ctx = zmq.Context()
    try:
        sockets = []
        for kind in (zmq.ROUTER, zmq.ROUTER, zmq.PULL, zmq.DEALER):
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)  # unbounded: every request reaches the core
            s.setsockopt(zmq.RCVHWM, 0)
            sockets.append(s)
        requests, workers, answers, client = sockets
        requests.bind("inproc://ring-pause-requests")
        workers.bind("inproc://ring-pause-workers")
        answers.bind("inproc://ring-pause-answers")
        client.connect("inproc://ring-pause-requests")
        core = _core.BrokerCore(requests, workers, answers, 3600.0, None)
        every: List[float] = []
        window: List[float] = []
        sent = 0
        message = [b"", b"payload"]  # what a REQ socket sends: delimiter, payload
        while sent < jobs:
            for _ in range(RECV_BATCH):
                client.send_multipart(message, zmq.DONTWAIT)
            sent += RECV_BATCH
            for _ in range(100 * RECV_BATCH):  # bounded: inproc delivers at once
                start = time.thread_time()
                core.run(-1, 0)
                turn = time.thread_time() - start
                queued = core.stats()["queued"]
                every.append(turn)
                if queued >= window_from:
                    window.append(turn)
                if queued >= sent:
                    break
        core.close()
        return every, window
    finally:
        ctx.destroy(linger=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_200_000, help="requests queued in all (default 1,200,000)")
    parser.add_argument("--window-from", type=int, default=1_000_000, help="start of the reported window")
    args = parser.parse_args(argv)
    every, window = measure(args.jobs, args.window_from)
    for name, turns in ((f"from {args.window_from:,} queued", window), ("all turns", every)):
        if not turns:
            print(f"{name}: no turns")
            continue
        print(
            f"{name}: {len(turns)} turns, median {statistics.median(turns) * 1e6:.0f} µs, "
            f"p99 {percentile(turns, 0.99) * 1e6:.0f} µs, p99.9 {percentile(turns, 0.999) * 1e6:.0f} µs, "
            f"max {max(turns) * 1e6:.0f} µs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
