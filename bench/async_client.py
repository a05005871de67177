"""``AsyncClient`` against ``Client`` in one run: the CPU each costs its process per job,
same broker and worker, rounds alternating.

    .venv/bin/python -m bench.async_client [--jobs 50000] [--rounds 4]

A broker process (compiled core) and a worker process (``bench.test_user_path:Echo``,
``--credit 64 --prefetch 64``, compiled session) over ipc in a temporary directory; this
process, each round, sends --jobs payloads of 16 bytes three ways and checks every
answer:

* ``sync map``: ``list(Client.map(payloads))``, the reference;
* ``async map``: ``[a async for a in AsyncClient.map(payloads)]``;
* ``async gather``: ``asyncio.gather(*AsyncClient.submit_many(payloads))``.

Prints, per way, the median, min and max of jobs/s and of this process's CPU per job
(every thread) over the rounds, and the ratio of each median CPU to the reference's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fastbroker import AsyncClient, Client

from bench.client_wire import START_WAIT, cpu_seconds, served

WAYS = ("sync map", "async map", "async gather")


def measure(jobs: int, rounds: int) -> Dict[str, List[Tuple[float, float]]]:
    """(jobs/s, CPU µs/job) per round, for each of WAYS."""
    results: Dict[str, List[Tuple[float, float]]] = {way: [] for way in WAYS}
    payloads = [b"%016d" % i for i in range(jobs)]
    with served("fb-async-") as requests:
        loop = asyncio.new_event_loop()
        try:
            with Client(requests) as client:
                aclient = AsyncClient(requests)
                try:
                    # Bounded: a broker or worker that failed to start raises TimeoutError here.
                    if client.submit(b"warm-up").result(timeout=START_WAIT) != b"warm-up":
                        raise RuntimeError("the warm-up's answer is wrong")

                    async def async_map() -> list:
                        return [answer async for answer in aclient.map(payloads)]

                    async def async_gather() -> list:
                        return list(await asyncio.gather(*aclient.submit_many(payloads)))

                    ways: Dict[str, Callable[[], list]] = {
                        "sync map": lambda: list(client.map(payloads)),
                        "async map": lambda: loop.run_until_complete(async_map()),
                        "async gather": lambda: loop.run_until_complete(async_gather()),
                    }
                    for way in WAYS:  # warm-up, each way once on a part
                        if ways[way]()[:10] != payloads[:10]:
                            raise RuntimeError(f"the warm-up's answers are wrong ({way})")
                    for _ in range(rounds):
                        for way in WAYS:
                            start, cpu = time.perf_counter(), cpu_seconds()
                            got = ways[way]()
                            elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
                            if got != payloads:
                                raise RuntimeError(f"wrong answers ({way})")
                            results[way].append((jobs / elapsed, used / jobs * 1e6))
                finally:
                    loop.run_until_complete(aclient.close())
        finally:
            loop.close()
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.async_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs per way and round (default: 50000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the ways alternating (default: 4)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1:
        parser.error("--jobs and --rounds are at least 1")
    results = measure(args.jobs, args.rounds)
    reference = statistics.median(c for _, c in results[WAYS[0]])
    for way, rows in results.items():
        rates, cpus = [r for r, _ in rows], [c for _, c in rows]
        cpu = statistics.median(cpus)
        print(
            f"{way:12s}: {statistics.median(rates):,.0f} jobs/s ({min(rates):,.0f}-{max(rates):,.0f}), "
            f"client CPU {cpu:.2f} us/job ({min(cpus):.2f}-{max(cpus):.2f}), {cpu / reference:.2f}x the sync map's"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
