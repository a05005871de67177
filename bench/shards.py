"""Shards (issue 17): 1 vs N brokers under the compiled load generators, and the cost of
a list of brokers to a Python client and to a Python worker.

    python -m bench.shards [--shards 1,2] [--jobs N] [--rounds R] [--window W]
                           [--client-jobs N] [--client-brokers 1,4]
                           [--worker-jobs N] [--worker-brokers 1,4] [--worker-credit C]
                           (from the repository root; needs `make loadgen`)

Part 1, the brokers. For each S of ``--shards`` (rounds interleaved): ``fastbroker broker
--shards S`` (compiled core, ipc endpoints in a temporary directory) and, for each shard,
one compiled FBW02 worker and one compiled FBC02 client (bench/_loadgen, as bench.e2e
runs them), each client sending ``--jobs``/S jobs with ``--window`` in flight. Reported:
the jobs/s of all clients together, and the CPU of every process (the shards, the
clients, the workers) per job. On a machine with fewer cores than processes the gain is
bounded by the cores: the CPU columns say where they went.

Part 3, the worker. One ``fastbroker worker bench.test_user_path:Echo --credit C``
process given the list of B brokers (``--worker-brokers``, default 1,4), each broker fed
by its own compiled FBC02 client at once (``--worker-jobs`` in all): the worker
process's CPU per job, its jobs/s, the brokers' CPU per job, the jobs it gave back
(RETURN, broker counter ``returned``), the jobs the brokers sent per job run
(``dispatched``, the warm-up's included) and the READYs they read per job run (broker
counter ``ready``: how often the worker changed a broker's share), against B = 1.

Part 2, the client. ``fastbroker.Client.map`` of ``--client-jobs`` empty jobs in this
process, against ``fastbroker broker --shards B`` for each B of ``--client-brokers``
(its list of B brokers), each shard with a compiled FBW02 worker: the CPU of this
process (the client: its I/O thread and the map) per job, and its jobs/s. A list must
not make a job dearer: the ratio B=4 / B=1 is printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from typing import ContextManager, Dict, List, Optional, Sequence

from fastbroker.addresses import shard_address
from fastbroker.server.metrics import request_stats

from bench.e2e import (
    LOADGEN_ERROR,
    START_WAIT,
    Lines,
    Run,
    _loadgen,
    child_dealer,
    cpu_seconds,
    go_and_collect,
    machine,
    temporary_run,
    wait_warm,
)
from bench.proctree import descendants


def start_shards(run: Run, shards: int) -> tuple:
    """`fastbroker broker --shards S` on ipc endpoints; (the supervisor, [requests, workers]
    endpoints of each shard, the shards' pids)."""
    req, work, ans = (run.endpoint(name) for name in ("requests", "workers", "answers"))
    sup = run.start(
        ["-m", "fastbroker", "-v", "broker", "--shards", str(shards), "--core", "compiled", req, work, ans], "shards"
    )
    deadline = time.monotonic() + START_WAIT
    while run.stderr_of(sup).count("broker on requests=") < shards:
        if sup.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the shards did not start:\n{run.stderr_of(sup)}")
        time.sleep(0.01)
    pids = descendants(sup.pid)
    return sup, [(shard_address(req, k), shard_address(work, k)) for k in range(shards)], [sup.pid, *pids]


def start_workers(run: Run, endpoints: Sequence[tuple], deadline: float) -> list:
    me = str(os.getpid())
    workers = [
        run.start(["-m", "bench.e2e", "_worker", "fbw2", work, me, "compiled"], f"worker{k}")
        for k, (_, work) in enumerate(endpoints)
    ]
    for k, w in enumerate(workers):
        if Lines(w, f"worker{k}").read(deadline) != "connected":
            raise RuntimeError("worker did not connect")
    return workers


def measure_brokers(args: argparse.Namespace, shards: int) -> Dict[str, object]:
    """One round of part 1 with S shards."""
    with contextlib_run(args) as run:
        sup, endpoints, broker_pids = start_shards(run, shards)
        deadline = time.monotonic() + START_WAIT
        workers = start_workers(run, endpoints, deadline)
        me = str(os.getpid())
        share = [args.jobs // shards + (1 if k < args.jobs % shards else 0) for k in range(shards)]
        clients = [
            run.start(
                [
                    "-m",
                    "bench.e2e",
                    "_client",
                    req,
                    str(n),
                    str(args.window),
                    "16",
                    str(args.warmup),
                    me,
                    "compiled",
                    "fbc2",
                ],
                f"client{k}",
                stdin=True,
            )
            for k, ((req, _), n) in enumerate(zip(endpoints, share))
        ]
        readers = [Lines(c, f"client{k}") for k, c in enumerate(clients)]
        wait_warm(readers)
        pids = {"broker": broker_pids, "client": [c.pid for c in clients], "worker": [w.pid for w in workers]}
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        wall0 = time.monotonic()
        results = go_and_collect(clients, readers, 300.0)
        wall = time.monotonic() - wall0
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        if sup.poll() is not None:
            raise RuntimeError(f"the shards died:\n{run.stderr_of(sup)}")
        jobs = sum(r["n"] for r in results)
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        return {
            "shards": shards,
            "rate": jobs / elapsed,
            "cpu_job": {k: (cpu1[k] - cpu0[k]) / jobs for k in cpu0},
            "cpu_pct": {k: (cpu1[k] - cpu0[k]) / wall * 100 for k in cpu0},
        }


def measure_client(args: argparse.Namespace, brokers: int) -> Dict[str, float]:
    """One round of part 2: Client.map over a list of `brokers` brokers."""
    from fastbroker import Client

    with contextlib_run(args) as run:
        _, endpoints, _ = start_shards(run, brokers)
        start_workers(run, endpoints, time.monotonic() + START_WAIT)
        with Client([req for req, _ in endpoints]) as client:
            for _ in client.map(b"w" * 16 for _ in range(min(2000, args.client_jobs))):
                pass  # warm-up
            cpu0, wall0 = time.process_time(), time.monotonic()
            n = 0
            for _ in client.map(b"x" * 16 for _ in range(args.client_jobs)):
                n += 1
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            assert n == args.client_jobs
        return {"brokers": brokers, "rate": n / wall, "cpu_us": cpu / n * 1e6}


def measure_worker(args: argparse.Namespace, brokers: int) -> Dict[str, float]:
    """One round of part 3: one Python Worker process serving a list of `brokers`."""
    with contextlib_run(args) as run:
        _, endpoints, broker_pids = start_shards(run, brokers)
        worker = run.start(
            ["-m", "fastbroker", "-v", "worker", "bench.test_user_path:Echo", ",".join(w for _, w in endpoints)]
            + ["--credit", str(args.worker_credit)],
            "worker",
        )
        deadline = time.monotonic() + START_WAIT
        while run.stderr_of(worker).count("connected to") < brokers:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not connect:\n{run.stderr_of(worker)}")
            time.sleep(0.01)
        me = str(os.getpid())
        share = [args.worker_jobs // brokers + (1 if k < args.worker_jobs % brokers else 0) for k in range(brokers)]
        clients = [
            run.start(
                ["-m", "bench.e2e", "_client", req, str(n), "256", "16", "500", me, "compiled", "fbc2"],
                f"client{k}",
                stdin=True,
            )
            for k, ((req, _), n) in enumerate(zip(endpoints, share))
        ]
        readers = [Lines(c, f"client{k}") for k, c in enumerate(clients)]
        wait_warm(readers)
        cpu0 = cpu_seconds(worker.pid)
        brokers_cpu0 = sum(cpu_seconds(p) for p in broker_pids)
        results = go_and_collect(clients, readers, 300.0)
        cpu = cpu_seconds(worker.pid) - cpu0
        brokers_cpu = sum(cpu_seconds(p) for p in broker_pids) - brokers_cpu0
        jobs = sum(r["n"] for r in results)
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        returned = dispatched = ready = 0
        for req, _ in endpoints:
            sock = child_dealer(req)
            try:
                figures = request_stats(sock, START_WAIT)
            finally:
                sock.close(0)
            returned += figures["returned"] if figures else 0
            dispatched += figures["dispatched"] if figures else 0
            ready += figures["ready"] if figures else 0
        return {
            "brokers": brokers,
            "rate": jobs / elapsed,
            "cpu_us": cpu / jobs * 1e6,
            "brokers_us": brokers_cpu / jobs * 1e6,
            "returned": returned / jobs,
            # Of every round's jobs and warm-up; the same for B = 1 and B > 1.
            "dispatched": dispatched / jobs,
            "ready": ready / jobs,
        }


def contextlib_run(args: argparse.Namespace) -> ContextManager[Run]:
    """A bench.e2e Run (its children killed at the end) in a temporary directory."""
    args.transport, args.cpus = "ipc", (None, None)
    return temporary_run(args, prefix="fb-shards-")


def report_brokers(results: List[Dict[str, object]], args: argparse.Namespace) -> None:
    print(
        f"part 1: fastbroker broker --shards S, one compiled FBC02 client and FBW02 worker per shard; median of {args.rounds}"
    )
    print(
        "| shards | jobs/s | × 1 shard | shards CPU µs/job | clients CPU µs/job | workers CPU µs/job | shards CPU % | clients CPU % | workers CPU % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    med = statistics.median
    base = None
    for s in args.shards:
        rs = [r for r in results if r["shards"] == s]
        rate = med(r["rate"] for r in rs)
        base = base or rate
        cj = {k: med(r["cpu_job"][k] for r in rs) * 1e6 for k in ("broker", "client", "worker")}
        cp = {k: med(r["cpu_pct"][k] for r in rs) for k in ("broker", "client", "worker")}
        print(
            f"| {s} | {rate:,.0f} | {rate / base:.2f} | {cj['broker']:.1f} | {cj['client']:.1f} | {cj['worker']:.1f} "
            f"| {cp['broker']:.0f} | {cp['client']:.0f} | {cp['worker']:.0f} |"
        )


def _ratio_table(results: List[Dict[str, float]], lengths: Sequence[int], columns: List[tuple]) -> None:
    """Print a table of medians per list length, the CPU column also as a ratio to the
    first length; `columns`: (header, key, format), the CPU one keyed "cpu_us"."""
    print("| brokers in the list | " + " | ".join(h for h, _, _ in columns) + " | × 1 broker |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    base = None
    for b in lengths:
        rs = [r for r in results if r["brokers"] == b]
        cells = [fmt.format(statistics.median(r[key] for r in rs)) for _, key, fmt in columns]
        cpu = statistics.median(r["cpu_us"] for r in rs)
        base = base or cpu
        print(f"| {b} | " + " | ".join(cells) + f" | {cpu / base:.2f} |")


def report_worker(results: List[Dict[str, float]], args: argparse.Namespace) -> None:
    print(
        f"part 3: one fastbroker worker (credit {args.worker_credit}) serving a list of B brokers, each fed by a compiled client; "
        f"{args.worker_jobs} jobs; median of {args.rounds}"
    )
    columns = [("jobs/s", "rate", "{:,.0f}"), ("worker CPU µs/job", "cpu_us", "{:.1f}")]
    columns += [("brokers' CPU µs/job", "brokers_us", "{:.1f}"), ("given back per job run", "returned", "{:.2f}")]
    columns += [("sent per job run", "dispatched", "{:.2f}"), ("READY per job run", "ready", "{:.3f}")]
    _ratio_table(results, args.worker_brokers, columns)


def report_client(results: List[Dict[str, float]], args: argparse.Namespace) -> None:
    print(f"part 2: fastbroker.Client.map of {args.client_jobs} jobs over a list of B brokers; median of {args.rounds}")
    _ratio_table(
        results, args.client_brokers, [("jobs/s", "rate", "{:,.0f}"), ("client CPU µs/job", "cpu_us", "{:.1f}")]
    )


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="1,2", help="shard counts of part 1 (default 1,2; empty: skip)")
    p.add_argument(
        "--jobs", type=int, default=200_000, help="jobs per round of part 1, over all shards (default 200000)"
    )
    p.add_argument("--window", type=int, default=1024, help="jobs in flight per client of part 1 (default 1024)")
    p.add_argument("--warmup", type=int, default=5000, help="unmeasured jobs per client first (default 5000)")
    p.add_argument("--client-brokers", default="1,4", help="list lengths of part 2 (default 1,4; empty: skip)")
    p.add_argument("--client-jobs", type=int, default=20_000, help="jobs per round of part 2 (default 20000)")
    p.add_argument("--worker-brokers", default="1,4", help="list lengths of part 3 (default 1,4; empty: skip)")
    p.add_argument("--worker-jobs", type=int, default=40_000, help="jobs per round of part 3 (default 40000)")
    p.add_argument("--worker-credit", type=int, default=64, help="the worker's --credit in part 3 (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, interleaved; medians reported (default 3)")
    args = p.parse_args(argv)
    args.shards = [int(x) for x in args.shards.split(",") if x.strip()]
    args.client_brokers = [int(x) for x in args.client_brokers.split(",") if x.strip()]
    args.worker_brokers = [int(x) for x in args.worker_brokers.split(",") if x.strip()]
    if _loadgen is None:
        p.error(f"bench._loadgen does not import ({LOADGEN_ERROR}); run `make loadgen`")
    if min(args.jobs, args.client_jobs, args.worker_jobs, args.worker_credit, args.rounds) < 1 or any(
        s < 1 for s in args.shards + args.client_brokers + args.worker_brokers
    ):
        p.error("counts must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable, "-m", "bench.shards", *argv]))
    print(machine())
    brokers: List[Dict[str, object]] = []
    clients: List[Dict[str, float]] = []
    workers: List[Dict[str, float]] = []
    for _ in range(args.rounds):
        for s in args.shards:
            brokers.append(measure_brokers(args, s))
        for b in args.client_brokers:
            clients.append(measure_client(args, b))
        for b in args.worker_brokers:
            workers.append(measure_worker(args, b))
    if brokers:
        report_brokers(brokers, args)
    if clients:
        report_client(clients, args)
    if workers:
        report_worker(workers, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
