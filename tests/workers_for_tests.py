"""The Worker classes that the tests run in real worker processes, and what those
processes need: the job log they write and the original 2010 peers.

Importable as ``workers_for_tests`` (the ``subprocess_env`` fixture puts tests/ on
PYTHONPATH), so ``fastbroker worker workers_for_tests:Echo ...`` runs these classes.
The test side's helpers (reading the job log, starting processes, ...) are in rigs.py.

Every worker here appends one line per event to the file named by FB_TEST_LOG
(when set): ``PID EVENT MONOTONIC_TIME PAYLOAD``. ``time.monotonic`` is
CLOCK_MONOTONIC, the same clock in every process, and each line is one O_APPEND
write, so lines from several processes never mix. Tests read the file to see
which process ran which job and how many times (``rigs.read_log``).

The "original" peers at the end speak the 2010 protocol with plain pyzmq sockets,
without any fastbroker class: they are Python 3 ports of the original
testworker.py/worker.py and testclient.py. ``python -m workers_for_tests
original-worker WORKERS_ADDR ANSWERS_ADDR DROP_RATE SEED`` runs the worker.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import zmq

from fastbroker import ReqWorker, Worker

LOG_ENV = "FB_TEST_LOG"
EXTRA_DELAY_ENV = "FB_TEST_EXTRA_DELAY"
HANG_LIMIT = 120.0
"""A hanging job gives up after this long, in case a test's teardown failed to kill it."""


# -- the event log -------------------------------------------------------------


def log_event(event: str, payload: bytes) -> None:
    """Append ``PID EVENT TIME PAYLOAD`` to $FB_TEST_LOG (nothing if unset)."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    text = payload.decode("ascii", "backslashreplace").replace(" ", "_").replace("\n", "_")
    line = f"{os.getpid()} {event} {time.monotonic():.6f} {text}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# -- Worker subclasses -----------------------------------------------------------
# Each job behaviour is a mixin used twice: on a ReqWorker (original REQ/PUSH
# protocol: Echo, Slow, Hang, Dropper) and on a DEALER Worker (FBW01:
# DealerEcho, DealerSlow, DealerHang, DealerFailer).


class _EchoJob:
    """Answers b"-" + data at once."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        log_event("done", data)
        return b"-" + data


class _SlowJob:
    """Payload ``SECONDS:TAG``: sleeps SECONDS (plus $FB_TEST_EXTRA_DELAY, which
    makes the whole process a slow worker), then answers b"-" + data."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        seconds = float(data.split(b":", 1)[0])
        time.sleep(seconds + float(os.environ.get(EXTRA_DELAY_ENV, "0")))  # the job's length is the point
        log_event("done", data)
        return b"-" + data


class _HangJob:
    """Takes a job and never answers it: waits to be killed (SIGTERM does not
    stop it either: the worker finishes its job in hand first)."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        deadline = time.monotonic() + HANG_LIMIT
        while time.monotonic() < deadline:
            time.sleep(0.5)  # nothing to wait for but the kill: hanging is the point
        return b"-" + data


GATE_ENV = "FB_TEST_GATE"


class _GatedJob:
    """Payload ``SECONDS:TAG``: when TAG starts with "gated" and $FB_TEST_GATE
    names a file, waits until that file exists (the test opens the gate by
    creating it; bounded by HANG_LIMIT); then sleeps SECONDS and answers
    b"-" + data. Lets a test hold jobs in a worker for exactly as long as it
    needs, whatever the machine's speed."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        gate = os.environ.get(GATE_ENV)
        if gate and data.split(b":", 1)[1].startswith(b"gated"):
            deadline = time.monotonic() + HANG_LIMIT
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)  # the pace of a bounded wait for a file the test (another process) creates
        time.sleep(float(data.split(b":", 1)[0]))  # the job's length is the point
        log_event("done", data)
        return b"-" + data


class _SpinJob:
    """Payload ``SECONDS:TAG``: keeps the CPU busy in Python code (holding the
    GIL but for the interpreter's switches) for SECONDS, then answers b"-" + data."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        end = time.monotonic() + float(data.split(b":", 1)[0])
        n = 0
        while time.monotonic() < end:
            n += sum(range(200))
        log_event("done", data)
        return b"-" + data


class _GilHoldJob:
    """Payload ``SECONDS:TAG``: holds the GIL for SECONDS without running Python code,
    as a C extension that never releases it does: libc's sleep() called through
    ctypes.PyDLL, which keeps the GIL for the call. Then answers b"-" + data."""

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        ctypes.PyDLL(None).sleep(int(float(data.split(b":", 1)[0])))
        log_event("done", data)
        return b"-" + data


class Dropped(Exception):
    pass


class _DropJob:
    """Fails every job: a ReqWorker leaves it unanswered (it times out), a
    DEALER Worker reports FAILED (the broker retries it at once)."""

    Dropped = Dropped

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        raise Dropped(data)


class Echo(_EchoJob, ReqWorker):
    """ReqWorker: answers b"-" + data at once."""


class Slow(_SlowJob, ReqWorker):
    """ReqWorker: ``SECONDS:TAG`` sleeps, then answers b"-" + data."""


class Hang(_HangJob, ReqWorker):
    """ReqWorker: never answers."""


class Dropper(_DropJob, ReqWorker):
    """ReqWorker: takes every job and drops it (no answer), then asks for the next one."""


class DealerEcho(_EchoJob, Worker):
    """DEALER Worker: answers b"-" + data at once."""


class DealerSlow(_SlowJob, Worker):
    """DEALER Worker: ``SECONDS:TAG`` sleeps, then answers b"-" + data (heartbeats go on)."""


class DealerHang(_HangJob, Worker):
    """DEALER Worker: never answers (but keeps heartbeating)."""


class DealerFailer(_DropJob, Worker):
    """DEALER Worker: raises on every job, so it reports FAILED."""


class DealerGated(_GatedJob, Worker):
    """DEALER Worker: ``SECONDS:gated...`` waits for the $FB_TEST_GATE file; sleeps SECONDS, answers."""


class DealerSpin(_SpinJob, Worker):
    """DEALER Worker: ``SECONDS:TAG`` spins the CPU in Python for SECONDS, then answers."""


class DealerGilHolder(_GilHoldJob, Worker):
    pass


class DiesAtOnce(Worker):
    """A worker process that exits with status 3 as soon as it runs (for the pool's back-off)."""

    def run(self) -> None:
        log_event("run", b"")
        os._exit(3)


class NotAWorker:
    """A class that is not a worker subclass (for the CLI's MODULE:CLASS check)."""

    def __init__(self, *args: object) -> None:
        pass


class DealerSlowStart(DealerEcho):
    """DEALER Worker that logs "building" and takes a while to construct (a stop
    signal can land while it is being built)."""

    def __init__(self, *args, **kwargs):
        log_event("building", b"")
        time.sleep(1.0)  # a slow constructor is the point
        super().__init__(*args, **kwargs)


# -- cancellation (test_worker_cancel.py, test_worker_disconnect.py) ---------------

GATE_DIR_ENV = "FB_TEST_GATE_DIR"
JOB_LIMIT = 30.0
"""A gated or polling CancelProbe job gives up after this long, in case a test's teardown failed."""


class JobCancelled(Exception):
    """What a polling job raises when it sees its cancellation."""


class CancelProbe(Worker):
    """Payload ``KIND:TAG``, logging "start" (and "cancelled-at-start" if
    ``cancelled()`` is already True then, which it must never be):

    - ``echo``: answers b"-" + data at once;
    - ``gate``: waits for the file $FB_TEST_GATE_DIR/TAG, without polling
      ``cancelled()``; then logs "saw-cancel" if ``cancelled()`` is True, "done",
      and answers b"-" + data;
    - ``poll``/``raise``: polls ``cancelled()`` every 5 ms; when it turns True, logs
      "saw-cancel" and returns b"stopped:" + data (``poll``) or raises
      JobCancelled (``raise``). Without a cancellation it answers after JOB_LIMIT.
    """

    def process(self, data: bytes) -> bytes:
        log_event("start", data)
        if self.cancelled():
            log_event("cancelled-at-start", data)
        kind, tag = data.split(b":", 1)
        deadline = time.monotonic() + JOB_LIMIT
        if kind == b"gate":
            gate = Path(os.environ[GATE_DIR_ENV]) / tag.decode()
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.005)  # the pace of a bounded wait for a file the test creates (maybe in another process)
            if self.cancelled():
                log_event("saw-cancel", data)
        elif kind in (b"poll", b"raise"):
            while time.monotonic() < deadline:
                if self.cancelled():
                    log_event("saw-cancel", data)
                    if kind == b"raise":
                        raise JobCancelled(data.decode())
                    return b"stopped:" + data
                time.sleep(0.005)  # polling cancelled() every 5 ms is the behaviour under test
        log_event("done", data)
        return b"-" + data


# -- the many-core pool (test_manycore.py) ---------------------------------------------

MEET_LIMIT = 10.0
"""A meet job stops waiting for its partner after this long (it then still answers)."""


class PidWorker(Worker):
    """Answers ``PID START END PAYLOAD``: the worker process's pid and the job's start
    and end (time.monotonic). A payload ``meet:DIR:TAG`` marks its start with a
    file DIR/TAG, then waits until DIR holds 2 marks (bounded by MEET_LIMIT)."""

    def process(self, data: bytes) -> bytes:
        start = time.monotonic()
        if data.startswith(b"meet:"):
            _, where, tag = data.decode().split(":", 2)
            Path(where, tag).touch()
            deadline = start + MEET_LIMIT
            while len(os.listdir(where)) < 2 and time.monotonic() < deadline:
                time.sleep(0.002)  # the pace of a bounded wait for the partner's file, made in another process
        return f"{os.getpid()} {start:.6f} {time.monotonic():.6f} ".encode() + data


# -- the original 2010 peers, plain pyzmq -----------------------------------------


def original_worker(requests_addr: str, answers_addr: str, drop_rate: float = 0.0, seed: int = 0) -> None:
    """testworker.TestWorker(worker.Worker).run(), ported to Python 3: REQ asks
    with b"requesting task", the task is [task_id, payload...], the answer
    task[:1] + [b"-" + payload] is PUSHed; a share of jobs is dropped (not
    answered) as the original test worker did. Runs until killed."""
    rng = random.Random(seed)
    context = zmq.Context(1)
    requests = context.socket(zmq.REQ)
    requests.connect(requests_addr)
    replies = context.socket(zmq.PUSH)
    replies.connect(answers_addr)
    while True:
        requests.send(b"requesting task")
        task = requests.recv_multipart()
        data = b"".join(task[1:])  # functools.reduce(lambda a, b: a + b, request)
        log_event("start", data)
        if rng.random() < drop_rate:
            log_event("drop", data)
            continue
        replies.send_multipart(task[:1] + [b"-" + data])


class OriginalTestClient(threading.Thread):
    """testclient.TestClient ported to Python 3: a REQ socket sends str(n) for
    n in id*100 .. id*100+count-1 and receives one frame; b"" means failure.
    The only change: each wait is bounded (poll) so a test cannot hang.
    Results: list of (sent, answer) in ``self.results``; ``self.error`` if any."""

    def __init__(self, context: zmq.Context, address: str, id: int, count: int = 100, wait: float = 30.0) -> None:
        super().__init__(name=f"original-client-{id}")
        self.context = context
        self.id = id
        self.count = count
        self.wait = wait
        self.results: List[tuple] = []
        self.error: Optional[BaseException] = None
        self.sock = context.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def run(self) -> None:
        try:
            for data in range(self.id * 100, self.id * 100 + self.count):
                sent = str(data).encode("ascii")
                self.sock.send(sent)
                if not self.sock.poll(int(self.wait * 1000)):
                    raise TimeoutError(f"client {self.id}: no answer to {sent!r} within {self.wait} s")
                self.results.append((sent, self.sock.recv()))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.sock.close()


def main(argv: Sequence[str]) -> int:
    if len(argv) == 5 and argv[0] == "original-worker":
        original_worker(argv[1], argv[2], float(argv[3]), int(argv[4]))
        return 0
    print(
        "usage: python -m workers_for_tests original-worker WORKERS_ADDR ANSWERS_ADDR DROP_RATE SEED", file=sys.stderr
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
