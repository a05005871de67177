"""Where a ``Client``'s CPU goes, thread by thread: the caller's thread and the client's
I/O thread, each from its own CPU clock, for ``map`` and for bursts of ``submit()``.

    .venv/bin/python -m bench.client_threads [--jobs 30000] [--rounds 3] [--no-gc]

The broker and worker of bench.client_wire (a compiled broker, an ``Echo`` worker
``--credit 64 --prefetch 64``, ipc). Each round, in turn: ``list(map(payloads))``;
``[submit(p) for p in payloads]`` then every result; ``submit_many(payloads)`` then every
result; every answer checked. Prints, per way, the median over the rounds of jobs/s, of
each thread's CPU µs per job and of the garbage collector's passes (how many, and their
CPU µs per job, whichever thread ran them: part of the two threads' figures). ``--no-gc``
runs with the garbage collector off, to show its share (``gc.disable()`` for the
measured part only).

Last, a figure that does not depend on the machine's noise: the objects the collector
tracks per ``submit()`` still pending (its future, its entry in the book, ...), counted
with ``gc.get_objects()`` over PENDING submits to an address nobody serves. Every pass
of the collector walks them, so in a burst they set its cost.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fastbroker import Client

from bench.client_wire import START_WAIT, served

WAYS = ("map", "submit", "submit_many")
PENDING = 2000
"""Submits counted for the objects per pending request."""


class Collections:
    """The collector's passes while installed, from gc.callbacks: how many, and their
    CPU seconds, each from the clock of the thread that ran it."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started: Dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started[threading.get_ident()] = time.thread_time()
        else:
            started = self._started.pop(threading.get_ident(), None)
            if started is not None:
                self.count += 1
                self.seconds += time.thread_time() - started

    def __enter__(self) -> Collections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def tracked_per_pending(count: int) -> float:
    """Objects the garbage collector tracks per submit() the client still holds: `count`
    submits to an address nobody serves, counted once the I/O thread has booked them all."""
    with tempfile.TemporaryDirectory(prefix="fb-pending-") as where:
        with Client(f"ipc://{os.path.join(where, 'nobody')}") as client:
            futures: List = []
            gc.collect()
            before = len(gc.get_objects())
            futures.extend(client.submit(b"x") for _ in range(count))
            deadline = time.monotonic() + START_WAIT
            while client._book.pending < count:  # booked by the I/O thread
                if time.monotonic() > deadline:
                    raise RuntimeError("the client's I/O thread did not take the submits")
                time.sleep(0.005)
            gc.collect()
            tracked = len(gc.get_objects()) - before
            for future in futures:
                future.cancel()
    return tracked / count


def thread_cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


Row = Tuple[float, float, float, int, float]


def measure(jobs: int, rounds: int, collector: bool) -> Dict[str, List[Row]]:
    """(jobs/s, caller's CPU µs/job, I/O thread's CPU µs/job, collector passes, their
    CPU µs/job) per round, for each way."""
    results: Dict[str, List[Row]] = {way: [] for way in WAYS}
    payloads = [b"%016d" % i for i in range(jobs)]
    with served("fb-threads-") as requests:
        with Client(requests) as client:
            # Bounded: a broker or worker that failed to start raises TimeoutError here.
            if client.submit(b"warm-up").result(timeout=START_WAIT) != b"warm-up":
                raise RuntimeError("the warm-up's answer is wrong")
            io_thread: threading.Thread = client._thread
            ways: Dict[str, Callable[[], list]] = {
                "map": lambda: list(client.map(payloads)),
                "submit": lambda: [f.result(START_WAIT) for f in [client.submit(p) for p in payloads]],
                "submit_many": lambda: [f.result(START_WAIT) for f in client.submit_many(payloads)],
            }
            for _ in range(rounds):
                for way in WAYS:
                    if not collector:
                        gc.disable()
                    try:
                        with Collections() as passes:
                            start, mine, its = time.perf_counter(), time.thread_time(), thread_cpu(io_thread)
                            got = ways[way]()
                            elapsed = time.perf_counter() - start
                            mine, its = time.thread_time() - mine, thread_cpu(io_thread) - its
                    finally:
                        gc.enable()
                    if got != payloads:
                        raise RuntimeError(f"wrong answers ({way})")
                    del got
                    gc.collect()  # each way starts from the same heap
                    results[way].append(
                        (jobs / elapsed, mine / jobs * 1e6, its / jobs * 1e6, passes.count, passes.seconds / jobs * 1e6)
                    )
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30_000, help="jobs per way and round (default: 30000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the ways in turn (default: 3)")
    parser.add_argument("--no-gc", action="store_true", help="the garbage collector off while measuring")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1:
        parser.error("--jobs and --rounds are at least 1")
    results = measure(args.jobs, args.rounds, not args.no_gc)
    print(f"garbage collector {'off' if args.no_gc else 'on'}; {args.jobs} jobs, median of {args.rounds}")
    for way, rows in results.items():
        rate, mine, its, passes, collecting = (statistics.median(row[i] for row in rows) for i in range(5))
        print(
            f"{way:12s}: {rate:,.0f} jobs/s, caller's thread {mine:.2f} us/job, I/O thread {its:.2f} us/job,"
            f" collector {passes:.0f} passes {collecting:.2f} us/job"
        )
    print(f"objects tracked per pending submit(): {tracked_per_pending(PENDING):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
