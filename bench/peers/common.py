"""What the peer benchmarks share: the workload's sizes, the skip-or-fail rule for a
missing peer, the processes (servers and workers: start with bounded readiness, stop
with bounded waits) and the CPU of whole process trees.

Sizes (environment, defaults in brackets): FASTBROKER_PEERS_N [20000] jobs per measured
round, FASTBROKER_PEERS_ROUNDS [1] measured rounds, FASTBROKER_PEERS_RTT [200] single-job
round trips for the p50.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from bench import e2e, proctree
from bench.conftest import _env_int

PEERS_N = _env_int("FASTBROKER_PEERS_N", 20_000)
PEERS_ROUNDS = _env_int("FASTBROKER_PEERS_ROUNDS", 1)
RTT_SAMPLES = _env_int("FASTBROKER_PEERS_RTT", 200)

PAYLOADS = [b"%016d" % i for i in range(PEERS_N)]
"""The jobs: 16 bytes each, all different (a peer whose results come back unordered sorts them)."""
TEXTS = [p.decode() for p in PAYLOADS]
"""The same 16 characters as str, for the peers whose default serializer is JSON (Dramatiq, Celery)."""

START_LIMIT = 60.0
"""Bound of each start-up: a server ready, a peer's workers all connected."""
STOP_LIMIT = 15.0
"""Bound of a graceful stop (SIGTERM) before SIGKILL."""
RTT_LIMIT = 30.0
"""Bound of one single-job round trip."""
SLOWEST_RATE = 20.0
"""Jobs/s below which a round counts as stuck (see round_limit)."""


def round_limit(jobs: int) -> float:
    """Bound of one round of `jobs` jobs (submit all, collect all)."""
    return 60.0 + jobs / SLOWEST_RATE


def bench_timeout(jobs: int, rounds: int, rtts: int) -> float:
    """pytest-timeout's bound of one peer benchmark: start-up, round trips, rounds, stop."""
    return 2 * START_LIMIT + rtts * 2.0 + rounds * round_limit(jobs) + 4 * STOP_LIMIT


# -- present or not ------------------------------------------------------------------

REQUIRED_ENV = "FASTBROKER_PEERS_REQUIRED"
"""Set to 1 by ``make bench-peers``: a missing peer fails the run instead of skipping."""
SKIP_REASON = "peer benchmark needs"
"""How every skip of a missing peer starts."""
HOW_TO_INSTALL = (
    "run `make bench-peers` (it installs the packages and the servers), or `pip install '.[bench-peers]'` "
    "and `apt-get install redis-server nats-server`"
)
SERVER_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin")


def server_path(name: str) -> Optional[str]:
    """The server's executable: on PATH, or where Debian puts it (nats-server is in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SERVER_DIRS:
        path = Path(directory, name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def script(name: str) -> str:
    """A console script of this Python's environment (``celery``, ``dramatiq``, ``rq``):
    the command a user of the venv types."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name) or name


DISTRIBUTIONS = {"nats": "nats-py"}
"""The PyPI name of a module whose name differs."""


def missing(modules: Sequence[str], servers: Sequence[str]) -> List[str]:
    """What of a peer is not installed: Python packages (by their PyPI name), then servers."""
    absent = [DISTRIBUTIONS.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    return absent + [f"{s} (Debian package)" for s in servers if server_path(s) is None]


def require(modules: Sequence[str], servers: Sequence[str] = ()) -> None:
    """Skip the benchmark when a piece of its peer is missing, saying how to install it;
    fail instead when the run asked for the peers (FASTBROKER_PEERS_REQUIRED=1)."""
    absent = missing(modules, servers)
    if not absent:
        return
    reason = f"{SKIP_REASON} {', '.join(absent)}: {HOW_TO_INSTALL}"
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{REQUIRED_ENV}=1 (make bench-peers) but the {reason}", pytrace=False)
    pytest.skip(reason)


# -- processes -----------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int):
    """preexec_fn: the child gets `sig` when this process goes away (Linux), so nothing
    outlives a killed pytest."""

    def set_signal() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except (OSError, AttributeError):
            pass

    return set_signal


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    run: e2e.Run,
    argv: Sequence[str],
    name: str,
    env: Optional[Dict[str, str]] = None,
    python: bool = True,
    parent_death: int = signal.SIGTERM,
) -> subprocess.Popen:
    """Start `argv` (after this Python when `python`) in a session of its own, stdout and
    stderr to a log in the run's directory (``run.stderr_of`` reads it), the repository
    importable. The run kills it (and its process group) when it closes, pass or fail."""
    run.count += 1
    log = run.dir / f"{run.count:02d}-{name}.log"
    child_env = dict(run.env, PYTHONUNBUFFERED="1", **(env or {}))
    command = [sys.executable, *argv] if python else list(argv)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=str(e2e.REPO),
            start_new_session=True,
            preexec_fn=_die_with_parent(parent_death),
        )
    proc.err_path = log  # type: ignore[attr-defined]
    run.procs.append(proc)
    return proc


def wait_for_log(proc: subprocess.Popen, text: str, deadline: float, count: int = 1) -> None:
    """Wait (until `deadline`) for `text` to be in the process's log `count` times."""
    while True:
        log = _whole_log(proc)
        if log.count(text) >= count:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}) before saying {text!r}:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not say {text!r} {count} time(s) in time:\n{log[-3000:]}")
        time.sleep(0.02)


def _whole_log(proc: subprocess.Popen) -> str:
    try:
        return Path(proc.err_path).read_text(errors="replace")  # type: ignore[attr-defined]
    except OSError:
        return ""


def wait_until(check, what: str, deadline: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll `check()` (every 20 ms) until it is true; fail at `deadline` or if `proc` exits."""
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen, limit: float = STOP_LIMIT) -> None:
    """SIGTERM to the process's group (a graceful stop: pools stop their children), a
    bounded wait, then SIGKILL to whatever of its tree is left."""
    below = proctree.descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(limit)


# -- servers ---------------------------------------------------------------------------


def start_redis(run: e2e.Run) -> tuple:
    """Debian's redis-server on a free loopback port, its files in the run's directory,
    otherwise its defaults (no configuration file). (url, process)."""
    port = free_port()
    data = run.dir / "redis"
    data.mkdir()
    argv = [server_path("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port)]
    proc = start(run, [*argv, "--dir", str(data)], "redis-server", python=False, parent_death=signal.SIGKILL)
    wait_for_log(proc, "Ready to accept connections", time.monotonic() + START_LIMIT)
    return f"redis://127.0.0.1:{port}/0", proc


def start_nats(run: e2e.Run) -> tuple:
    """Debian's nats-server with JetStream on a free loopback port, its store in the
    run's directory. (url, process)."""
    port = free_port()
    data = run.dir / "nats"
    data.mkdir()
    argv = [server_path("nats-server") or "nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(data)]
    proc = start(run, argv, "nats-server", python=False, parent_death=signal.SIGKILL)
    wait_for_log(proc, "Server is ready", time.monotonic() + START_LIMIT)
    return f"nats://127.0.0.1:{port}", proc


# -- CPU -----------------------------------------------------------------------------------


def _cpu_with_reaped(pid: int) -> float:
    """utime + stime of `pid` and cutime + cstime (its children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")": field 3 is fields[0]; utime, stime, cutime, cstime are fields 14-17
    return sum(int(x) for x in fields[11:15]) / e2e.CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU seconds of the process tree under `pid` (`pid` included): every live process,
    all threads, plus what its exited children used (a child that RQ forked per job
    counts in its parent once reaped). Processes gone between the walk and the read are
    left out."""
    total = 0.0
    for member in [pid, *proctree.descendants(pid)]:
        try:
            total += _cpu_with_reaped(member)
        except (OSError, ValueError, IndexError):
            pass
    return total


class TreeMeter:
    """CPU of this process (the client: every thread) and of named process trees
    between start() and per_job(n): microseconds per job by role."""

    def __init__(self, roots: Dict[str, Sequence[int]]) -> None:
        self.roots = roots
        self.start()

    def _trees(self) -> Dict[str, float]:
        return {name: sum(tree_cpu(pid) for pid in pids) for name, pids in self.roots.items()}

    def start(self) -> None:
        self.t0 = time.process_time()
        self.c0 = self._trees()

    def per_job(self, jobs: int) -> Dict[str, float]:
        figures = {"client": time.process_time() - self.t0}
        figures.update({name: seconds - self.c0[name] for name, seconds in self._trees().items()})
        return {name: round(seconds / jobs * 1e6, 1) for name, seconds in figures.items()}
