"""Throughput of the durable store: the same FBC01 load through an in-memory broker
and through brokers with ``--store`` at ``--sync full``, ``normal`` and ``off`` (a log
store, the default format) and an SQLite store (``sqlite-normal``).

    python -m bench.store_throughput [--jobs N] [--core compiled|pure] [--window W]
                                     [--clients N] [--workers N] [--rounds R]
                                     [--only memory,full,normal,off,sqlite-full,sqlite-normal,sqlite-off]
                                     [--no-ack]
                                     [--protocol fbc1|fbc2] [--dir DIR] [--profile]
                                     (from the repository root)

Each broker is ``python -m fastbroker broker --core CORE [--store FILE --store-format F --sync S]`` in a
process of its own, on ipc endpoints in a temporary directory (the store file is
there too: a fresh store per measurement). Load, in processes of their own:

* a client is a raw FBC01 DEALER in a tight pyzmq loop (not ``fastbroker.Client``,
  whose futures and I/O thread would be the bottleneck): SUBMIT with a 16-byte id
  (8-byte counter + zeros), empty options (ACCEPTED on, unless ``--no-ack``) and a
  16-byte payload, ``--window`` requests in flight; every OK outcome is checked (its
  id, its answer, once). A warm-up (2000 requests, not measured) comes first.
* a worker is bench.e2e's raw FBW01 DEALER (READY with credit 65536, ANSWER per TASK).

With ``--protocol fbc2`` the load is bench.e2e's compiled load generators instead
(``bench/_loadgen.pyx``, ``make loadgen``): FBC02 SUBMIT batches without ACCEPTED and
an FBW02 worker, the rate at which the store's cost per job shows most.

Figures: jobs/s over the measured window (first SUBMIT to last outcome), the p50/p99
round trip seen by the client, and the broker process's CPU per job (``/proc``, all
threads). Rounds are interleaved (memory, full, normal, off, memory, ...) and the
table gives medians; the ratio column is each mode's jobs/s over in-memory's. Every
wait is bounded; every process is SIGKILLed after its measurement.

With ``--profile`` the last round of each store mode also runs the broker under
cProfile (``python -m cProfile``; slower, so its rate is not in the table) and
prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fastbroker.protocol import (
    C_SUBMIT as SUBMIT,
    CLIENT_SIGNATURE as SIG,
    OPT_NO_ACK,
    R_ACCEPTED as ACCEPTED,
    R_OK as OK,
)

from bench.e2e import (
    CHILD_LIFETIME,
    CLK_TCK,
    START_WAIT,
    Lines,
    Run,
    child_dealer,
    cpu_seconds,
    go_and_collect,
    machine,
    pipelined,
    temporary_run,
    wait_warm,
    warm_then_measure,
)

MODES = ("memory", "full", "normal", "off", "sqlite-full", "sqlite-normal", "sqlite-off")
"""memory: no store; full, normal, off: a log store (the default format) at that --sync;
sqlite-*: an SQLite store (--store-format sqlite)."""
DEFAULT_MODES = "memory,full,normal,off,sqlite-normal"


def store_args(mode: str, path: Path) -> List[str]:
    """The broker's store options for `mode`."""
    if mode == "memory":
        return []
    store_format, _, sync = mode.rpartition("-")
    return ["--store", str(path), "--store-format", store_format or "log", "--sync", sync]


def label(mode: str) -> str:
    if mode == "memory":
        return mode
    store_format, _, sync = mode.rpartition("-")
    return f"{store_format or 'log'} --sync {sync}"


COUNTER = struct.Struct(">Q")
ZEROS = bytes(8)


# -- the client child -----------------------------------------------------------------------


def run_client(addr: str, jobs: int, window: int, warmup: int, ack: int, parent: int) -> None:
    sock = child_dealer(addr)
    options = b"" if ack else bytes([OPT_NO_ACK]) + bytes(8)
    payload = b"p" * 16
    answer = payload  # bench.e2e's worker answers with the payload as it came
    signal.alarm(int(CHILD_LIFETIME))

    def phase(first: int, n: int) -> Dict[str, object]:
        send, pack, unpack = sock.send_multipart, COUNTER.pack, COUNTER.unpack_from
        accepted = 0

        def reply_index(msg: List[bytes]) -> Optional[int]:
            nonlocal accepted
            if msg[0] != SIG or len(msg[2]) != 16:
                raise RuntimeError(f"bad reply {msg[:3]!r}")
            if msg[1] == ACCEPTED:
                accepted += 1
                return None
            if msg[1] != OK or msg[3:] != [answer]:
                raise RuntimeError(f"unexpected reply {msg[1:]!r}")
            return unpack(msg[2])[0] - first

        figures = pipelined(
            sock,
            n,
            window,
            lambda i: send([SIG, SUBMIT, pack(first + i) + ZEROS, options, payload]),
            reply_index,
            parent,
        )
        return {**figures, "accepted": accepted}

    warm_then_measure(phase, warmup, jobs)


# -- the parent -------------------------------------------------------------------------------


def measure(run: Run, mode: str, args: argparse.Namespace, profile: bool = False) -> Dict[str, object]:
    me = str(os.getpid())
    req, work, ans = run.endpoint("requests"), run.endpoint("workers"), run.endpoint("answers")
    deadline = time.monotonic() + START_WAIT
    store = store_args(mode, run.dir / "store.db")
    prof = run.dir / "broker.prof"
    prefix = ["-m", "cProfile", "-o", str(prof)] if profile else []
    bproc = run.start(
        [*prefix, "-m", "fastbroker", "-v", "broker", "--core", args.core, *store, req, work, ans], f"broker-{mode}"
    )
    run.wait_for_broker(bproc, mode, args.core, deadline)
    kind = ["fbw2", work, me, "compiled"] if args.protocol == "fbc2" else ["fbw", work, me]
    workers = [run.start(["-m", "bench.e2e", "_worker", *kind], f"worker{i}") for i in range(args.workers)]
    for i, w in enumerate(workers):
        if Lines(w, f"worker{i}").read(deadline) != "connected":
            raise RuntimeError("worker did not connect")
    share = [args.jobs // args.clients + (1 if i < args.jobs % args.clients else 0) for i in range(args.clients)]
    if args.protocol == "fbc2":
        common = [str(args.warmup), me, "compiled", "fbc2"]
        argv = [["-m", "bench.e2e", "_client", req, str(n), str(args.window), "16", *common] for n in share]
    else:
        common = [str(args.warmup), str(int(args.ack)), me]
        argv = [["-m", "bench.store_throughput", "_client", req, str(n), str(args.window), *common] for n in share]
    clients = [run.start(a, f"client{i}", stdin=True) for i, a in enumerate(argv)]
    readers = [Lines(c, f"client{i}") for i, c in enumerate(clients)]
    wait_warm(readers)
    cpu0 = cpu_seconds(bproc.pid)
    wall0 = time.monotonic()
    results = go_and_collect(clients, readers, args.max_seconds)
    cpu = cpu_seconds(bproc.pid) - cpu0
    wall = time.monotonic() - wall0
    if bproc.poll() is not None:
        raise RuntimeError(f"the {mode} broker died:\n{run.stderr_of(bproc)}")
    if profile:
        bproc.send_signal(signal.SIGTERM)  # a clean exit writes the profile
        bproc.wait(30)
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    jobs = sum(r["n"] for r in results)
    out = {
        "mode": mode,
        "jobs": jobs,
        "elapsed": elapsed,
        "rate": jobs / elapsed,
        "cpu_job": cpu / jobs,
        "cpu_pct": cpu / wall * 100,
        "p50_us": max(r["p50_us"] for r in results),
        "p99_us": max(r["p99_us"] for r in results),
        "accepted": sum(r.get("accepted", 0) for r in results),
    }
    if mode != "memory":
        out["store_bytes"] = sum(p.stat().st_size for p in run.dir.glob("store.db*"))
    if profile:
        import pstats

        print(f"--- cProfile of the {mode} broker (cumulative, top 25) ---")
        pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)
        print(f"--- cProfile of the {mode} broker (own time, top 15) ---")
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(15)
    return out


def report(results: List[Dict[str, object]], args: argparse.Namespace) -> None:
    med = statistics.median
    rows, base = [], None
    for mode in args.only:
        runs = [r for r in results if r["mode"] == mode]
        rate = med(r["rate"] for r in runs)
        if mode == "memory":
            base = rate
        rows.append(
            (
                label(mode),
                f"{rate:,.0f}",
                f"{min(r['rate'] for r in runs):,.0f}-{max(r['rate'] for r in runs):,.0f}",
                "1.00" if mode == "memory" else (f"{rate / base:.2f}" if base else "-"),
                f"{med(r['p50_us'] for r in runs):,.0f}",
                f"{med(r['p99_us'] for r in runs):,.0f}",
                f"{med(r['cpu_job'] for r in runs) * 1e6:.1f}",
                f"{med(r['cpu_pct'] for r in runs):.0f}",
            )
        )
    head = (
        "broker",
        "jobs/s (median)",
        "min-max",
        "/ in-memory",
        "p50 µs",
        "p99 µs",
        "broker CPU µs/job",
        "broker CPU %",
    )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print(f"median over {args.rounds} round(s) per mode (rounds interleaved), core {args.core}:")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(
            "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
        )
    print(f"(CPU % = broker CPU seconds / wall seconds of the measured window; /proc tick = {1e3 / CLK_TCK:.0f} ms)")
    if base and "normal" in args.only:
        normal = med(r["rate"] for r in results if r["mode"] == "normal")
        verdict = "meets" if normal >= 0.5 * base else "MISSES"
        print(f"log --sync normal / in-memory = {normal / base:.2f}: {verdict} the target (>= 0.50)")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.store_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20000, help="measured requests per mode (default 20000)")
    p.add_argument(
        "--core", choices=("compiled", "pure"), default="compiled", help="the broker's core (default compiled)"
    )
    p.add_argument("--window", type=int, default=128, help="requests in flight per client (default 128)")
    p.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--warmup", type=int, default=2000, help="unmeasured requests per client first (default 2000)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per mode, interleaved (default 2)")
    p.add_argument(
        "--only",
        default=DEFAULT_MODES,
        help=f"comma-separated subset of {','.join(MODES)} (default {DEFAULT_MODES}; sqlite-*: --store-format sqlite)",
    )
    p.add_argument("--no-ack", dest="ack", action="store_false", help="SUBMIT with the no-ACCEPTED option")
    p.add_argument(
        "--protocol",
        choices=("fbc1", "fbc2"),
        default="fbc1",
        help="fbc1: the Python FBC01 client and FBW01 worker (default); fbc2: the compiled FBC02 client "
        "(no ACCEPTED) and FBW02 worker of bench/_loadgen (make loadgen)",
    )
    p.add_argument("--profile", action="store_true", help="also profile each store mode's broker once (cProfile)")
    p.add_argument(
        "--dir",
        default=None,
        help="where the temporary directories (endpoints, store) go: the store's "
        "file system decides what --sync full costs (default: the system's temporary directory)",
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound of each measured run (default 300)")
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    if not args.only or any(m not in MODES for m in args.only):
        p.error(f"--only: choose from {','.join(MODES)}")
    if args.jobs < args.clients or min(args.window, args.rounds, args.clients, args.workers) < 1:
        p.error("--jobs >= --clients >= 1; --window, --workers, --rounds >= 1")
    args.transport = "ipc"  # for bench.e2e.Run.endpoint
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_client":
        run_client(argv[1], *(int(x) for x in argv[2:7]))
        return 0
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable, "-m", "bench.store_throughput", *argv]))
    print(machine())
    print(
        f"load: {args.jobs} jobs/mode, window {args.window} x {args.clients} FBC01 client process(es) "
        f"(ACCEPTED {'on' if args.ack else 'off'}), {args.workers} raw FBW01 worker process(es), 16-byte payload, ipc"
    )
    results: List[Dict[str, object]] = []
    plan = [(rnd, mode, False) for rnd in range(1, args.rounds + 1) for mode in args.only]
    if args.profile:
        plan += [(0, mode, True) for mode in args.only if mode != "memory"]
    for rnd, mode, profile in plan:
        with temporary_run(args, "fb-store-", args.dir) as run:
            r = measure(run, mode, args, profile)
        if profile:
            print(f"  profiled {mode:6}: {r['rate']:,.0f} jobs/s under cProfile (not in the table)", flush=True)
            continue
        results.append(r)
        extra = f", store {r['store_bytes'] / 1e6:.1f} MB" if "store_bytes" in r else ""
        print(
            f"  round {rnd} {mode:6}: {r['jobs']} jobs in {r['elapsed']:.3f} s = {r['rate']:,.0f} jobs/s, "
            f"broker CPU {r['cpu_job'] * 1e6:.1f} µs/job{extra}",
            flush=True,
        )
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
