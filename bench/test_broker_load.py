"""The broker alone, in pytest-benchmark: a broker process between the compiled load
generators (``bench/_loadgen.pyx``, built by ``make bench``: C loops without the GIL, so
the broker is what is measured), beside ``zmq.proxy`` in the same run, one job per
message (libzmq forwarding only: a floor for any broker in front of libzmq).

    pytest bench/test_broker_load.py --benchmark-only --benchmark-group-by=group

One client process and one worker process (a 2-core machine), ipc, 16-byte payloads,
FASTBROKER_LOAD_N [400000] jobs per round (FASTBROKER_BENCH_ROUNDS [5] rounds, each a
fresh set of processes started and warmed up outside the timing, ``bench.e2e``'s
``Run.prepare``). Rows:

* ``compiled-fbc2``: FBC02 clients (SUBMIT batches, window 4096) and FBW02 workers;
  issue 14's targets: >= 500,000 jobs/s and <= 1 us of broker CPU per job;
* ``compiled-fbc``: FBC01 clients (window 256) and FBW01 workers, one job per message;
* ``compiled-req``: the original REQ envelope (window 256) and FBW01 workers;
* ``compiled-orig``: the original protocol of 2010 end to end: the REQ envelope (window
  256) and REQ workers that answer on PUSH, one job at a time per socket (64 sockets in
  the worker process: ``bench.e2e.ORIGINAL_SOCKETS``);
* ``proxy``: ``zmq.proxy`` (window 256: its frontend drops replies at its SNDHWM).

extra_info: jobs/s (median over the rounds), broker CPU us per job (from /proc, 10 ms
ticks: keep N large), p50 round trip, and the ratio of jobs/s and of broker CPU per
job to the proxy's of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Dict, List

import pytest

from bench import e2e
from bench.conftest import SIZES, _env_int

LOAD_N = _env_int("FASTBROKER_LOAD_N", 400_000)
ROWS = {
    # name: (broker, client protocol, window)
    "proxy": ("proxy", "req", 256),
    "compiled-fbc2": ("compiled", "fbc2", 4096),
    "compiled-fbc": ("compiled", "fbc", 256),
    "compiled-req": ("compiled", "req", 256),
    "compiled-orig": ("compiled", "orig", 256),
}
_proxy: Dict[str, float] = {}


def _args(protocol: str, window: int) -> argparse.Namespace:
    return argparse.Namespace(
        jobs=LOAD_N,
        window=window,
        payload=16,
        transport="ipc",
        clients=1,
        workers=1,
        warmup=min(2000, LOAD_N),
        loadgen="compiled",
        protocol=protocol,
        max_seconds=120.0,
        cpus=(None, None),
    )


@pytest.mark.parametrize("row", list(ROWS))
def test_broker_with_compiled_load(benchmark, row: str) -> None:
    assert e2e._loadgen is not None, f"{e2e.LOADGEN_ERROR}: make bench builds it (make loadgen)"
    broker, protocol, window = ROWS[row]
    benchmark.group = "broker-load"
    runs: List[Dict[str, object]] = []
    stack = contextlib.ExitStack()

    def setup() -> tuple:
        # Processes started and warmed up outside the timing (a round times its jobs);
        # the previous round's are stopped first.
        stack.close()
        run = stack.enter_context(e2e.temporary_run(_args(protocol, window), prefix="fb-load-"))
        return (run.prepare(broker),), {}

    with stack:
        benchmark.pedantic(lambda go: runs.append(go()), setup=setup, rounds=SIZES.socket_rounds, warmup_rounds=0)
    rate = statistics.median(float(r["rate"]) for r in runs)  # type: ignore[arg-type]
    cpu = statistics.median(r["cpu"]["broker"] / r["jobs"] * 1e6 for r in runs)  # type: ignore[index,operator]
    p50 = statistics.median(float(r["p50_us"]) for r in runs)  # type: ignore[arg-type]
    benchmark.extra_info.update(
        jobs=LOAD_N, window=window, jobs_per_s=round(rate), broker_cpu_us_per_job=round(cpu, 2), p50_us=round(p50)
    )
    if row == "proxy":
        _proxy.update(rate=rate, cpu=cpu)
    elif _proxy:
        benchmark.extra_info["ratio_to_proxy"] = round(rate / _proxy["rate"], 3)
        if _proxy["cpu"] > 0:
            benchmark.extra_info["cpu_ratio_to_proxy"] = round(cpu / _proxy["cpu"], 3)
