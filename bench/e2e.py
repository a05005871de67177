"""End-to-end throughput: the same load through three brokers, in one run.

    python -m bench.e2e [--jobs N] [--window W] [--payload BYTES]
                        [--transport ipc|tcp] [--only compiled,pure,proxy]
                        [--rounds R] [--clients N] [--workers N] [--warmup N]
                        [--loadgen compiled|python] [--protocol auto|fbc|fbc2|req] [--pin]
                        (from the repository root)

Brokers, each in its own process, one after the other (``--rounds`` times, interleaved:
compiled, pure, proxy, compiled, ...; the table gives the median of each figure):

* ``compiled``: ``python -m fastbroker broker --core compiled`` (no ``-T``/``-t``);
* ``pure``:     the same with ``--core pure``;
* ``proxy``:    ``zmq.proxy(ROUTER frontend, DEALER backend)`` in a process of its
  own: libzmq forwarding only, no queue, no bookkeeping. A lower bound on what
  any broker in front of libzmq can cost.
* ``proxy-fbc`` (not in the default ``--only``; needs ``--loadgen compiled``): the
  same proxy, with clients that add to the REQ envelope the three small frames of an
  FBC01 SUBMIT (``[b"", b"FBC01", b"\x01", id(16), payload]``, echoed back whole),
  so that it moves as many frames per job as fastbroker with FBC01 clients and FBW01
  workers (24 frames through the proxy's sockets per job against fastbroker's 23;
  plain ``proxy``: 12). It tells how much of fastbroker's cost over ``proxy`` is
  libzmq's per-frame work rather than the core's bookkeeping.

Load, in processes of their own (by default 1 client process + 1 worker process,
for a 2-core machine). ``--loadgen compiled`` (the default when ``bench/_loadgen``
is built: ``make loadgen``) runs the same clients and workers as C loops without
the GIL (``bench/_loadgen.pyx``); with it, fastbroker's clients speak FBC01
(``SUBMIT`` with ``OPT_NO_ACK``, a 16-byte id from a counter; ``--protocol req``
keeps the REQ envelope below, the only one ``zmq.proxy`` can carry; ``--protocol fbc2``:
FBC02 clients, SUBMIT batches of what the window lets in, and FBW02 workers, which
answer each TASK of k jobs with one ANSWER; the proxy still moves one job per message).
``--loadgen python`` is the pyzmq version described here:

* a client is a DEALER socket sending ``[b"", payload]`` with ``--window``
  requests in flight; the payload starts with the request id (8 bytes), which
  indexes the send time (``time.perf_counter_ns``) for the latency. After a
  warm-up (not measured) it waits for the parent's "go", sends ``--jobs``
  (divided between the clients) and checks every answer (right id, right
  payload, each once, no abort);
* a fastbroker worker is a raw FBW01 DEALER in a tight pyzmq loop: READY with
  credit 65536, then ``ANSWER [b"", b"FBW01", b"\\x03", task_id, payload]`` for
  each TASK (not ``fastbroker.Worker``, which is far too slow to be a load
  generator); it sends a HEARTBEAT only if it has sent nothing for 0.5 s;
* a proxy worker is a DEALER on the backend that sends each message
  ``[client id, b"", payload]`` back unchanged.

CPU: ``utime + stime`` from ``/proc/<pid>/stat`` (all threads, so libzmq's I/O
thread too) of the broker, client and worker processes, read just before the
"go" and just after the last client reported; reported per job for the broker
and for the load generators (client, worker). ``--pin``: the broker process on
CPU 0, the load generators on the other CPUs (set before exec, so every thread). Resolution is one clock tick
(usually 10 ms): keep ``--jobs`` large enough for the window to last a second
or more. Every wait is bounded; every process started is SIGKILLed at the end
of its broker's run, pass or fail, and children exit by themselves if this
process goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import zmq

from fastbroker import protocol

REPO = Path(__file__).resolve().parent.parent
BROKERS = ("compiled", "pure", "proxy", "proxy-fbc")
DEFAULT_BROKERS = ("compiled", "pure", "proxy")
START_WAIT = 20.0
"""Bound of each start-up (broker bound, worker connected, client warmed up)."""
STALL = 10.0
"""A client that receives nothing for this long gives up (the run fails)."""
CHILD_LIFETIME = 900.0
"""A child process exits by itself after this long, whatever happens."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_WINDOW = 256
"""Most requests a proxy client keeps in flight: one message per reply, and zmq.proxy's
frontend ROUTER drops replies at its SNDHWM (1000; with 900 in flight, 396 of 400,000
replies were lost here and the client stalled)."""

SIG = protocol.WORKER_SIGNATURE
READY, TASK, ANSWER = protocol.CMD_READY, protocol.CMD_TASK, protocol.CMD_ANSWER
HEARTBEAT, DISCONNECT = protocol.CMD_HEARTBEAT, protocol.CMD_DISCONNECT
BIG_CREDIT = struct.pack(">I", protocol.MAX_CREDIT)
ID = struct.Struct("<Q")

try:
    from bench import _loadgen
except ImportError as _e:  # not built: make loadgen
    _loadgen = None
    LOADGEN_ERROR = str(_e)
else:
    LOADGEN_ERROR = ""


# -- children ------------------------------------------------------------------------------


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_proxy(front_addr: str, back_addr: str) -> None:
    ctx = zmq.Context(1)
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
    front.bind(front_addr)
    back.bind(back_addr)
    _say("bound " + front.getsockopt_string(zmq.LAST_ENDPOINT) + " " + back.getsockopt_string(zmq.LAST_ENDPOINT))
    # zmq.proxy blocks for ever: the parent SIGKILLs this process (and the
    # lifetime alarm bounds it if the parent cannot).
    signal.alarm(int(CHILD_LIFETIME))
    zmq.proxy(front, back)


def child_dealer(addr: str) -> zmq.Socket:
    """A load generator's DEALER, connected to `addr`: no high-water marks (the window
    or the credit bounds what is in flight), linger 0."""
    sock = zmq.Context(1).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(addr)
    return sock


ORIGINAL_SOCKETS = 64
"""Sockets of one original-protocol worker process: each a REQ worker (one job at a time)."""


def run_worker(kind: str, addr: str, parent: int, loadgen: str = "python", answers: str = "") -> None:
    if kind == "orig":
        assert _loadgen is not None, LOADGEN_ERROR
        socks = [child_dealer(addr) for _ in range(ORIGINAL_SOCKETS)]
        push = zmq.Context(1).socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(answers)
        _say("connected")  # each socket sends its "ready" itself, first thing
        _loadgen.original_worker(socks, push, 0, parent, CHILD_LIFETIME)
        return
    sock = child_dealer(addr)
    fbw = kind == "fbw"
    if loadgen == "compiled":
        assert _loadgen is not None, LOADGEN_ERROR
        _say("connected")  # the compiled worker sends its READY itself, first thing
        mode = {"fbw": _loadgen.MODE_FBW, "fbw2": _loadgen.MODE_FBW2}.get(kind, _loadgen.MODE_ECHO)
        _loadgen.worker(sock, mode, 1 << 16, 0.5, 0, -1, parent, CHILD_LIFETIME)
        return
    if fbw:
        sock.send_multipart([b"", SIG, READY, BIG_CREDIT])
    _say("connected")
    recv, send = sock.recv_multipart, sock.send_multipart
    again = zmq.Again
    noblock = zmq.NOBLOCK
    poll = sock.poll
    last_send = time.monotonic()
    end = last_send + CHILD_LIFETIME
    answered = 0
    while True:
        if not poll(200):
            now = time.monotonic()
            if now > end or _orphaned(parent):
                return
            if fbw and now - last_send > 0.5:
                send([b"", SIG, HEARTBEAT])
                last_send = now
            continue
        # Drain what is there (bounded), answering each message.
        for _ in range(10000):
            try:
                msg = recv(noblock)
            except again:
                break
            if not fbw:
                send(msg)  # [client id, b"", payload] back through the proxy
                answered += 1
                continue
            cmd = msg[2]
            if cmd == TASK:
                send([b"", SIG, ANSWER, msg[3], *msg[4:]])
                answered += 1
            elif cmd == DISCONNECT:
                send([b"", SIG, READY, BIG_CREDIT])
            # HEARTBEAT from the broker: nothing to do.
        last_send = time.monotonic()


def percentiles(lat: Sequence[int], n: int) -> Dict[str, float]:
    """p50/p99/p99.9/max in µs of n sorted latencies in ns."""
    return {
        "p50_us": lat[n // 2] / 1e3,
        "p99_us": lat[min(n - 1, (n * 99) // 100)] / 1e3,
        "p999_us": lat[min(n - 1, (n * 999) // 1000)] / 1e3,
        "max_us": lat[n - 1] / 1e3,
    }


def pipelined(
    sock: zmq.Socket,
    n: int,
    window: int,
    send_request: Callable[[int], None],
    reply_index: Callable[[List[bytes]], Optional[int]],
    parent: int,
) -> Dict[str, object]:
    """Keep `window` requests in flight on `sock` until n have their reply: the Python
    clients' loop. send_request(i) sends request i (0 <= i < n); reply_index(msg) checks
    a reply and returns the i it answers, or None for a message that answers nothing
    (an ACCEPTED). Every i must be answered once. Returns start, end and latencies."""
    sent_at = [0] * n
    lat = [0] * n
    done = bytearray(n)
    recv, poll = sock.recv_multipart, sock.poll
    clock = time.perf_counter_ns
    again, noblock = zmq.Again, zmq.NOBLOCK
    sent = received = 0

    def send_next() -> None:
        nonlocal sent
        sent_at[sent] = clock()
        send_request(sent)
        sent += 1

    t0 = time.monotonic()
    last_progress = t0
    while received < n:
        while sent < n and sent - received < window:
            send_next()
        if not poll(1000):
            if time.monotonic() - last_progress > STALL or _orphaned(parent):
                raise RuntimeError(f"stalled: {received}/{n} replies, {sent} sent")
            continue
        for _ in range(2 * window + 2):
            try:
                msg = recv(noblock)
            except again:
                break
            now = clock()
            i = reply_index(msg)
            if i is None:
                continue
            if not 0 <= i < sent or done[i]:
                raise RuntimeError(f"unexpected reply for request {i}: {msg[:3]!r}")
            done[i] = 1
            lat[i] = now - sent_at[i]
            received += 1
            # Keep the window full as replies come in.
            if sent < n:
                send_next()
        last_progress = time.monotonic()
    t1 = time.monotonic()
    lat.sort()
    return {"start": t0, "end": t1, "n": n, **percentiles(lat, n)}


def warm_then_measure(phase: Callable[[int, int], Dict[str, object]], warmup: int, jobs: int) -> None:
    """A client child's life: an unmeasured warm-up phase, "warm" to the parent, then
    on the parent's "go" (bounded) the measured phase, whose figures go back as JSON."""
    if warmup:
        phase(1 << 40, warmup)
    _say("warm")
    r, _, _ = select.select([sys.stdin], [], [], START_WAIT * 3)
    if not r or sys.stdin.readline().strip() != "go":
        raise RuntimeError("no go")
    _say("result " + json.dumps(phase(0, jobs)))


def run_client(
    addr: str,
    jobs: int,
    window: int,
    payload: int,
    warmup: int,
    parent: int,
    loadgen: str = "python",
    protocol: str = "req",
) -> None:
    sock = child_dealer(addr)
    pad = b"x" * (payload - ID.size)
    signal.alarm(int(CHILD_LIFETIME))

    def compiled_phase(first: int, n: int) -> Dict[str, object]:
        assert _loadgen is not None, LOADGEN_ERROR
        mode = {
            "fbc": _loadgen.MODE_FBC,
            "fbc2": _loadgen.MODE_FBC2,
            "req-fbc-frames": _loadgen.MODE_REQ_FBC_FRAMES,
        }.get(protocol, _loadgen.MODE_REQ)
        r = _loadgen.client(sock, n, window, payload, first, os.urandom(8), mode, STALL, parent)
        lat = memoryview(r["latencies_ns"]).cast("q")
        return {"start": r["start"], "end": r["end"], "n": n, **percentiles(lat, n)}

    def phase(first: int, n: int) -> Dict[str, object]:
        if loadgen == "compiled":
            return compiled_phase(first, n)
        send, pack, unpack = sock.send_multipart, ID.pack, ID.unpack_from

        def reply_index(msg: List[bytes]) -> int:
            if len(msg) != 2 or msg[0] != b"" or len(msg[1]) != payload or msg[1][ID.size :] != pad:
                raise RuntimeError(f"bad answer {msg[:3]!r}")
            return unpack(msg[1])[0] - first

        return pipelined(sock, n, window, lambda i: send([b"", pack(first + i) + pad]), reply_index, parent)

    warm_then_measure(phase, warmup, jobs)


# -- parent --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")": field 3 is fields[0]; utime, stime are fields 14, 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Lines:
    """Line reader on a child's stdout with a deadline."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc, self.name, self.buf = proc, name, b""

    def read(self, deadline: float) -> str:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: timed out waiting for a line")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited (status {self.proc.wait(5)}): see its stderr above")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class Run:
    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.dir, self.args = directory, args
        self.procs: List[subprocess.Popen] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.env.pop("FASTBROKER_PURE", None)
        self.count = 0

    def start(
        self,
        argv: Sequence[str],
        name: str,
        stdin: bool = False,
        cpus: Optional[Sequence[int]] = None,
        env: Optional[Dict[str, str]] = None,
    ) -> subprocess.Popen:
        self.count += 1
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        err = self.dir / f"{self.count:02d}-{name}.err"
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=f,
                env=self.env if env is None else {**self.env, **env},
                cwd=str(REPO),
                start_new_session=True,
                preexec_fn=pin,
            )
        proc.err_path = err  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stderr_of(self, proc: subprocess.Popen) -> str:
        try:
            return proc.err_path.read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
        except OSError:
            return ""

    def endpoint(self, name: str) -> str:
        if self.args.transport == "ipc":
            return f"ipc://{self.dir}/{name}"
        return "tcp://127.0.0.1:*"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout):
                if stream:
                    try:
                        stream.close()
                    except OSError:
                        pass

    def wait_for_broker(self, bproc: subprocess.Popen, name: str, core: str, deadline: float) -> str:
        """Wait for a `fastbroker -v broker` child's start line; returns its stderr so far."""
        while True:
            text = self.stderr_of(bproc)
            if "broker on requests=" in text:
                break
            if bproc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} broker did not start:\n{text}")
            time.sleep(0.01)
        if f"core={core})" not in text:
            raise RuntimeError(f"the broker does not run the {core} core:\n{text}")
        return text

    def prepare(self, broker: str) -> Callable[[], Dict[str, object]]:
        """Start `broker` and its load and warm up; returns what runs the measured jobs
        (once) and returns the figures."""
        a = self.args
        me = str(os.getpid())
        req, work = self.endpoint("requests"), self.endpoint("workers")
        deadline = time.monotonic() + START_WAIT
        bcpus, lcpus = a.cpus
        if broker.startswith("proxy"):
            bproc = self.start(["-m", "bench.e2e", "_proxy", req, work], broker, cpus=bcpus)
            line = Lines(bproc, broker).read(deadline)
            _, req, work = line.split()
            worker_kind = "echo"
        else:
            ans = self.endpoint("answers")
            bproc = self.start(
                ["-m", "fastbroker", "-v", "broker", "--core", broker, req, work, ans], broker, cpus=bcpus
            )
            text = self.wait_for_broker(bproc, broker, broker, deadline)
            info = text.split("broker on requests=", 1)[1].split()
            req, work, ans = info[0], info[1].split("=", 1)[1], info[2].split("=", 1)[1]
            worker_kind = {"fbc2": "fbw2", "orig": "orig"}.get(a.protocol, "fbw")
        workers = [
            self.start(
                [
                    "-m",
                    "bench.e2e",
                    "_worker",
                    worker_kind,
                    work,
                    me,
                    a.loadgen,
                    *([ans] if worker_kind == "orig" else []),
                ],
                f"worker{i}",
                cpus=lcpus,
            )
            for i in range(a.workers)
        ]
        for i, w in enumerate(workers):
            if Lines(w, f"worker{i}").read(deadline) != "connected":
                raise RuntimeError("worker did not connect")
        share = [a.jobs // a.clients + (1 if i < a.jobs % a.clients else 0) for i in range(a.clients)]
        warmup = max(0, min(a.warmup, a.jobs))
        protocol = {"proxy": "req", "proxy-fbc": "req-fbc-frames"}.get(broker, a.protocol)
        clients = [
            self.start(
                [
                    "-m",
                    "bench.e2e",
                    "_client",
                    req,
                    str(n),
                    str(min(a.window, PROXY_WINDOW) if broker.startswith("proxy") else a.window),
                    str(a.payload),
                    str(warmup),
                    me,
                    a.loadgen,
                    protocol,
                ],
                f"client{i}",
                stdin=True,
                cpus=lcpus,
            )
            for i, n in enumerate(share)
        ]
        readers = [Lines(c, f"client{i}") for i, c in enumerate(clients)]
        wait_warm(readers)
        pids = {"broker": [bproc.pid], "client": [c.pid for c in clients], "worker": [w.pid for w in workers]}
        return lambda: self._go(broker, protocol, bproc, clients, readers, pids)

    def measure(self, broker: str) -> Dict[str, object]:
        """Start `broker` and its load, warm up, then measure one run of the jobs."""
        return self.prepare(broker)()

    def _go(
        self,
        broker: str,
        protocol: str,
        bproc: subprocess.Popen,
        clients: List[subprocess.Popen],
        readers: List[Lines],
        pids: Dict[str, List[int]],
    ) -> Dict[str, object]:
        a = self.args
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        wall0 = time.monotonic()
        results = go_and_collect(clients, readers, a.max_seconds)
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        wall = time.monotonic() - wall0
        if bproc.poll() is not None:
            raise RuntimeError(f"the {broker} broker died:\n{self.stderr_of(bproc)}")
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        jobs = sum(r["n"] for r in results)
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
        return {
            "broker": broker,
            "jobs": jobs,
            "elapsed": elapsed,
            "rate": jobs / elapsed,
            # with several clients: the worst client's percentiles
            "p50_us": max(r["p50_us"] for r in results),
            "p99_us": max(r["p99_us"] for r in results),
            "p999_us": max(r["p999_us"] for r in results),
            "protocol": protocol,
            "cpu": cpu,
            "wall": wall,
        }


@contextlib.contextmanager
def temporary_run(args: argparse.Namespace, prefix: str = "fb-e2e-", dir: Optional[str] = None) -> Iterator[Run]:
    """A Run in a temporary directory of its own, closed (its children killed) at the
    end; on an error, the stderr of every child that failed is printed first."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=dir) as tmp:
        run = Run(Path(tmp), args)
        try:
            yield run
        except BaseException:
            for proc in run.procs:
                if proc.poll() is not None and proc.returncode != 0:
                    sys.stderr.write(f"--- {proc.args[1:4]} exited {proc.returncode}:\n{run.stderr_of(proc)}\n")
            raise
        finally:
            run.close()


def wait_warm(readers: Sequence[Lines]) -> None:
    """Every client child has sent its warm-up requests and says "warm"."""
    warm_deadline = time.monotonic() + START_WAIT + 60
    for r in readers:
        if r.read(warm_deadline) != "warm":
            raise RuntimeError("client did not warm up")


def go_and_collect(clients: Sequence[subprocess.Popen], readers: Sequence[Lines], max_seconds: float) -> List[dict]:
    """Start the measured run of every client child at once; their results."""
    for c in clients:
        c.stdin.write(b"go\n")  # type: ignore[union-attr]
        c.stdin.flush()  # type: ignore[union-attr]
    results = []
    run_deadline = time.monotonic() + max_seconds
    for r in readers:
        line = r.read(run_deadline)
        if not line.startswith("result "):
            raise RuntimeError(f"client said {line!r}")
        results.append(json.loads(line[7:]))
    return results


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: nproc={nproc}, CPU {model}; load average {load}\n"
        f"Python {platform.python_version()} ({sys.executable}), pyzmq {zmq.pyzmq_version()}, "
        f"libzmq {zmq.zmq_version()}, {platform.system()} {platform.release()}"
    )


def aggregate(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Median of each figure over a broker's rounds."""
    med = statistics.median
    return {
        "broker": runs[0]["broker"],
        "rounds": len(runs),
        "rate": med(r["rate"] for r in runs),
        "rate_min": min(r["rate"] for r in runs),
        "rate_max": max(r["rate"] for r in runs),
        "p50_us": med(r["p50_us"] for r in runs),
        "p99_us": med(r["p99_us"] for r in runs),
        "p999_us": med(r["p999_us"] for r in runs),
        "protocol": runs[0]["protocol"],
        "cpu_job": {k: med(r["cpu"][k] / r["jobs"] for r in runs) for k in ("broker", "client", "worker")},
        "cpu_pct": {k: med(r["cpu"][k] / r["wall"] * 100 for r in runs) for k in ("broker", "client", "worker")},
    }


def report(results: List[Dict[str, object]], args: argparse.Namespace) -> None:
    aggs = [aggregate([r for r in results if r["broker"] == b]) for b in args.only]
    head = (
        "broker",
        "client protocol",
        "jobs/s (median)",
        "jobs/s min-max",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "broker CPU µs/job",
        "client CPU µs/job",
        "worker CPU µs/job",
        "broker CPU %",
        "client CPU %",
        "worker CPU %",
    )
    rows = []
    for a in aggs:
        rows.append(
            (
                a["broker"],
                a["protocol"],
                f"{a['rate']:,.0f}",
                f"{a['rate_min']:,.0f}-{a['rate_max']:,.0f}",
                f"{a['p50_us']:,.0f}",
                f"{a['p99_us']:,.0f}",
                f"{a['p999_us']:,.0f}",
                f"{a['cpu_job']['broker'] * 1e6:.1f}",
                f"{a['cpu_job']['client'] * 1e6:.1f}",
                f"{a['cpu_job']['worker'] * 1e6:.1f}",
                f"{a['cpu_pct']['broker']:.0f}",
                f"{a['cpu_pct']['client']:.0f}",
                f"{a['cpu_pct']['worker']:.0f}",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print(f"median over {args.rounds} round(s) per broker (rounds interleaved), {args.loadgen} load generators:")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for row in rows:
        print(
            "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
        )
    print(
        f"(CPU % = CPU seconds / wall seconds of the measured window, 100 % = one core; "
        f"CPU µs/job = CPU seconds of the broker / all clients / all workers over the window, per job; "
        f"p50/p99/p99.9 of the request round trip seen by the client; /proc tick = {1e3 / CLK_TCK:.0f} ms)"
    )
    by = {a["broker"]: a for a in aggs}
    ratios = []
    for x, y in (
        ("compiled", "pure"),
        ("compiled", "proxy"),
        ("pure", "proxy"),
        ("compiled", "proxy-fbc"),
        ("proxy-fbc", "proxy"),
    ):
        if x in by and y in by:
            ax, ay = by[x], by[y]
            cx, cy = ax["cpu_job"]["broker"], ay["cpu_job"]["broker"]
            ratios.append(
                f"{x}/{y}: jobs/s {ax['rate'] / ay['rate']:.2f}x, "
                f"p50 {ax['p50_us'] / ay['p50_us']:.2f}x, p99 {ax['p99_us'] / ay['p99_us']:.2f}x, "
                f"p99.9 {ax['p999_us'] / ay['p999_us']:.2f}x, "
                f"broker CPU/job {cx / cy if cy else float('inf'):.2f}x"
            )
    if ratios:
        print("ratios of the medians (same load, same run):")
        for line in ratios:
            print("  " + line)


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20000, help="measured requests per broker (default 20000)")
    p.add_argument("--window", type=int, default=64, help="requests in flight per client (default 64)")
    p.add_argument("--payload", type=int, default=16, help="payload bytes, >= 8 (default 16)")
    p.add_argument(
        "--transport",
        choices=("ipc", "tcp"),
        default="ipc",
        help="ipc (in a temporary directory, default) or tcp on 127.0.0.1",
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_BROKERS),
        help="comma-separated subset of compiled,pure,proxy,proxy-fbc (default compiled,pure,proxy)",
    )
    p.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--warmup", type=int, default=2000, help="unmeasured requests per client first (default 2000)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measurements per broker, interleaved; the table gives medians (default 3)",
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound of each measured run (default 300)")
    p.add_argument(
        "--loadgen",
        choices=("compiled", "python"),
        default=None,
        help="load generators: compiled (bench/_loadgen, default when built: make loadgen) or python",
    )
    p.add_argument(
        "--protocol",
        choices=("auto", "fbc", "fbc2", "req", "orig"),
        default="auto",
        help="fastbroker clients: FBC01, FBC02 with FBW02 workers, the original protocol of 2010 (REQ "
        "envelope, REQ workers answering on PUSH; these three need --loadgen compiled) or the REQ "
        "envelope with FBW01 workers; auto: fbc with compiled load generators, else req. The proxy "
        "always carries req",
    )
    p.add_argument(
        "--pin", action="store_true", help="pin the broker to CPU 0 and the load generators to the other CPUs"
    )
    args = p.parse_args(argv)
    if args.loadgen is None:
        args.loadgen = "compiled" if _loadgen is not None else "python"
        if _loadgen is None:
            print(
                f"note: compiled load generators not built ({LOADGEN_ERROR}); using the Python ones "
                f"(build them with `make loadgen` or `.venv/bin/python bench/build_loadgen.py`)"
            )
    elif args.loadgen == "compiled" and _loadgen is None:
        p.error(f"--loadgen compiled: bench._loadgen does not import ({LOADGEN_ERROR}); run `make loadgen`")
    if args.window > PROXY_WINDOW:
        print(
            f"note: --window {args.window}: zmq.proxy's frontend ROUTER has SNDHWM 1000 per client and drops "
            f"replies beyond it, so its clients keep {PROXY_WINDOW} in flight"
            + (
                "; fastbroker's FBC01 and REQ clients meet its REQUESTS_SNDHWM the same way and may stall"
                if args.protocol != "fbc2"
                else " (FBC02 replies go many to a message)"
            )
        )
    if args.protocol == "auto":
        args.protocol = "fbc" if args.loadgen == "compiled" else "req"
    elif args.protocol in ("fbc", "fbc2", "orig") and args.loadgen != "compiled":
        p.error(f"--protocol {args.protocol} needs --loadgen compiled")
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cpus) < 2:
            p.error("--pin needs 2 CPUs or more")
        args.cpus = ([cpus[0]], cpus[1:])
    else:
        args.cpus = (None, None)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [b for b in args.only if b not in BROKERS]
    if bad or not args.only:
        p.error(f"--only: unknown broker(s) {bad}; choose from {','.join(BROKERS)}")
    if "proxy-fbc" in args.only and args.loadgen != "compiled":
        p.error("--only proxy-fbc needs --loadgen compiled")
    if args.payload < ID.size:
        p.error(f"--payload must be at least {ID.size} (the request id)")
    if args.jobs < args.clients or args.window < 1 or args.rounds < 1 or args.clients < 1 or args.workers < 1:
        p.error("--jobs >= --clients >= 1, --window, --workers, --rounds >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_proxy":
        run_proxy(argv[1], argv[2])
        return 0
    if argv and argv[0] == "_worker":
        run_worker(argv[1], argv[2], int(argv[3]), *argv[4:6])
        return 0
    if argv and argv[0] == "_client":
        run_client(argv[1], *(int(x) for x in argv[2:7]), *argv[7:9])
        return 0

    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("command: " + " ".join(shlex.quote(x) for x in [sys.executable, "-m", "bench.e2e", *argv]))
    print(machine())
    print(
        f"load: {args.jobs} jobs/broker, window {args.window} x {args.clients} client process(es), "
        f"{args.workers} worker process(es), payload {args.payload} B, {args.transport}, "
        f"warm-up {args.warmup} jobs/client"
    )
    proto = {
        "fbc": "FBC01 SUBMIT with OPT_NO_ACK",
        "fbc2": "FBC02 SUBMIT batches with OPT_NO_ACK, FBW02 workers",
        "orig": f"the 2010 protocol: REQ envelope, REQ workers ({ORIGINAL_SOCKETS} sockets a process) answering on PUSH",
    }.get(args.protocol, 'REQ envelope [b"", payload]')
    pinned = (
        f"pinned: broker on CPU {args.cpus[0]}, load generators on CPUs {args.cpus[1]}" if args.pin else "not pinned"
    )
    print(
        f"load generators: {args.loadgen}; fastbroker clients speak {args.protocol} ({proto}), "
        f"the proxy's req; {pinned}"
    )
    results: List[Dict[str, object]] = []
    for rnd in range(1, args.rounds + 1):
        for broker in args.only:
            with temporary_run(args) as run:
                r = run.measure(broker)
            results.append(r)
            print(
                f"  round {rnd} {broker:8}: {r['jobs']} jobs in {r['elapsed']:.3f} s = {r['rate']:,.0f} jobs/s, "
                f"p50/p99/p99.9 {r['p50_us']:,.0f}/{r['p99_us']:,.0f}/{r['p999_us']:,.0f} µs, "
                f"CPU µs/job broker {r['cpu']['broker'] / r['jobs'] * 1e6:.1f}, "
                f"client {r['cpu']['client'] / r['jobs'] * 1e6:.1f}, "
                f"worker {r['cpu']['worker'] / r['jobs'] * 1e6:.1f}",
                flush=True,
            )
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
