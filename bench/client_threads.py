"""Where a ``Client``'s CPU goes, thread by thread: the caller's thread and the client's
I/O thread, each from its own CPU clock, for ``map`` and for bursts of ``submit()``.

    .venv/bin/python -m bench.client_threads [--jobs 30000] [--rounds 3] [--no-gc]

The broker and worker of bench.client_wire (a compiled broker, an ``Echo`` worker
``--credit 64 --prefetch 64``, ipc). Each round, in turn: ``list(map(payloads))``;
``[submit(p) for p in payloads]`` then every result; ``submit_many(payloads)`` then every
result; every answer checked. Prints, per way, the median over the rounds of jobs/s and of
each thread's CPU µs per job. ``--no-gc`` runs with the garbage collector off, to show
its share (``gc.disable()`` for the measured part only).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fastbroker import Client

from bench.client_wire import START_WAIT, served

WAYS = ("map", "submit", "submit_many")


def thread_cpu(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(jobs: int, rounds: int, collector: bool) -> Dict[str, List[Tuple[float, float, float]]]:
    """(jobs/s, caller's CPU µs/job, I/O thread's CPU µs/job) per round, for each way."""
    results: Dict[str, List[Tuple[float, float, float]]] = {way: [] for way in WAYS}
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
                    results[way].append((jobs / elapsed, mine / jobs * 1e6, its / jobs * 1e6))
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
        rate = statistics.median(r for r, _, _ in rows)
        mine = statistics.median(m for _, m, _ in rows)
        its = statistics.median(i for _, _, i in rows)
        print(f"{way:12s}: {rate:,.0f} jobs/s, caller's thread {mine:.2f} us/job, I/O thread {its:.2f} us/job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
