"""Scaling (issue 6): broker cost per job against payload size and queue depth, in one run.

    python -m bench.scaling [--payloads 16,1024,65536,1048576] [--depths 10,10000,1000000]
                            [--quick] [--only compiled,pure,proxy] [--tables payload,depth]
                            [--json FILE] (from the repository root; --help for the rest)

1. **Payload table** (end to end): for each payload size, the same load through the
   compiled core, the pure core and ``zmq.proxy`` (``bench/e2e.py``'s ``Run.measure``:
   compiled load generators, FBC01 ``SUBMIT`` with ``OPT_NO_ACK`` to fastbroker, the REQ
   envelope through the proxy, ``--window`` 64), rounds interleaved per payload, medians
   (``e2e.aggregate``). The job count depends on the payload (``--jobs``) so that a run
   takes seconds and moves a bounded number of bytes; the pure core runs at most
   ``--pure-max-jobs`` (it does ~7k jobs/s): every figure but the job count is per job
   or per second, so the rows compare. Then the ratios per payload, and how the broker
   CPU per job grows from the smallest payload to the largest.
2. **Depth table** (compiled core): for each payload and depth D, a broker process
   (``fastbroker broker --core compiled``, retention 0 by default so that only the queue
   grows, heartbeat 5 s) is driven in cycles: a compiled client sends D FBC01 SUBMITs at
   once (over ceil(D / 1000) connections, at most ``--depth-connections``: see
   ``run_depth_client``) with no worker taking any (the *enqueue* phase: the queue goes
   0 -> D), then a paused compiled FBW01 worker is let go for exactly D jobs (the *drain*
   phase: dispatch, ANSWER and the reply to the client for each; the queue goes D -> 0)
   and pauses again with ``READY(0)``. The broker's CPU (all threads, nanoseconds: the process CPU clock,
   ``clock_gettime`` on ``((~pid) << 3) | 2``) is read before each phase and once the
   broker is idle after it (its CPU clock did not move for ``--settle-ms`` and a STATS
   reply shows the phase done; the few STATS asked too early are subtracted at their
   calibrated cost). Small depths repeat the cycle until ``--depth-min-jobs`` jobs were
   measured, so a per-job figure is never one wake-up divided by 10; at depth 10 it
   still includes the per-batch costs (one or two wake-ups, a READY and a READY(0) per
   10 jobs), which a deep queue spreads thinner: read the depth ratios with that in mind
   (``bench/test_depth.py`` measures the per-operation cost at a depth without them).
   Memory per queued job beyond its payload comes from ``bench/memory.py``'s ``measure``
   (a ``BrokerCore`` server process, FBC01 requests, RSS and malloc per job), and as a
   cross-check from the broker process of the enqueue phase (RSS after the first fill
   minus before, per job). D x payload is capped at ``--max-bytes`` (2 GiB) as
   ``bench/memory.py`` does; a capped count is shown as such (and a depth whose capped
   count equals a smaller one's is not run twice).

Every wait is bounded; every process started is SIGKILLed (by process group) at the end
of its run, pass or fail, and children exit by themselves if this process goes away.
``--json FILE`` writes every figure (the runs, the tables, the ratios, the command and
the machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import zmq

from fastbroker import protocol

from bench import e2e, memory

DEFAULT_PAYLOADS = (16, 1024, 65536, 1 << 20)
DEFAULT_DEPTHS = (10, 10_000, 1_000_000)
DEFAULT_JOBS = {16: 50_000, 1024: 50_000, 65536: 10_000, 1 << 20: 1_000}
"""Measured jobs per broker run, per payload: seconds per run, at most ~1 GiB each way."""
BROKERS = e2e.BROKERS
DEPTH_HEARTBEAT = 5.0
"""The depth brokers' heartbeat (s): fewer heartbeats in the measured phases (liveness 3 x 5 s)."""
WORKER_HEARTBEAT = 2.0
"""The depth worker's heartbeat (s), running or paused: well inside the broker's 15 s."""
CLIENT_STALL = 300.0
"""The depth client waits this long for a reply (the drain starts after the enqueue settled);
the parent gives up on it much sooner once the broker says it answered everything."""
REPLY_MARK = 1000
"""fastbroker's REQUESTS_SNDHWM: replies beyond this many waiting for one client are dropped."""
CLIENT_GRACE = 20.0
"""After the broker answered all D, the client has this long to report every reply."""
LIFETIME = 1800.0
"""A depth child exits by itself after this long, whatever happens."""
STATS_CALIBRATION = 50
"""STATS round trips timed on the idle broker to know what one costs it."""


# -- small helpers ----------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    """CPU time of process ``pid`` (all its threads, dead ones too) in ns: the process
    CPU clock (``clock_getcpuclockid``), not /proc's 10 ms ticks, so 10 jobs register."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def human(n: int) -> str:
    return memory.human(n)


def int_list(text: str) -> List[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> None:
    """Print a markdown table: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print(
            "| " + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
        )


def ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return None if x is None or not y else x / y


def fmt_ratio(r: Optional[float]) -> str:
    return "–" if r is None else f"{r:.2f}x"


# -- 1. payload table (end to end, bench/e2e.py) ------------------------------------------


def e2e_args(a: argparse.Namespace, payload: int, jobs: int, brokers: Sequence[str]) -> argparse.Namespace:
    warmup = min(a.warmup, max(1, jobs // 5))
    return e2e.parse(
        [
            "--jobs",
            str(jobs),
            "--window",
            str(a.window),
            "--payload",
            str(payload),
            "--only",
            ",".join(brokers),
            "--loadgen",
            "compiled",
            "--protocol",
            "fbc",
            "--rounds",
            str(a.rounds),
            "--warmup",
            str(warmup),
            "--transport",
            a.transport,
            "--max-seconds",
            str(a.max_seconds),
        ]
    )


def measure_e2e(args: argparse.Namespace, broker: str) -> Dict[str, object]:
    """One e2e measurement of one broker (as e2e.main does it)."""
    with e2e.temporary_run(args, "fb-scaling-") as run:
        return run.measure(broker)


def payload_part(a: argparse.Namespace) -> Dict[str, object]:
    runs: List[Dict[str, object]] = []
    table: List[Dict[str, object]] = []
    for payload in a.payloads:
        jobs = a.jobs_for(payload)
        pure_jobs = min(jobs, a.pure_max_jobs)
        args = {b: e2e_args(a, payload, pure_jobs if b == "pure" else jobs, [b]) for b in a.only}
        print(
            f"payload {human(payload)}: {jobs:,} jobs per run"
            + (f" ({pure_jobs:,} for pure)" if "pure" in a.only and pure_jobs != jobs else "")
            + f", warm-up {args[a.only[0]].warmup:,}",
            flush=True,
        )
        mine: List[Dict[str, object]] = []
        for rnd in range(1, a.rounds + 1):
            for broker in a.only:
                r = measure_e2e(args[broker], broker)
                r["payload"], r["round"] = payload, rnd
                mine.append(r)
                print(
                    f"  round {rnd} {broker:8}: {r['jobs']:,} jobs in {r['elapsed']:.3f} s = "
                    f"{r['rate']:,.0f} jobs/s, p50/p99/p99.9 {r['p50_us']:,.0f}/{r['p99_us']:,.0f}/"
                    f"{r['p999_us']:,.0f} µs, CPU µs/job broker {r['cpu']['broker'] / r['jobs'] * 1e6:.1f}, "
                    f"client {r['cpu']['client'] / r['jobs'] * 1e6:.1f}, "
                    f"worker {r['cpu']['worker'] / r['jobs'] * 1e6:.1f}",
                    flush=True,
                )
        runs += mine
        for broker in a.only:
            agg = e2e.aggregate([r for r in mine if r["broker"] == broker])
            agg["payload"] = payload
            agg["cpu_us_job"] = {k: v * 1e6 for k, v in agg["cpu_job"].items()}  # cpu_job is in s/job
            agg["jobs"] = mine[[r["broker"] for r in mine].index(broker)]["jobs"]
            table.append(agg)
    ratios = []
    for payload in a.payloads:
        by = {t["broker"]: t for t in table if t["payload"] == payload}
        cpu = {b: t["cpu_job"]["broker"] * 1e6 for b, t in by.items()}
        rate = {b: t["rate"] for b, t in by.items()}
        ratios.append(
            {
                "payload": payload,
                "compiled_proxy_cpu": ratio(cpu.get("compiled"), cpu.get("proxy")),
                "compiled_pure_cpu": ratio(cpu.get("compiled"), cpu.get("pure")),
                "pure_compiled_cpu": ratio(cpu.get("pure"), cpu.get("compiled")),
                "compiled_proxy_rate": ratio(rate.get("compiled"), rate.get("proxy")),
                "compiled_minus_proxy_cpu_us": (cpu["compiled"] - cpu["proxy"])
                if "compiled" in cpu and "proxy" in cpu
                else None,
            }
        )
    growth = {}
    lo, hi = min(a.payloads), max(a.payloads)
    if lo != hi:
        for broker in a.only:
            c = {t["payload"]: t["cpu_job"]["broker"] for t in table if t["broker"] == broker}
            growth[broker] = {"small": lo, "large": hi, "ratio": ratio(c[hi], c[lo])}
    return {"runs": runs, "table": table, "ratios": ratios, "growth": growth}


def report_payload(part: Dict[str, object], a: argparse.Namespace) -> None:
    print()
    print(
        f"### Payload table (end to end; median of {a.rounds} round(s), rounds interleaved; window {a.window}, "
        f"1 compiled client + 1 compiled worker process, {a.transport})"
    )
    print()
    head = (
        "payload",
        "broker",
        "jobs",
        "jobs/s (median)",
        "jobs/s min-max",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "broker CPU µs/job",
        "client CPU µs/job",
        "worker CPU µs/job",
        "broker CPU %",
    )
    rows = []
    for t in part["table"]:
        cj, cp = t["cpu_job"], t["cpu_pct"]
        rows.append(
            (
                human(t["payload"]),
                t["broker"],
                f"{t['jobs']:,}",
                f"{t['rate']:,.0f}",
                f"{t['rate_min']:,.0f}-{t['rate_max']:,.0f}",
                f"{t['p50_us']:,.0f}",
                f"{t['p99_us']:,.0f}",
                f"{t['p999_us']:,.0f}",
                f"{cj['broker'] * 1e6:.1f}",
                f"{cj['client'] * 1e6:.1f}",
                f"{cj['worker'] * 1e6:.1f}",
                f"{cp['broker']:.0f}",
            )
        )
    markdown(head, rows, left=2)
    print()
    print(
        "fastbroker clients speak FBC01 (SUBMIT, OPT_NO_ACK), the proxy's REQ; CPU µs/job: utime+stime "
        f"(/proc, {1e3 / e2e.CLK_TCK:.0f} ms ticks) of the process(es) over the measured window, per job. "
        "The pure core runs fewer jobs (--pure-max-jobs) where the others run more: its figures are per job "
        "or per second, so they compare."
    )
    print()
    print("Ratios of the medians (same payload, same run):")
    print()
    head = (
        "payload",
        "compiled/proxy broker CPU",
        "compiled/pure broker CPU",
        "pure/compiled broker CPU",
        "compiled/proxy jobs/s",
        "compiled − proxy broker CPU µs/job",
    )
    rows = [
        (
            human(r["payload"]),
            fmt_ratio(r["compiled_proxy_cpu"]),
            fmt_ratio(r["compiled_pure_cpu"]),
            fmt_ratio(r["pure_compiled_cpu"]),
            fmt_ratio(r["compiled_proxy_rate"]),
            "–" if r["compiled_minus_proxy_cpu_us"] is None else f"{r['compiled_minus_proxy_cpu_us']:.1f}",
        )
        for r in part["ratios"]
    ]
    markdown(head, rows)
    print()
    for broker, g in part["growth"].items():
        print(f"{broker} broker CPU/job at {human(g['large'])} = {fmt_ratio(g['ratio'])} that at {human(g['small'])}")
    print(
        "(The broker process reads and writes every payload through its sockets: ipc/tcp cost a kernel "
        "copy per byte per direction, 4 per job (client in, worker out, answer in, reply out), in the "
        "proxy as much as in fastbroker. The core itself never copies a payload (zmq_msg_copy shares the "
        "buffer): what it adds per job is the compiled − proxy column, which should not grow with the "
        "payload.)"
    )


# -- 2. depth table (compiled core; CPU per job and memory per queued job) ------------------


def run_depth_client(addr: str, payload: int, parent: int, connections: int) -> None:
    """Child: compiled FBC01 clients on ``connections`` DEALER sockets, one thread each
    (the compiled loop runs without the GIL). On "go N FIRST" they send N SUBMITs between
    them, all at once (window = their share), and wait for the N replies; then "result".
    "go N FIRST K" uses the first K connections only.

    Several connections because the broker's requests ROUTER drops a reply when 1000 wait
    for one client (REQUESTS_SNDHWM, PROTOCOL.md): draining 10^6 queued jobs makes replies
    at the broker's full rate, and one connection overflows as soon as this process is
    kept off the CPU for a few tens of ms (it happened on the 2-core VM). Spread over
    ``connections`` pipes, each fills that many times slower. A batch of at most 1000 (the
    mark) cannot overflow, and is sent on one connection, as one client would."""
    ctx = zmq.Context(1)
    socks = []
    for _ in range(connections):
        sock = ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            sock.setsockopt(opt, value)
        sock.connect(addr)
        socks.append(sock)
    say("connected")
    end = time.monotonic() + LIFETIME
    while time.monotonic() < end and os.getppid() == parent:
        r, _, _ = select.select([sys.stdin], [], [], 1.0)
        if not r:
            continue
        words = sys.stdin.readline().split()
        if not words or words[0] != "go":
            break
        n, first, used = int(words[1]), int(words[2]), int(words[3])
        shares = [n // used + (1 if k < n % used else 0) for k in range(used)]
        errors: List[str] = []

        def one(sock: zmq.Socket, count: int, base: int) -> None:
            try:
                e2e._loadgen.client(
                    sock, count, count, payload, base, os.urandom(8), e2e._loadgen.MODE_FBC, CLIENT_STALL, parent
                )
            except Exception as exc:  # reported to the parent, which fails the run
                errors.append(str(exc))  # noqa: B023 (the threads are joined in this iteration)

        threads = []
        base = first
        for sock, count in zip(socks, shares):
            if count:
                threads.append(threading.Thread(target=one, args=(sock, count, base), daemon=True))
                base += count
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        say("result " + json.dumps({"n": n, "elapsed": time.monotonic() - t0, "errors": errors}))
    ctx.destroy(linger=0)


def run_depth_worker(addr: str, parent: int, credit: int) -> None:
    """Child: an FBW01 worker that joins paused (READY(0)); on "go N" runs the compiled
    worker (READY(credit)) for exactly N jobs, then pauses again (READY(0)) and says
    "paused". Heartbeats while paused, so the broker keeps it."""
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.DEALER)
    for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, value)
    sock.connect(addr)
    ready0 = [b"", protocol.WORKER_SIGNATURE, protocol.CMD_READY, (0).to_bytes(4, "big")]
    heartbeat = [b"", protocol.WORKER_SIGNATURE, protocol.CMD_HEARTBEAT]
    sock.send_multipart(ready0)
    say("connected")
    end = time.monotonic() + LIFETIME
    last = time.monotonic()
    while time.monotonic() < end and os.getppid() == parent:
        r, _, _ = select.select([sys.stdin], [], [], 0.5)
        if time.monotonic() - last >= WORKER_HEARTBEAT:
            sock.send_multipart(heartbeat)
            last = time.monotonic()
        if not r:
            continue
        words = sys.stdin.readline().split()
        if not words or words[0] != "go":
            break
        res = e2e._loadgen.worker(
            sock, e2e._loadgen.MODE_FBW, credit, WORKER_HEARTBEAT, int(words[1]), -1, parent, LIFETIME
        )
        sock.send_multipart(ready0)
        last = time.monotonic()
        say(f"paused {res['answered']} {res['stopped_by']}")
    ctx.destroy(linger=0)


class DepthRig:
    """A compiled broker process, a paused depth worker, a depth client and a STATS socket."""

    def __init__(self, directory: Path, a: argparse.Namespace, payload: int) -> None:
        self.a = a
        self.run = e2e.Run(directory, argparse.Namespace(transport="ipc"))
        self.ctx = zmq.Context(1)
        self.ctl: Optional[zmq.Socket] = None
        self.payload = payload

    def start(self) -> None:
        a, run = self.a, self.run
        deadline = time.monotonic() + e2e.START_WAIT
        req, work, ans = (run.endpoint(n) for n in ("requests", "workers", "answers"))
        retention = [] if a.depth_retention == "default" else ["--retention", a.depth_retention]
        self.broker = run.start(
            [
                "-m",
                "fastbroker",
                "-v",
                "broker",
                "--core",
                "compiled",
                "--heartbeat",
                str(DEPTH_HEARTBEAT),
                *retention,
                req,
                work,
                ans,
            ],
            "broker",
        )
        run.wait_for_broker(self.broker, "compiled", "compiled", deadline)
        me = str(os.getpid())
        self.worker = run.start(
            ["-m", "bench.scaling", "_depth_worker", work, me, str(a.depth_credit)], "worker", stdin=True
        )
        self.client = run.start(
            ["-m", "bench.scaling", "_depth_client", req, str(self.payload), me, str(a.depth_connections)],
            "client",
            stdin=True,
        )
        self.wlines = e2e.Lines(self.worker, "depth worker")
        self.clines = e2e.Lines(self.client, "depth client")
        for lines in (self.wlines, self.clines):
            if lines.read(deadline) != "connected":
                raise RuntimeError(f"{lines.name} did not connect")
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.connect(req)
        while self.stats()["workers"] < 1:  # the paused worker's READY(0) has been taken
            if time.monotonic() > deadline:
                raise RuntimeError("the depth worker did not join the broker")
            time.sleep(0.01)
        # What one STATS costs the broker, to take off the phases that needed an extra one.
        c0 = cpu_ns(self.broker.pid)
        for _ in range(STATS_CALIBRATION):
            self.stats()
        time.sleep(self.a.settle)
        self.stats_ns = (cpu_ns(self.broker.pid) - c0) / STATS_CALIBRATION

    def stats(self) -> Dict[str, int]:
        assert self.ctl is not None
        self.ctl.send_multipart([protocol.CLIENT_SIGNATURE, protocol.C_STATS, bytes(16)])
        if not self.ctl.poll(10_000):
            raise RuntimeError("no STATS reply from the broker in 10 s")
        frames = self.ctl.recv_multipart()
        if len(frames) != 5 or frames[1] != protocol.R_STATS:
            raise RuntimeError(f"unexpected STATS reply {frames[:3]!r}")
        return protocol.decode_stats(frames[3], frames[4])

    def settle(self, done: Callable[[Dict[str, int]], bool], deadline: float) -> Tuple[int, Dict[str, int], int]:
        """Wait until the broker's CPU clock stands still for --settle-ms and a STATS says
        ``done``; the CPU clock before that STATS, the stats, and how many STATS it took."""
        pid = self.broker.pid
        prev = cpu_ns(pid)
        asked = 0
        while True:
            time.sleep(self.a.settle)
            now = cpu_ns(pid)
            if now == prev:
                s = self.stats()
                asked += 1
                if done(s):
                    return now, s, asked
                now = cpu_ns(pid)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the broker did not settle in time; last stats "
                    f"{ {k: s.get(k) for k in ('queued', 'running', 'answered')} if asked else '?' }"
                )
            if self.broker.poll() is not None:
                raise RuntimeError(f"the broker died:\n{self.run.stderr_of(self.broker)}")
            prev = now

    def brief_stats(self) -> Dict[str, int]:
        """The broker's figures that tell where a phase stuck (for error messages)."""
        try:
            s = self.stats()
        except Exception as e:  # the broker is gone or mute: say so instead
            return {"error": str(e)}  # type: ignore[dict-item]
        return {k: v for k, v in s.items() if not k.startswith("latency") and (v or k in ("queued", "running"))}

    def tell(self, proc, line: str) -> None:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    def cycles(self, depth: int, count: int) -> Dict[str, object]:
        pid = self.broker.pid
        enqueue_ns = drain_ns = 0.0
        extra_stats = 0
        drain_wall = 0.0
        rss0 = memory.smaps_rollup(pid)["Rss"]
        rss_full = rss_drained = 0
        connections = min(self.a.depth_connections, math.ceil(depth / REPLY_MARK))
        for i in range(count):
            deadline = time.monotonic() + self.a.depth_limit
            c0 = cpu_ns(pid)
            self.tell(self.client, f"go {depth} {i * depth} {connections}")
            c1, s, asked = self.settle(lambda s: s["queued"] >= depth, deadline)
            if s["queued"] != depth or s["running"] != 0:
                raise RuntimeError(f"after the enqueue: queued {s['queued']}, running {s['running']}, not {depth}, 0")
            enqueue_ns += c1 - c0 - (asked - 1) * self.stats_ns
            extra_stats += asked - 1
            if i == 0:
                rss_full = memory.smaps_rollup(pid)["Rss"]
            c1 = cpu_ns(pid)
            t1 = time.monotonic()
            self.tell(self.worker, f"go {depth}")
            line = self.wlines.read(deadline)
            if line.split()[:2] != ["paused", str(depth)]:
                raise RuntimeError(f"depth worker said {line!r}; broker stats: {self.brief_stats()}")
            drain_wall += time.monotonic() - t1
            expected = (i + 1) * depth
            c2, s, asked = self.settle(
                lambda s, expected=expected: (
                    s["queued"] == 0 and s["running"] == 0 and s["idle_workers"] == 0 and s["answered"] >= expected
                ),
                deadline,
            )
            if s["answered"] != expected or s["requests"] != expected:
                raise RuntimeError(
                    f"after the drain: answered {s['answered']}, requests {s['requests']}, expected {expected}"
                )
            try:
                line = self.clines.read(min(deadline, time.monotonic() + CLIENT_GRACE))
            except RuntimeError as e:
                raise RuntimeError(
                    f"{e}: the broker answered all {depth} jobs but the client did not get every reply in "
                    f"{CLIENT_GRACE:.0f} s: replies dropped at the requests ROUTER's SNDHWM (1000 per client, "
                    f"PROTOCOL.md)? Try more --depth-connections. Broker stats: {self.brief_stats()}"
                ) from None
            result = json.loads(line[7:]) if line.startswith("result ") else None
            if result is None or result["errors"]:
                raise RuntimeError(f"depth client said {line!r}")
            drain_ns += c2 - c1 - (asked - 1) * self.stats_ns
            extra_stats += asked - 1
            if i == 0:
                rss_drained = memory.smaps_rollup(pid)["Rss"]
        jobs = depth * count
        return {
            "cycles": count,
            "measured_jobs": jobs,
            "enqueue_us_job": enqueue_ns / jobs / 1e3,
            "drain_us_job": drain_ns / jobs / 1e3,
            "total_us_job": (enqueue_ns + drain_ns) / jobs / 1e3,
            "drain_jobs_per_s": jobs / drain_wall if drain_wall else None,
            "broker_rss_per_job": (rss_full - rss0) / depth,
            "broker_rss_before": rss0,
            "broker_rss_full": rss_full,
            "broker_rss_drained": rss_drained,
            "stats_cost_us": self.stats_ns / 1e3,
            "extra_stats": extra_stats,
            "client_connections": connections,
        }

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close(0)
        self.ctx.destroy(linger=0)
        self.run.close()


def depth_cpu(a: argparse.Namespace, payload: int, depth: int) -> Dict[str, object]:
    count = max(1, math.ceil(a.depth_min_jobs / depth))
    with tempfile.TemporaryDirectory(prefix="fb-scaling-") as tmp:
        rig = DepthRig(Path(tmp), a, payload)
        try:
            rig.start()
            return rig.cycles(depth, count)
        except BaseException:
            for proc in rig.run.procs:
                sys.stderr.write(f"--- {proc.args[1:5]} (exit {proc.poll()}):\n{rig.run.stderr_of(proc)}\n")
            raise
        finally:
            rig.close()


def depth_part(a: argparse.Namespace) -> Dict[str, object]:
    rows: List[Dict[str, object]] = []
    for payload in a.payloads:
        seen = set()
        for depth in a.depths:
            n = memory.capped_jobs(depth, payload, a.max_bytes)
            if n in seen:
                continue
            seen.add(n)
            t0 = time.monotonic()
            row: Dict[str, object] = {"payload": payload, "depth": n, "asked_depth": depth, "capped": n != depth}
            row.update(depth_cpu(a, payload, n))
            if a.memory_protocol != "none":
                m = memory.measure("compiled", a.memory_protocol, payload, n, None, a.memory_limit)
                row["memory"] = {
                    "protocol": a.memory_protocol,
                    "rss_per_job": m["rss_per_job"],
                    "malloc_in_use_per_job": m["malloc_in_use_per_job"],
                    "malloc_free_per_job": m["malloc_free_per_job"],
                    "seconds": m["seconds"],
                }
            row["seconds"] = time.monotonic() - t0
            rows.append(row)
            mem = row.get("memory")
            print(
                f"  payload {human(payload):>7} depth {n:>9,}{' (capped)' if row['capped'] else ''}: "
                f"{row['cycles']} cycle(s), µs/job enqueue {row['enqueue_us_job']:.2f} drain "
                f"{row['drain_us_job']:.2f}; broker RSS/job - payload {row['broker_rss_per_job'] - payload:,.0f}"
                + (
                    f"; memory.py RSS/job - payload {mem['rss_per_job'] - payload:,.0f}, malloc/job - payload "
                    f"{mem['malloc_in_use_per_job'] - payload:,.0f}"
                    if mem
                    else ""
                )
                + f" ({row['seconds']:.1f} s)",
                flush=True,
            )
    ratios = []
    for payload in a.payloads:
        mine = sorted((r for r in rows if r["payload"] == payload), key=lambda r: r["depth"])
        for j in range(len(mine)):
            for i in range(j):
                hi, lo = mine[j], mine[i]
                ratios.append(
                    {
                        "payload": payload,
                        "depth": hi["depth"],
                        "vs_depth": lo["depth"],
                        **{k: ratio(hi[k + "_us_job"], lo[k + "_us_job"]) for k in ("enqueue", "drain", "total")},
                    }
                )
    return {"rows": rows, "ratios": ratios}


def report_depth(part: Dict[str, object], a: argparse.Namespace) -> None:
    print()
    ret = "the broker's default" if a.depth_retention == "default" else a.depth_retention + " s"
    print(
        f"### Depth table (compiled core; broker retention {ret}; cycles of enqueue D / drain D until "
        f">= {a.depth_min_jobs:,} jobs measured; D x payload capped at {a.max_bytes / 2**30:g} GiB)"
    )
    print()
    head = [
        "payload",
        "queued jobs (D)",
        "measured jobs",
        "enqueue µs/job",
        "drain µs/job",
        "enqueue + drain µs/job",
        "broker RSS/job − payload",
    ]
    if a.memory_protocol != "none":
        head += [f"memory.py RSS/job − payload ({a.memory_protocol})", "memory.py malloc/job − payload"]
    rows = []
    for r in part["rows"]:
        p = r["payload"]
        cells = [
            human(p),
            f"{r['depth']:,}" + (" (capped)" if r["capped"] else ""),
            f"{r['measured_jobs']:,}" + (f" ({r['cycles']} x {r['depth']:,})" if r["cycles"] > 1 else ""),
            f"{r['enqueue_us_job']:.2f}",
            f"{r['drain_us_job']:.2f}",
            f"{r['total_us_job']:.2f}",
            f"{r['broker_rss_per_job'] - p:,.0f}",
        ]
        if "memory" in r:
            m = r["memory"]
            cells += [f"{m['rss_per_job'] - p:,.0f}", f"{m['malloc_in_use_per_job'] - p:,.0f}"]
        rows.append(cells)
    markdown(head, rows, left=1)
    print()
    print(
        "enqueue: broker CPU (all threads, ns clock) while D SUBMITs (OPT_NO_ACK) arrive and are queued, per "
        "job; drain: while a compiled FBW01 worker takes the D jobs (dispatch + ANSWER + reply to the client), "
        "per job, the queue going D -> 0. Broker RSS/job: the broker process's RSS after the first fill minus "
        "before, per job (a 4 KiB page is 400 B/job at D = 10: noise there). memory.py: a BrokerCore server "
        "process holding D requests (bench/memory.py), RSS and glibc malloc in use, per job; target "
        "<= 300 B beyond the payload."
    )
    if part["ratios"]:
        print()
        print("Depth ratios (per-job broker CPU at the deeper queue / at the shallower one, same payload, same run):")
        print()
        head = ("payload", "depths", "enqueue", "drain", "enqueue + drain")
        rows = [
            (
                human(r["payload"]),
                f"{r['depth']:,} / {r['vs_depth']:,}",
                fmt_ratio(r["enqueue"]),
                fmt_ratio(r["drain"]),
                fmt_ratio(r["total"]),
            )
            for r in part["ratios"]
        ]
        markdown(head, rows)
        print()
        print(
            "(Target: within 1.3x from 10 to 1,000,000 queued. At small D each cycle also pays its per-batch "
            "costs — wake-ups, a READY and a READY(0) — spread over D jobs, so ratios against D = 10 can come "
            "out below 1; the ratio between the two deeper queues shows the queue's own scaling best.)"
        )


# -- command line -------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--payloads",
        type=int_list,
        default=list(DEFAULT_PAYLOADS),
        help="comma-separated payload sizes in bytes, >= 8 (default 16,1024,65536,1048576)",
    )
    p.add_argument(
        "--depths",
        type=int_list,
        default=list(DEFAULT_DEPTHS),
        help="comma-separated queue depths (default 10,10000,1000000)",
    )
    p.add_argument("--tables", default="payload,depth", help="which tables: payload, depth or both (default)")
    p.add_argument("--only", default=",".join(BROKERS), help="payload table brokers: subset of compiled,pure,proxy")
    p.add_argument(
        "--quick",
        action="store_true",
        help="jobs, --pure-max-jobs and --depth-min-jobs / 10, one round (unless --rounds)",
    )
    p.add_argument(
        "--jobs",
        default="",
        help="payload table jobs per run, PAYLOAD=JOBS,... (defaults: 16=50000, 1024=50000, "
        "65536=10000, 1048576=1000; other sizes: 2**30 // payload within 100..50000)",
    )
    p.add_argument("--pure-max-jobs", type=int, default=10_000, help="cap on the pure core's jobs (default 10000)")
    p.add_argument("--rounds", type=int, default=None, help="payload table rounds per broker (default 3, --quick 1)")
    p.add_argument("--window", type=int, default=64, help="requests in flight in the payload table (default 64)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2000,
        help="payload table warm-up jobs, at most a fifth of the run's jobs (default 2000)",
    )
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc", help="payload table transport (ipc)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound of each e2e measured run (default 300)")
    p.add_argument(
        "--depth-min-jobs",
        type=int,
        default=1000,
        help="repeat enqueue/drain cycles at depth D until this many jobs were measured (default 1000)",
    )
    p.add_argument(
        "--depth-retention",
        default="0",
        help="--retention of the depth brokers, seconds, or 'default' (default 0: no kept outcomes, "
        "only the queue grows)",
    )
    p.add_argument(
        "--depth-credit",
        type=int,
        default=1000,
        help="credit of the depth worker (jobs in flight to it while it drains; default 1000)",
    )
    p.add_argument(
        "--depth-connections",
        type=int,
        default=8,
        help="most DEALER connections of the depth client: D is split over ceil(D / 1000) of them, at most "
        "this many (default 8)",
    )
    p.add_argument("--depth-limit", type=float, default=300.0, help="bound of each enqueue/drain cycle, s (300)")
    p.add_argument(
        "--settle-ms",
        type=float,
        default=10.0,
        help="the broker is idle once its CPU clock stood still this long (default 10 ms)",
    )
    p.add_argument(
        "--max-bytes", type=int, default=2 << 30, help="cap on D x payload (default 2 GiB, as bench/memory.py)"
    )
    p.add_argument(
        "--memory-protocol",
        choices=("fbc01", "req", "none"),
        default="fbc01",
        help="bench/memory.py's requests for the memory columns (default fbc01; none: skip)",
    )
    p.add_argument("--memory-limit", type=float, default=300.0, help="bound of each bench/memory.py run, s (300)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    a = p.parse_args(argv)
    if e2e._loadgen is None:
        p.error(f"bench._loadgen does not import ({e2e.LOADGEN_ERROR}); run `make loadgen`")
    a.only = [b.strip() for b in a.only.split(",") if b.strip()]
    if not a.only or any(b not in BROKERS for b in a.only):
        p.error(f"--only: choose from {','.join(BROKERS)}")
    a.tables = [t.strip() for t in a.tables.split(",") if t.strip()]
    if not a.tables or any(t not in ("payload", "depth") for t in a.tables):
        p.error("--tables: payload, depth or payload,depth")
    if not a.payloads or min(a.payloads) < e2e.ID.size:
        p.error(f"--payloads: sizes of at least {e2e.ID.size} bytes (the request id)")
    if not a.depths or min(a.depths) < 1:
        p.error("--depths: at least 1")
    a.depths = sorted(set(a.depths))
    overrides: Dict[int, int] = {}
    for item in filter(None, (x.strip() for x in a.jobs.split(","))):
        k, _, v = item.partition("=")
        overrides[int(k)] = int(v)
    div = 10 if a.quick else 1

    def jobs_for(payload: int) -> int:
        base = overrides.get(payload) or DEFAULT_JOBS.get(payload) or max(100, min(50_000, (1 << 30) // payload))
        return max(100, base // div)

    a.jobs_for = jobs_for
    a.pure_max_jobs = max(100, a.pure_max_jobs // div)
    a.depth_min_jobs = max(1, a.depth_min_jobs // div)
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if a.rounds < 1 or a.window < 1 or a.depth_credit < 1 or a.depth_credit > 65536:
        p.error("--rounds, --window >= 1; --depth-credit 1..65536")
    a.settle = a.settle_ms / 1e3
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_depth_client":
        run_depth_client(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
        return 0
    if argv and argv[0] == "_depth_worker":
        run_depth_worker(argv[1], int(argv[2]), int(argv[3]))
        return 0
    a = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = " ".join(shlex.quote(x) for x in [sys.executable, "-m", "bench.scaling", *argv])
    started = time.monotonic()
    print("command: " + command)
    print(e2e.machine())
    print(
        f"payloads {', '.join(human(p) for p in a.payloads)}; depths {', '.join(f'{d:,}' for d in a.depths)}; "
        f"tables {','.join(a.tables)}",
        flush=True,
    )
    out: Dict[str, object] = {
        "command": command,
        "machine": e2e.machine(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("jobs_for",)},
    }
    out["settings"]["jobs_per_payload"] = {str(p): a.jobs_for(p) for p in a.payloads}
    if "payload" in a.tables:
        out["payload"] = payload_part(a)
    if "depth" in a.tables:
        print("depth runs:", flush=True)
        out["depth"] = depth_part(a)
    print()
    print("command: " + command)
    print(e2e.machine())
    if "payload" in out:
        report_payload(out["payload"], a)
    if "depth" in out:
        report_depth(out["depth"], a)
    out["seconds"] = time.monotonic() - started
    print()
    print(f"({out['seconds']:.0f} s in all)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"figures written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
