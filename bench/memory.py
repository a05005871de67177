"""Broker memory per queued job, beyond its payload (issue 6).

    python -m bench.memory [--core compiled|pure] [--jobs N ...] [--payload BYTES ...]
                           [--protocol req,fbc01,fbc02] [--compare] [--zero-copy-recv 0|1]

For every (protocol, payload, jobs) a fresh server process binds a ROUTER on ipc
(the broker's HWMs: SNDHWM/RCVHWM 1000) and holds every request it gets, with no
worker. A client thread in this process connects (DEALER), sends one ping that
leaves nothing behind, and the server's RSS and glibc malloc figures are taken
("before": the connection and its buffers exist already); then the client sends the
N requests, the server is polled until it holds N, and the figures are taken again.
Per job = (after - before) / N, minus the payload, for:

* RSS (``/proc/PID/smaps_rollup``), what the operating system charges;
* malloc in use (glibc ``mallinfo2``: ``uordblks + hblkhd``), what was allocated
  and not freed: RSS minus this is allocator slack (free chunks inside the heap).

Servers (``--core`` picks the broker's core; ``--compare`` adds two baselines):

* ``compiled`` / ``pure``: a ``BrokerCore`` (timeout none, retention 0) whose
  requests ROUTER is bound on ipc, run with ``core.run(-1, 0.01)``;
* ``frames``: a plain pyzmq ROUTER keeping each request's ``recv_multipart(copy=False)``
  list of ``zmq.Frame`` objects in a list (what libzmq + pyzmq cost, zero copy);
* ``bytes``: the same with ``copy=True`` (lists of ``bytes``).

Protocols: ``req`` sends ``[b"", payload]`` (a REQ client's request as a DEALER
sends it), ``fbc01`` sends ``[FBC01, SUBMIT, 16-byte id, options (OPT_NO_ACK),
payload]``, ``fbc02`` the same requests FBC02_BATCH to an FBC02 SUBMIT (one header
frame, then the payloads; the core keeps each payload frame and none of the header).
Only the brokers' cores speak FBC01 and FBC02: the baselines run ``req`` alone. The total payload of one run is capped at ``--max-bytes`` (2 GiB): a
capped job count is shown as such. At 10 jobs the figures are mostly page
granularity and noise (a 4 KiB page is 400 bytes per job); they are shown anyway.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import zmq

from fastbroker import protocol
from fastbroker.client.protocol import submit_batch_messages

SERVERS = ("compiled", "pure", "frames", "bytes")
PROTOCOLS = ("req", "fbc01", "fbc02")
FBC02_BATCH = 256
"""Requests in one FBC02 SUBMIT of the fbc02 protocol (a client's batch under load)."""
NO_ACK_OPTIONS = bytes([protocol.OPT_NO_ACK]) + bytes(protocol.OPTIONS_SIZE - 1)
PING = b"PING"
HWM = 1000  # the broker's REQUESTS_SNDHWM / REQUESTS_RCVHWM
ZMQ_ZERO_COPY_RECV = 74


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def malloc_info() -> Dict[str, int]:
    m = _libc.mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "heap": m.arena + m.hblkhd, "free": m.fordblks, "mmapped": m.hblkhd}


def smaps_rollup(pid: int) -> Dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


# -- the server process -------------------------------------------------------------


def serve(kind: str, endpoint: str, control: str, zero_copy: Optional[int]) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, HWM)
    router.setsockopt(zmq.RCVHWM, HWM)
    if zero_copy is not None:
        router.setsockopt(ZMQ_ZERO_COPY_RECV, zero_copy)
    router.bind(endpoint)
    ctl = ctx.socket(zmq.REP)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.bind(control)
    core = None
    kept: List[list] = []
    if kind in ("compiled", "pure"):
        if kind == "compiled":
            from fastbroker import _core as module
        else:
            from fastbroker import _core_py as module
        workers = ctx.socket(zmq.ROUTER)
        answers = ctx.socket(zmq.PULL)
        for s in (workers, answers):
            s.setsockopt(zmq.LINGER, 0)
        workers.bind(endpoint + "-workers")
        answers.bind(endpoint + "-answers")
        core = module.BrokerCore(router, workers, answers, None, None, retention=0.0)

        def held() -> int:
            return core.stats()["queued"]

        def step() -> None:
            core.run(-1, 0.01)
    else:
        copy = kind == "bytes"
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)

        def held() -> int:
            return len(kept)

        def step() -> None:
            if not poller.poll(10):
                return
            for _ in range(4096):
                try:
                    frames = router.recv_multipart(zmq.DONTWAIT, copy=copy)
                except zmq.Again:
                    return
                if len(frames) == 3 and bytes(frames[2]) == PING:
                    router.send_multipart([frames[0], b"", PING])
                else:
                    kept.append(frames)

    while True:
        step()
        try:
            command = ctl.recv(zmq.DONTWAIT)
        except zmq.Again:
            continue
        if command == b"held":
            ctl.send_string(str(held()))
        elif command == b"malloc":
            ctl.send_json(malloc_info())
        elif command == b"quit":
            ctl.send(b"bye")
            break
    if core is not None:
        core.close()
    kept.clear()
    ctx.destroy(linger=0)


# -- the client and the measurement ----------------------------------------------------


class Server:
    def __init__(self, kind: str, directory: Path, zero_copy: Optional[int]) -> None:
        self.endpoint = f"ipc://{directory}/requests"
        control = f"ipc://{directory}/control"
        argv = [sys.executable, "-m", "bench.memory", "--serve", kind, self.endpoint, control]
        if zero_copy is not None:
            argv += ["--zero-copy-recv", str(zero_copy)]
        self.proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent)
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.REQ)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.RCVTIMEO, 30_000)
        self.ctl.connect(control)

    def ask(self, command: bytes) -> bytes:
        self.ctl.send(command)
        return self.ctl.recv()

    def held(self) -> int:
        return int(self.ask(b"held"))

    def figures(self) -> Dict[str, int]:
        import json

        m = json.loads(self.ask(b"malloc"))
        s = smaps_rollup(self.proc.pid)
        return {
            "rss": s["Rss"],
            "anon": s.get("Anonymous", 0),
            "malloc_in_use": m["in_use"],
            "malloc_heap": m["heap"],
            "malloc_free": m["free"],
        }

    def wait_held(self, n: int, limit: float) -> None:
        deadline = time.monotonic() + limit
        while True:
            got = self.held()
            if got >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"server holds {got} of {n} requests after {limit} s")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.ctl.setsockopt(zmq.RCVTIMEO, 5000)
            self.ask(b"quit")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.ctx.destroy(linger=0)


def measure(kind: str, wire: str, payload: int, jobs: int, zero_copy: Optional[int], limit: float) -> Dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fb-mem-") as tmp:
        server = Server(kind, Path(tmp), zero_copy)
        try:
            ctx = zmq.Context()
            client = ctx.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            client.setsockopt(zmq.SNDHWM, HWM)
            client.connect(server.endpoint)
            # The ping: the connection (and libzmq's buffers for it) exists at "before".
            if kind in ("compiled", "pure"):
                client.send_multipart([protocol.CLIENT_SIGNATURE, protocol.C_STATS, bytes(16)])  # STATS: nothing kept
            else:
                client.send_multipart([b"", PING])
            if not client.poll(int(limit * 1000)):
                raise RuntimeError("no reply to the ping")
            client.recv_multipart()
            time.sleep(0.2)
            before = server.figures()
            body = b"x" * payload
            t0 = time.perf_counter()

            def send() -> None:
                if wire == "req":
                    for _ in range(jobs):
                        client.send_multipart([b"", body], copy=payload < 4096)
                elif wire == "fbc01":
                    for i in range(jobs):
                        client.send_multipart(
                            [protocol.CLIENT_SIGNATURE, protocol.C_SUBMIT, b"mem-id%010d" % i, NO_ACK_OPTIONS, body],
                            copy=payload < 4096,
                        )
                else:
                    for first in range(0, jobs, FBC02_BATCH):
                        batch = range(first, min(jobs, first + FBC02_BATCH))
                        for message in submit_batch_messages(
                            (b"mem-id%010d" % i, NO_ACK_OPTIONS, [body]) for i in batch
                        ):
                            client.send_multipart(message, copy=payload < 4096)

            sender = threading.Thread(target=send)
            sender.start()
            sender.join()
            server.wait_held(jobs, limit)
            elapsed = time.perf_counter() - t0
            time.sleep(0.2)
            after = server.figures()
            client.close(0)
            ctx.term()
        finally:
            server.close()
    row: Dict[str, object] = {
        "server": kind,
        "protocol": wire,
        "payload": payload,
        "jobs": jobs,
        "seconds": round(elapsed, 2),
    }
    for k in before:
        row[k + "_per_job"] = (after[k] - before[k]) / jobs
    row["rss_before"] = before["rss"]
    row["rss_after"] = after["rss"]
    return row


def capped_jobs(jobs: int, payload: int, max_bytes: int) -> int:
    """The job count of a run: ``jobs``, lowered so that the total payload stays within
    ``max_bytes`` (at least 1). bench/scaling.py caps its depths the same way."""
    return max(1, min(jobs, max_bytes // max(payload, 1)))


def human(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def report(rows: List[Dict[str, object]]) -> None:
    print()
    print(
        "| server | protocol | payload | jobs | RSS/job | RSS/job - payload | malloc in use/job - payload | "
        "malloc free-chunk slack/job | send+ingest s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["payload"]
        jobs = f"{r['jobs']:,}" + (" (capped)" if r.get("capped") else "")
        print(
            f"| {r['server']} | {r['protocol']} | {human(p)} | {jobs} | {r['rss_per_job']:,.0f} | "
            f"{r['rss_per_job'] - p:,.0f} | {r['malloc_in_use_per_job'] - p:,.0f} | "
            f"{r['malloc_free_per_job']:,.0f} | {r['seconds']} |"
        )
    print()
    print(
        "RSS/job - payload, target <= 300 B. malloc in use: glibc mallinfo2 uordblks + hblkhd "
        "(allocated, not freed); slack: fordblks (free chunks kept in the heap)."
    )


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", choices=("compiled", "pure"), default="compiled")
    p.add_argument("--compare", action="store_true", help="also the plain pyzmq ROUTER baselines (frames, bytes)")
    p.add_argument("--servers", help="comma-separated servers (overrides --core/--compare): " + ",".join(SERVERS))
    p.add_argument("--jobs", type=int, nargs="+", default=[10, 10_000, 1_000_000])
    p.add_argument("--payload", type=int, nargs="+", default=[16, 1024, 65536, 1 << 20])
    p.add_argument("--protocol", default="req,fbc01", help="comma-separated: req, fbc01, fbc02")
    p.add_argument("--max-bytes", type=int, default=2 << 30, help="cap on the total payload of one run")
    p.add_argument(
        "--zero-copy-recv",
        type=int,
        choices=(0, 1),
        default=None,
        help="set ZMQ_ZERO_COPY_RECV (option 74) on the server's ROUTER",
    )
    p.add_argument("--limit", type=float, default=300.0, help="seconds a run may take")
    p.add_argument("--serve", nargs=3, metavar=("KIND", "ENDPOINT", "CONTROL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1], args.serve[2], args.zero_copy_recv)
        return 0
    servers = args.servers.split(",") if args.servers else [args.core] + (["frames", "bytes"] if args.compare else [])
    protocols = [p for p in args.protocol.split(",") if p]
    for name in servers:
        if name not in SERVERS:
            raise SystemExit(f"unknown server {name!r}")
    for wire in protocols:
        if wire not in PROTOCOLS:
            raise SystemExit(f"unknown protocol {wire!r}: choose from {', '.join(PROTOCOLS)}")
    rows = []
    for wire in protocols:
        for payload in args.payload:
            seen = set()
            for jobs in args.jobs:
                n = capped_jobs(jobs, payload, args.max_bytes)
                if n in seen:
                    continue
                seen.add(n)
                for kind in servers:
                    if kind in ("frames", "bytes") and wire != "req":
                        continue  # the baselines keep frames whatever they are: req only
                    row = measure(kind, wire, payload, n, args.zero_copy_recv, args.limit)
                    row["capped"] = n != jobs
                    rows.append(row)
                    print(
                        f"{kind:8} {wire:5} payload {payload:>8} jobs {n:>8}: "
                        f"RSS/job {row['rss_per_job']:10,.0f}  -payload {row['rss_per_job'] - payload:9,.0f}  "
                        f"malloc/job -payload {row['malloc_in_use_per_job'] - payload:9,.0f}  ({row['seconds']} s)",
                        flush=True,
                    )
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
