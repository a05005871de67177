"""Bursts of ``submit()`` against ``map`` through a real broker (issue: lossless client
flow control), in pytest-benchmark: ``pytest bench/test_burst.py --benchmark-only``.

A broker process (``python -m fastbroker broker --core compiled``) and a fast worker
process (bench.e2e's raw FBW01 echo loop, credit 65536: it answers as fast as a pool
of many processes would) serve, over ipc and then tcp on 127.0.0.1, three ways of
sending N jobs of 16 bytes from this process:

* ``map``: ``list(Client.map(payloads))``, the reference of the same transport;
* ``submit``: ``[client.submit(p) for p in payloads]``, then every result;
* ``async``: ``asyncio.gather`` of N ``AsyncClient.submit`` calls;
* ``unbounded``: ``submit`` with the window opened to its maximum (``window=MAX_WINDOW``)
  and FBC01 (``protocol=1``), which is what the client did before flow control and
  FBC02: every SUBMIT at once, one reply per message. One round only; it shows what the
  two prevent (replies dropped at the broker's high-water mark, counted now, and fetched
  again by the lazy pirate, 1000 per ``check_interval``). With FBC02 alone the replies
  go many to a message and stay below the mark even without the window.

Each round checks every answer and, but for ``unbounded``, that the broker dropped no
reply to the client (``replies_dropped``, ``replies_unroutable`` from STATS before and
after). extra_info
has jobs/s, the ratio to the ``map`` rate of the same transport measured in the same
run (the issue's target: a burst at >= 0.8x map), and the client's flow-control
figures (``refetched``: outcomes the lazy pirate had to fetch again).

Sizes: FASTBROKER_BURST_N [30000] jobs per round, FASTBROKER_BENCH_ROUNDS [5] rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Callable, Dict, Iterator, List

import pytest
import zmq

from fastbroker import AsyncClient, Client
from fastbroker.client.protocol import DEFAULT_WINDOW, MAX_WINDOW
from fastbroker.server.metrics import request_stats

from bench import e2e
from bench.conftest import SIZES, WAIT_LIMIT, _env_int

BURST_N = _env_int("FASTBROKER_BURST_N", 30_000)
PAYLOADS = [b"%016d" % i for i in range(BURST_N)]
EXPECTED = list(PAYLOADS)  # the echo worker answers each payload unchanged
MODES = ("map", "submit", "async", "unbounded")


def _free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def broker_stats(address: str) -> Dict[str, int]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        figures = request_stats(sock, WAIT_LIMIT)
        if figures is None:
            raise RuntimeError(f"no STATS reply from {address}")
        return figures
    finally:
        sock.close()


class Served:
    """A broker process and a fast worker process on one transport."""

    def __init__(self, run: e2e.Run, transport: str) -> None:
        if transport == "ipc":
            req, work, ans = (f"ipc://{run.dir}/{name}" for name in ("req", "wrk", "ans"))
        else:
            req, work, ans = (_free_tcp_endpoint() for _ in range(3))
        deadline = time.monotonic() + WAIT_LIMIT
        self.broker = run.start(["-m", "fastbroker", "-v", "broker", "--core", "compiled", req, work, ans], "broker")
        run.wait_for_broker(self.broker, "burst", "compiled", deadline)
        worker = run.start(["-m", "bench.e2e", "_worker", "fbw", work, str(os.getpid()), "python"], "worker")
        if e2e.Lines(worker, "worker").read(deadline) != "connected":
            raise RuntimeError("the worker did not connect")
        self.address = req
        self.rates: Dict[str, float] = {}


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def served(request) -> Iterator[Served]:
    args = argparse.Namespace(transport=request.param)
    with e2e.temporary_run(args, prefix="fb-burst-") as run:
        yield Served(run, request.param)


def _map(client: Client) -> List[bytes]:
    return list(client.map(PAYLOADS))


def _submit(client: Client) -> List[bytes]:
    futures = [client.submit(p) for p in PAYLOADS]
    return [f.result(WAIT_LIMIT) for f in futures]


def _gather(address: str) -> List[bytes]:
    async def main() -> List[bytes]:
        async with AsyncClient(address) as client:
            return list(await asyncio.gather(*(client.submit(p) for p in PAYLOADS)))

    return asyncio.run(asyncio.wait_for(main(), WAIT_LIMIT))


@pytest.mark.parametrize("mode", MODES)
def test_burst(benchmark, served: Served, mode: str) -> None:
    benchmark.group = f"burst-{served.address.split(':')[0]}"
    if mode == "unbounded":  # the client of before: FBC01, every SUBMIT at once
        client = Client(served.address, window=MAX_WINDOW, protocol=1)
    else:
        client = Client(served.address, window=DEFAULT_WINDOW)
    try:
        # One unmeasured job: the connection is up before the clock starts.
        assert client.call(b"warm", wait=WAIT_LIMIT) == b"warm"
        runs: Dict[str, Callable[[], List[bytes]]] = {
            "map": lambda: _map(client),
            "submit": lambda: _submit(client),
            "async": lambda: _gather(served.address),
            "unbounded": lambda: _submit(client),
        }
        before = broker_stats(served.address)
        walls: List[float] = []

        def one_round() -> None:
            start = time.perf_counter()
            answers = runs[mode]()
            walls.append(time.perf_counter() - start)
            assert answers == EXPECTED, "wrong or missing answers"

        rounds = 1 if mode == "unbounded" else SIZES.socket_rounds
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
        after = broker_stats(served.address)
        lost = {k: after[k] - before[k] for k in ("replies_dropped", "replies_unroutable")}
        if mode != "unbounded":
            assert lost == {"replies_dropped": 0, "replies_unroutable": 0}, lost
        rate = BURST_N / sorted(walls)[len(walls) // 2]
        served.rates[mode] = rate
        benchmark.extra_info.update(
            jobs=BURST_N,
            jobs_per_s=round(rate),
            ratio_to_map=round(rate / served.rates["map"], 3) if "map" in served.rates else None,
            client=client.stats() if mode != "async" else None,
            **lost,
        )
    finally:
        client.close()
