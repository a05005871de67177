"""Many-core: one broker, ``fastbroker worker --processes N``, how throughput scales.

    python -m bench.manycore [--processes 1,2] [--jobs N] [--work-us 0,500]
                             [--core compiled|pure] [--window W] [--credit C]
                             [--rounds R] [--retention SECONDS] [--cpu-affinity]
                             [--reference-jobs N] (from the repository root)

One broker process (``python -m fastbroker -v broker --core CORE``, ipc endpoints in a
temporary directory) serves every run. For each job size U (``--work-us``) and each
N (``--processes``), rounds interleaved (1, 2, 1, 2, ...):

* a worker pool ``python -m fastbroker worker bench.manycore:BurnWorker WORKERS_ADDR
  --processes N --credit C``: N processes of the real ``fastbroker.Worker`` class
  (FBW01), whose ``process()`` burns about U µs of CPU in its own thread
  (``time.thread_time``, bounded in wall time too) and returns the payload;
* the bench waits, by asking the broker for its figures (FBC01 STATS, the same as
  ``fastbroker stats``), until the broker counts exactly N workers;
* one compiled FBC01 client (bench/_loadgen through bench.e2e's client child:
  SUBMIT with OPT_NO_ACK, ``--window`` requests in flight, 16-byte payload, every
  answer checked) sends a warm-up, then ``--jobs`` measured jobs;
* CPU (``utime + stime`` from /proc) of the broker process, of its main thread
  alone (the routing loop: libzmq's I/O thread is the other one), of the client and
  of all the pool's processes is read before "go" and after the last answer, and
  the machine's busy time (/proc/stat): what is left over is other users' load
  (the machine may be shared), shown as "other CPU %";
* the pool is stopped with SIGTERM (its children finish their jobs and hang up) and
  the bench waits until the broker counts no worker.

Last, a reference run (``--reference-jobs``, 0 to skip): the same client and one C
worker (bench/_loadgen's FBW01 worker through bench.e2e, credit 65536) instead of the
pool, which drives the broker close to saturation.

U = 0 (an empty job) measures the per-job cost of the Python Worker, and where
one or two of them saturate; U = 500 (CPU-bound jobs) should scale with the cores
left over by the broker and the client. The broker's saturation rate is the job
rate at which it would use one whole core: 1 / (broker CPU seconds per job), from
the run of Python workers with the highest rate, and from the reference run (for
the process, and for its loop thread alone, which is what cannot use a second core).
At a few thousand jobs/s the loop wakes up for nearly every message, so the first
figure is a pessimistic floor.

Every wait is bounded; every process started is SIGKILLed at the end, pass or fail.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import zmq

from fastbroker import Worker
from fastbroker.client.sync import connect_dealer
from fastbroker.server.metrics import request_stats

from bench import e2e
from bench.proctree import descendants, kill_descendants

WORK_ENV = "FB_MANYCORE_WORK_US"
"""Microseconds of CPU each BurnWorker job burns (read once, at import, in the pool)."""
BURN_WALL_FACTOR = 100
"""A job gives up burning after this many times its CPU budget in wall time (min 1 s):
on a crowded machine it must still end."""
WORKER_MODULE = "bench.manycore"
"""Where the pool imports BurnWorker from (this file is __main__ in the parent)."""
STOP_WAIT = 20.0
"""Bound of a pool's exit after SIGTERM, and of the broker forgetting its workers."""


# -- the worker ----------------------------------------------------------------------------


def burn(seconds: float) -> int:
    """Keep this thread on the CPU for `seconds` of its own CPU time; returns the turns.
    Bounded: gives up after max(1, BURN_WALL_FACTOR x seconds) of wall time."""
    if seconds <= 0:
        return 0
    clock = time.thread_time
    end = clock() + seconds
    wall_end = time.monotonic() + max(1.0, BURN_WALL_FACTOR * seconds)
    turns = 0
    while clock() < end:
        turns += 1
        if not turns & 1023 and time.monotonic() > wall_end:
            break
    return turns


class BurnWorker(Worker):
    """A DEALER Worker whose job burns $FB_MANYCORE_WORK_US µs of CPU, then answers
    the payload unchanged (the compiled client checks it)."""

    work_seconds: float = float(os.environ.get(WORK_ENV, "0") or 0) / 1e6

    def process(self, data: bytes) -> bytes:
        burn(self.work_seconds)
        return data


# -- the parent ----------------------------------------------------------------------------


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime + stime of one thread (the main thread of a process: tid == pid)."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / e2e.CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy (not idle, not iowait) since boot,
    from /proc/stat: with our processes' own, it tells how much others took meanwhile."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / e2e.CLK_TCK


class BrokerFigures:
    """Asks the broker for its figures (FBC01 STATS) on a DEALER of its own."""

    def __init__(self, requests_addr: str) -> None:
        self.context = zmq.Context(1)
        self.socket = connect_dealer(self.context, requests_addr)

    def read(self, wait: float = 2.0) -> Dict[str, int]:
        figures = request_stats(self.socket, wait)
        if figures is None:
            raise RuntimeError(f"the broker did not answer STATS within {wait} s")
        return figures

    def wait_for_workers(self, count: int, deadline: float, what: str) -> Dict[str, int]:
        """Wait until the broker counts exactly `count` FBW01 workers."""
        for _ in range(100000):
            figures = self.read()
            if figures["workers"] == count:
                return figures
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: the broker counts {figures['workers']} worker(s), not {count}")
            time.sleep(0.02)
        raise RuntimeError(f"{what}: gave up")

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def stop_pool(pool: subprocess.Popen, check: bool = True) -> None:
    """SIGTERM the pool (it forwards it to its children) and wait for it, bounded;
    then SIGKILL whatever is left of it and its children. With `check`,
    RuntimeError unless it exited with status 0 in time."""
    children = descendants(pool.pid)
    pool.send_signal(signal.SIGTERM)
    try:
        code: Optional[int] = pool.wait(STOP_WAIT)
    except subprocess.TimeoutExpired:
        code = None
    for pid in [*children, pool.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if check and code != 0:
        raise RuntimeError(f"the worker pool did not stop cleanly on SIGTERM (status {code})")


def measure(
    run: e2e.Run,
    args: argparse.Namespace,
    figures: BrokerFigures,
    broker_pid: int,
    addrs: Dict[str, str],
    processes: int,
    work_us: int,
    jobs: int,
    reference: bool = False,
) -> Dict[str, object]:
    """One run: a pool of `processes` BurnWorkers of `work_us` (or, for the
    `reference`, one compiled load-generator worker), one client, `jobs` jobs."""
    deadline = time.monotonic() + e2e.START_WAIT
    figures.wait_for_workers(0, deadline, "before the workers")
    run.env[WORK_ENV] = str(work_us)
    if reference:
        # bench.e2e's C worker (FBW01, credit 65536): what the broker does when the
        # workers cost next to nothing. It has no graceful stop: run it last.
        pool = run.start(
            ["-m", "bench.e2e", "_worker", "fbw", addrs["workers"], str(os.getpid()), "compiled"], "reference-worker"
        )
    else:
        pool = run.start(
            [
                "-m",
                "fastbroker",
                "worker",
                f"{WORKER_MODULE}:BurnWorker",
                addrs["workers"],
                "--processes",
                str(processes),
                "--credit",
                str(args.credit),
                *(["--cpu-affinity"] if args.cpu_affinity else []),
            ],
            f"pool{processes}-u{work_us}",
        )
    try:
        figures.wait_for_workers(processes, deadline, f"{processes} worker process(es)")
        worker_pids = [pool.pid, *descendants(pool.pid)]
        warmup = max(0, min(args.warmup, jobs))
        client = run.start(
            [
                "-m",
                "bench.e2e",
                "_client",
                addrs["requests"],
                str(jobs),
                str(args.window),
                str(args.payload),
                str(warmup),
                str(os.getpid()),
                "compiled",
                "fbc",
            ],
            f"client-p{processes}-u{work_us}",
            stdin=True,
        )
        reader = e2e.Lines(client, "client")
        e2e.wait_warm([reader])
        pids = {"broker": [broker_pid], "client": [client.pid], "worker": worker_pids}
        each0 = [e2e.cpu_seconds(p) for p in worker_pids]
        cpu0 = {k: sum(e2e.cpu_seconds(p) for p in v) for k, v in pids.items()}
        loop0, busy0 = thread_cpu_seconds(broker_pid, broker_pid), machine_busy_seconds()
        wall0 = time.monotonic()
        result = e2e.go_and_collect([client], [reader], args.max_seconds)[0]
        cpu1 = {k: sum(e2e.cpu_seconds(p) for p in v) for k, v in pids.items()}
        loop1, busy1 = thread_cpu_seconds(broker_pid, broker_pid), machine_busy_seconds()
        each1 = [e2e.cpu_seconds(p) for p in worker_pids]
        wall = time.monotonic() - wall0
        seen = figures.read()
        if seen["workers"] != processes:
            raise RuntimeError(f"{seen['workers']} workers at the end of the run, not {processes}: one died?")
    except BaseException:
        stop_pool(pool, check=False)
        raise
    if reference:
        stop_pool(pool, check=False)  # SIGKILL: the broker forgets it after its liveness
    else:
        stop_pool(pool)
        figures.wait_for_workers(0, time.monotonic() + STOP_WAIT, "after the pool stopped")
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    cpu["loop"] = loop1 - loop0
    # Everything else the machine ran meanwhile (other users, this bench's parent).
    cpu["other"] = max(0.0, (busy1 - busy0) - sum(cpu.values()) + cpu["loop"])
    elapsed = result["end"] - result["start"]
    return {
        "processes": processes,
        "work_us": work_us,
        "jobs": result["n"],
        "elapsed": elapsed,
        "rate": result["n"] / elapsed,
        "cpu": cpu,
        "wall": wall,
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "reference": reference,
        "per_worker": [b - a for a, b in zip(each0, each1)],
    }


def saturation(r: Dict[str, object]) -> str:
    """The job rate at which the broker process, and its loop thread alone, would use one core."""
    per_job = r["cpu"]["broker"] / r["jobs"]
    loop_job = r["cpu"]["loop"] / r["jobs"]
    say = lambda s: f"{1 / s:,.0f} jobs/s" if s > 0 else "n/a (no CPU tick seen)"  # noqa: E731
    return (
        f"broker process {per_job * 1e6:.1f} µs CPU/job -> one core at {say(per_job)}; "
        f"its loop thread alone {loop_job * 1e6:.1f} µs/job -> {say(loop_job)}"
    )


def summarize(results: List[Dict[str, object]], args: argparse.Namespace) -> None:
    med = statistics.median
    rows = []
    measured = [r for r in results if not r["reference"]]
    for work_us in args.work_us:
        base: Optional[float] = None
        for n in args.processes:
            runs = [r for r in measured if r["work_us"] == work_us and r["processes"] == n]
            rate = med(r["rate"] for r in runs)
            if base is None:
                base = rate
            rows.append(
                row(f"{work_us}", f"{n}", runs, f"{rate / base:.2f}", f"{n * 1e6 / work_us:,.0f}" if work_us else "-")
            )
    references = [r for r in results if r["reference"]]
    if references:
        rows.append(row("0", "C (ref.)", references, "-", "-"))
    head = (
        "work µs/job",
        "processes",
        "jobs/s (median)",
        "min-max",
        "speed-up vs 1",
        "CPU-bound limit jobs/s",
        "broker CPU %/core",
        "broker loop thread %",
        "broker CPU µs/job",
        "worker CPU %",
        "worker CPU µs/job",
        "client CPU %",
        "other CPU %",
        "p50 µs",
    )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(
        f"median over {args.rounds} round(s) (interleaved), {args.core} broker, credit {args.credit}, "
        f"window {args.window}:"
    )
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
    print(
        "(CPU % = CPU seconds / wall seconds of the measured window, 100 % = one core; worker CPU % is all the "
        "pool's processes together; broker loop thread = the broker's main thread alone, without libzmq's I/O "
        "thread; CPU-bound limit = processes x 1e6 / work µs, ignoring all overhead; speed-up = median jobs/s "
        f"/ that of {args.processes[0]} process(es) at the same work size; C (ref.) = one bench/_loadgen "
        f"FBW01 worker instead of fastbroker.Worker; other CPU % = the machine's busy time (/proc/stat) minus "
        f"broker, client and workers: other users of the machine; /proc tick = {1e3 / e2e.CLK_TCK:.0f} ms)"
    )
    best = max(measured, key=lambda r: r["rate"])
    print(
        f"broker saturation, from the fastbroker.Worker run with the highest rate ({best['processes']} "
        f"process(es), {best['work_us']} µs/job, {best['rate']:,.0f} jobs/s): {saturation(best)}"
    )
    if references:
        best = max(references, key=lambda r: r["rate"])
        print(f"broker saturation, from the reference run ({best['rate']:,.0f} jobs/s): {saturation(best)}")


def row(work: str, processes: str, runs: List[Dict[str, object]], speedup: str, limit: str) -> tuple:
    """One table row: the medians of `runs`."""
    med = statistics.median
    rate = med(r["rate"] for r in runs)
    per_job = {k: med(r["cpu"][k] / r["jobs"] for r in runs) for k in ("broker", "worker")}
    pct = {k: med(r["cpu"][k] / r["wall"] * 100 for r in runs) for k in ("broker", "loop", "client", "worker", "other")}
    return (
        work,
        processes,
        f"{rate:,.0f}",
        f"{min(r['rate'] for r in runs):,.0f}-{max(r['rate'] for r in runs):,.0f}",
        speedup,
        limit,
        f"{pct['broker']:.0f}",
        f"{pct['loop']:.0f}",
        f"{per_job['broker'] * 1e6:.1f}",
        f"{pct['worker']:.0f}",
        f"{per_job['worker'] * 1e6:.0f}",
        f"{pct['client']:.0f}",
        f"{pct['other']:.0f}",
        f"{med(r['p50_us'] for r in runs):,.0f}",
    )


def int_list(text: str) -> List[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"a comma-separated list of whole numbers >= 0: {text!r}")
    return values


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.manycore", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int_list, default=[1, 2], help="worker processes per run (default 1,2)")
    p.add_argument("--jobs", type=int, default=10000, help="measured jobs per run (default 10000)")
    p.add_argument(
        "--work-us",
        type=int_list,
        default=[0, 500],
        help="CPU µs each job burns in the worker, one table row per size (default 0,500)",
    )
    p.add_argument("--core", choices=("compiled", "pure"), default="compiled", help="the broker's core")
    p.add_argument("--window", type=int, default=64, help="requests in flight at the client (default 64)")
    p.add_argument("--credit", type=int, default=1, help="--credit of each worker process (default 1)")
    p.add_argument(
        "--cpu-affinity", action="store_true", help="run the pools with --cpu-affinity (one CPU per process)"
    )
    p.add_argument("--rounds", type=int, default=3, help="runs per (size, processes), interleaved (default 3)")
    p.add_argument("--warmup", type=int, default=500, help="unmeasured jobs before each run (default 500)")
    p.add_argument("--payload", type=int, default=16, help="payload bytes, >= 8 (default 16)")
    p.add_argument(
        "--retention", type=float, default=None, help="the broker's --retention in seconds (default: the broker's own)"
    )
    p.add_argument(
        "--reference-jobs",
        type=int,
        default=200000,
        help="jobs of the last run, with one compiled load-generator worker instead of the pool, "
        "to see the broker near saturation; 0: no such run (default 200000)",
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound of each measured run (default 300)")
    args = p.parse_args(argv)
    if min(args.processes) < 1:
        p.error("--processes: each at least 1")
    if args.reference_jobs < 0:
        p.error("--reference-jobs >= 0")
    if args.jobs < 1 or args.window < 1 or args.window > 900 or args.credit < 1 or args.rounds < 1:
        p.error("--jobs, --credit, --rounds >= 1; 1 <= --window <= 900")
    if args.payload < 8:
        p.error("--payload must be at least 8 (the request id)")
    args.transport = "ipc"  # for bench.e2e.Run.endpoint
    return args


def progress(what: str, r: Dict[str, object], bproc: subprocess.Popen, run: e2e.Run) -> None:
    c, jobs = r["cpu"], r["jobs"]
    split = "+".join(f"{w / r['wall'] * 100:.0f}" for w in r["per_worker"])
    print(
        f"  {what}: {jobs} jobs in {r['elapsed']:.3f} s = {r['rate']:,.0f} jobs/s; CPU µs/job broker "
        f"{c['broker'] / jobs * 1e6:.1f} (loop thread {c['loop'] / jobs * 1e6:.1f}), "
        f"workers {c['worker'] / jobs * 1e6:.1f}, client {c['client'] / jobs * 1e6:.1f}; CPU % workers "
        f"{split}, others on the machine "
        f"{c['other'] / r['wall'] * 100:.0f}",
        flush=True,
    )
    if bproc.poll() is not None:
        raise RuntimeError(f"the broker died:\n{run.stderr_of(bproc)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if e2e._loadgen is None:
        print(f"bench._loadgen does not import ({e2e.LOADGEN_ERROR}); run `make loadgen`", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable, "-m", "bench.manycore", *argv]))
    print(e2e.machine())
    print(
        f"load: {args.jobs} jobs per run (+{args.warmup} warm-up), 1 compiled FBC01 client (window "
        f"{args.window}, payload {args.payload} B), workers: fastbroker.Worker (bench.manycore:BurnWorker, "
        f"credit {args.credit}) in `fastbroker worker --processes N`, ipc, one {args.core} broker for all runs"
    )
    results: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="fb-manycore-") as tmp:
        run = e2e.Run(Path(tmp), args)
        figures: Optional[BrokerFigures] = None
        try:
            extra = [] if args.retention is None else ["--retention", f"{args.retention:g}"]
            bproc = run.start(
                [
                    "-m",
                    "fastbroker",
                    "-v",
                    "broker",
                    "--core",
                    args.core,
                    *extra,
                    run.endpoint("requests"),
                    run.endpoint("workers"),
                    run.endpoint("answers"),
                ],
                "broker",
            )
            text = run.wait_for_broker(bproc, args.core, args.core, time.monotonic() + e2e.START_WAIT)
            info = text.split("broker on requests=", 1)[1].split()
            addrs = {"requests": info[0], "workers": info[1].split("=", 1)[1]}
            figures = BrokerFigures(addrs["requests"])
            for rnd in range(1, args.rounds + 1):
                for work_us in args.work_us:
                    for n in args.processes:
                        r = measure(run, args, figures, bproc.pid, addrs, n, work_us, args.jobs)
                        results.append(r)
                        progress(f"round {rnd}: work {work_us} µs, {n} process(es)", r, bproc, run)
            if args.reference_jobs:
                r = measure(run, args, figures, bproc.pid, addrs, 1, 0, args.reference_jobs, reference=True)
                results.append(r)
                progress("reference: 1 compiled load-generator worker", r, bproc, run)
        except BaseException:
            for proc in run.procs:
                if proc.poll() is not None and proc.returncode not in (0, None):
                    sys.stderr.write(f"--- {proc.args[1:5]} exited {proc.returncode}:\n{run.stderr_of(proc)}\n")
            raise
        finally:
            if figures is not None:
                figures.close()
            for proc in run.procs:  # pool children leave their group: kill them by pid
                if proc.poll() is None:
                    kill_descendants(proc.pid)
            run.close()
    summarize(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
