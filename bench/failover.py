"""Failover times of DEALER workers (protocol FBW01), measured with real processes.

    python -m bench.failover            (from the repository root)
    python bench/failover.py [--samples-slow N] [--samples-fast N] [--core compiled|pure]

For each broker core and each heartbeat setting (1.0 s / liveness 3, the
defaults, and 0.1 s / liveness 3; broker and workers use the same), it starts a
broker (``python -m fastbroker broker``, tcp on 127.0.0.1) and two worker
processes (``python -m fastbroker worker bench.failover:FailoverWorker``) and
measures:

(a) re-queue delay: a worker holding a job is SIGKILLed; the time from the
    SIGKILL to the other worker starting the job (the broker's attempt timeout
    is 600 s). The victim's connection closes with its process, and the broker
    hears of it from its workers socket's monitor (docs/PROTOCOL.md 4.8), so this
    takes milliseconds; "by silence" gives what it would take by the liveness check
    alone (a hung worker whose connection stays open), between (liveness - 1) and
    (liveness + 1) heartbeats.
(b) resume after a broker restart: the broker is SIGKILLed and started again at
    once on the same endpoints (as a supervisor would); a request is waiting in
    the client's socket. "away" is SIGKILL to the new broker bound (mostly
    Python start-up), "resume" is the new broker bound to a worker that served
    the dead broker starting the request's job, "kill->answer" the whole outage.

Times come from CLOCK_MONOTONIC in every process: workers log each job start to a
file with ``time.monotonic()``. Each figure is the median of its samples, with
min-max when there are several. Every wait is bounded; all processes started
are SIGKILLed at the end, pass or fail. Runs in about 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
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

REPO = Path(__file__).resolve().parent.parent
LOG_ENV = "FB_FAILOVER_LOG"
WAIT = 20.0
"""Bound of every wait for something expected within a few heartbeats."""
HANG_LIMIT = 120.0

ENDPOINTS_RE = re.compile(r"broker on requests=(\S+) workers=(\S+) answers=(\S+) ")


# -- the worker, run in its own processes --------------------------------------------------


def _log(path: str, event: str, payload: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {event} {time.monotonic():.6f} {payload}\n".encode())
    finally:
        os.close(fd)


def _read_log(path: Path) -> List[tuple]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(int(pid), event, float(t), payload) for pid, event, t, payload in (line.split(" ", 3) for line in lines)]


class FailoverWorker(Worker):
    """Payload ``echo-...``: answered at once. Payload ``hang-...``: the first
    process to take it holds it (until killed); a process that sees in the log
    that another one took it before answers at once (it is the rescuer)."""

    def process(self, data: bytes) -> bytes:
        path = os.environ[LOG_ENV]
        payload = data.decode()
        earlier = [pid for pid, event, _, p in _read_log(Path(path)) if event == "start" and p == payload]
        _log(path, "start", payload)
        if payload.startswith("hang-") and not any(pid != os.getpid() for pid in earlier):
            deadline = time.monotonic() + HANG_LIMIT
            while time.monotonic() < deadline:
                time.sleep(0.5)
        return b"-" + data


# -- the measuring side ------------------------------------------------------------------------


class Rig:
    """Processes of one run (a broker and its workers) and their files."""

    def __init__(self, directory: Path, core: str, heartbeat: float, liveness: int) -> None:
        self.directory = directory
        self.core = core
        self.hb_options = ["--heartbeat", str(heartbeat), "--liveness", str(liveness)]
        self.log = directory / "jobs.log"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.env[LOG_ENV] = str(self.log)
        self.procs: List[subprocess.Popen] = []
        self.count = 0
        self.endpoints: Optional[List[str]] = None
        self.broker: Optional[subprocess.Popen] = None
        self.workers: List[subprocess.Popen] = []
        self.context = zmq.Context()
        self.payloads = 0

    def _start(self, args: Sequence[str], name: str) -> subprocess.Popen:
        self.count += 1
        err = self.directory / f"{self.count:02d}-{name}.err"
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastbroker", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
                env=self.env,
                cwd=str(REPO),
                start_new_session=True,
            )
        proc.err_path = err  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_broker(self) -> float:
        """(Re)start the broker on the same endpoints; the time it is bound."""
        addrs = self.endpoints or ["tcp://127.0.0.1:*"] * 3
        self.broker = self._start(
            ["-v", "broker", "--core", self.core, "-T", "600", *self.hb_options, *addrs], "broker"
        )
        deadline = time.monotonic() + WAIT
        while True:
            match = ENDPOINTS_RE.search(self.broker.err_path.read_text(errors="replace"))  # type: ignore[attr-defined]
            if match:
                up = time.monotonic()
                self.endpoints = list(match.groups())
                return up
            if self.broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start: {self.broker.err_path.read_text(errors='replace')}")  # type: ignore[attr-defined]
            time.sleep(0.002)

    def start_worker(self) -> subprocess.Popen:
        assert self.endpoints
        worker = self._start(["worker", "bench.failover:FailoverWorker", self.endpoints[1], *self.hb_options], "worker")
        self.workers.append(worker)
        return worker

    def send(self, payload: str) -> zmq.Socket:
        assert self.endpoints
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        # A request waiting for a restarting broker: retry the connection often, so
        # the client's own reconnection interval (default 100 ms) does not count.
        sock.setsockopt(zmq.RECONNECT_IVL, 5)
        sock.connect(self.endpoints[0])
        sock.send(payload.encode())
        return sock

    def answer(self, sock: zmq.Socket) -> float:
        """Wait for the answer (bounded); the time it arrived."""
        try:
            if not sock.poll(int(WAIT * 1000)):
                raise RuntimeError("no answer within the bound")
            sock.recv()
            return time.monotonic()
        finally:
            sock.close()

    def new_payload(self, kind: str) -> str:
        self.payloads += 1
        return f"{kind}-{self.payloads}"

    def starts(self, payload: str) -> List[tuple]:
        return [(pid, t) for pid, event, t, p in _read_log(self.log) if event == "start" and p == payload]

    def wait_all_serving(self) -> None:
        """Echo requests, one at a time, until each live worker ran one (bounded)."""
        want = {w.pid for w in self.workers if w.poll() is None}
        seen: set = set()
        deadline = time.monotonic() + WAIT
        while not want <= seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {want - seen} never took a job")
            payload = self.new_payload("echo")
            self.answer(self.send(payload))
            seen |= {pid for pid, _ in self.starts(payload)}

    def requeue_sample(self) -> float:
        """(a): SIGKILL the worker holding a job; seconds until the other starts it."""
        payload = self.new_payload("hang")
        sock = self.send(payload)
        deadline = time.monotonic() + WAIT
        while not self.starts(payload):
            if time.monotonic() > deadline:
                raise RuntimeError("no worker took the job")
            time.sleep(0.002)
        victim_pid = self.starts(payload)[0][0]
        victim = next(w for w in self.workers if w.pid == victim_pid)
        killed = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        self.answer(sock)
        victim.wait(WAIT)
        self.workers.remove(victim)
        rescued = [t for pid, t in self.starts(payload) if pid != victim_pid]
        # A replacement, so the next sample again has two workers.
        self.start_worker()
        self.wait_all_serving()
        return rescued[0] - killed

    def restart_sample(self) -> tuple:
        """(b): SIGKILL the broker, restart it at once; (away, resume, kill->answer)."""
        assert self.broker
        before = {w.pid for w in self.workers}
        payload = self.new_payload("echo")
        killed = time.monotonic()
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(WAIT)
        sock = self.send(payload)  # waits in the REQ socket for the new broker
        up = self.start_broker()
        answered = self.answer(sock)
        ((pid, started),) = self.starts(payload)
        if pid not in before:
            raise RuntimeError("the job ran in a process that did not serve the old broker")
        self.wait_all_serving()  # every worker is back before the next sample
        return up - killed, started - up, answered - killed

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
        self.context.destroy(linger=0)


def measure(core: str, heartbeat: float, liveness: int, samples: int) -> Dict[str, List[float]]:
    with tempfile.TemporaryDirectory(prefix="fb-failover-") as tmp:
        rig = Rig(Path(tmp), core, heartbeat, liveness)
        try:
            rig.start_broker()
            rig.start_worker()
            rig.start_worker()
            rig.wait_all_serving()
            figures: Dict[str, List[float]] = {"requeue": [], "away": [], "resume": [], "outage": []}
            for _ in range(samples):
                figures["requeue"].append(rig.requeue_sample())
            for _ in range(samples):
                away, resume, outage = rig.restart_sample()
                figures["away"].append(away)
                figures["resume"].append(resume)
                figures["outage"].append(outage)
            return figures
        finally:
            rig.close()


def _fmt(values: List[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3f}"
    return f"{med:.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fastbroker import _select

    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--core", choices=["compiled", "pure"], action="append", help="core(s) to measure (default: both)"
    )
    parser.add_argument("--samples-slow", type=int, default=1, help="samples per figure at heartbeat 1.0 s (default 1)")
    parser.add_argument("--samples-fast", type=int, default=3, help="samples per figure at heartbeat 0.1 s (default 3)")
    args = parser.parse_args(argv)
    cores = args.core or ["compiled", "pure"]
    settings = [(1.0, 3, args.samples_slow), (0.1, 3, args.samples_fast)]

    t0 = time.monotonic()
    rows = []
    for core in cores:
        try:
            _select.load(core)
        except ImportError as exc:
            print(f"{core} core not available ({exc}); skipped", file=sys.stderr)
            continue
        for heartbeat, liveness, samples in settings:
            figures = measure(core, heartbeat, liveness, samples)
            by_silence = f"{(liveness - 1) * heartbeat:.1f}-{(liveness + 1) * heartbeat:.1f}"
            rows.append(
                (
                    core,
                    f"{heartbeat:.1f}",
                    str(liveness),
                    str(samples),
                    _fmt(figures["requeue"]),
                    by_silence,
                    _fmt(figures["away"]),
                    _fmt(figures["resume"]),
                    _fmt(figures["outage"]),
                )
            )
            print(
                f"  measured {core} heartbeat={heartbeat:.1f} in {time.monotonic() - t0:.1f} s so far", file=sys.stderr
            )

    header = (
        "core",
        "heartbeat",
        "liveness",
        "n",
        "(a) requeue",
        "by silence",
        "(b) away",
        "(b) resume",
        "(b) kill->answer",
    )
    widths = (
        [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    )
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print("Failover with real processes (seconds; median, min-max over n samples; tcp on 127.0.0.1)")
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print("(a) SIGKILL of a worker holding a job -> the other worker starts it (broker -T 600).")
    print("(b) broker SIGKILL, restarted at once on the same endpoints: away = until bound,")
    print("    resume = bound -> an old worker starts the waiting job, kill->answer = whole outage.")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # `python bench/failover.py`: the workers import this file as bench.failover.
        sys.path.insert(0, str(REPO))
    sys.exit(main())
