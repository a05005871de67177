"""The client's wire, compiled against pure, in one run: the CPU a ``Client.map`` costs
its process per job with each, same client, broker and worker, rounds alternating.

    .venv/bin/python -m bench.client_wire [--jobs 50000] [--rounds 4]

A broker process (compiled core) and a worker process (``bench.test_user_path:Echo``,
``--credit 64 --prefetch 64``, compiled session) over ipc in a temporary directory; this
process runs one ``Client`` and, each round, ``map`` of --jobs payloads of 16 bytes with
the compiled wire (fastbroker.client._wire) then with the pure one (client/wire.py),
swapped in the client's module between maps. Prints, per wire, the median, min and max
of jobs/s and of this process's CPU per job (every thread: the map's and the I/O
thread's) over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import fastbroker.client.sync as sync
from fastbroker import Client
from fastbroker.client import _wire, wire  # type: ignore[attr-defined]

START_WAIT = 30.0
"""Seconds the broker and worker may take to be ready (the first map's warm-up)."""


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def served(prefix: str) -> Iterator[str]:
    """A broker process (compiled core) and an Echo worker process (``--credit 64
    --prefetch 64``, compiled session) over ipc in a temporary directory, stopped on the
    way out; yields the requests endpoint."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        requests, workers, answers = (f"ipc://{tmp}/{name}" for name in ("req", "wrk", "ans"))
        python = [sys.executable, "-m", "fastbroker"]
        procs = [
            subprocess.Popen([*python, "broker", "--core", "compiled", requests, workers, answers]),
            subprocess.Popen(
                [*python, "worker", "bench.test_user_path:Echo", workers, "--credit", "64", "--prefetch", "64"],
                cwd=repo,
            ),
        ]
        try:
            yield requests
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(START_WAIT)


def measure(jobs: int, rounds: int) -> Dict[str, List[Tuple[float, float]]]:
    """(jobs/s, CPU µs/job) per round, for "compiled" and "pure"."""
    results: Dict[str, List[Tuple[float, float]]] = {"compiled": [], "pure": []}
    payloads = [b"%016d" % i for i in range(jobs)]
    with served("fb-wire-") as requests:
        saved = sync._wire
        try:
            with Client(requests) as client:
                # Bounded: a broker or worker that failed to start raises TimeoutError here.
                if client.submit(b"warm-up").result(timeout=START_WAIT) != b"warm-up":
                    raise RuntimeError("the warm-up's answer is wrong")
                if list(client.map(payloads[:5000])) != payloads[:5000]:
                    raise RuntimeError("the warm-up's answers are wrong")
                for _ in range(rounds):
                    for name, module in (("compiled", _wire), ("pure", wire)):
                        sync._wire = module
                        start, cpu = time.perf_counter(), cpu_seconds()
                        answers_got = list(client.map(payloads))
                        elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
                        if answers_got != payloads:
                            raise RuntimeError(f"wrong answers with the {name} wire")
                        results[name].append((jobs / elapsed, used / jobs * 1e6))
        finally:
            sync._wire = saved
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs per map (default: 50000)")
    parser.add_argument("--rounds", type=int, default=4, help="maps per wire, alternating (default: 4)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1:
        parser.error("--jobs and --rounds are at least 1")
    for name, rows in measure(args.jobs, args.rounds).items():
        rates, cpus = [r for r, _ in rows], [c for _, c in rows]
        print(
            f"{name:8s} wire: {statistics.median(rates):,.0f} jobs/s ({min(rates):,.0f}-{max(rates):,.0f}), "
            f"client CPU {statistics.median(cpus):.2f} us/job ({min(cpus):.2f}-{max(cpus):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
