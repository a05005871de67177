"""DEALER workers (protocol FBW01) and the broker as real processes, with a short
heartbeat: a broker SIGKILLed and restarted (with idle workers, and with a worker
holding a job), a worker SIGKILLed mid-job, a job far longer than the heartbeat,
credit, REQ/PUSH and DEALER workers side by side, and SIGTERM to a worker holding
two jobs while others are queued. (test_cli.py has the simpler process cases:
SIGTERM during a job, FAILED retried at once, reconnection, pool restarts.)

Broker and workers run ``python -m fastbroker ... --heartbeat 0.1 --liveness 3``
(the same on both sides): a peer silent for 0.3 s is taken for dead. Endpoints are
tcp on 127.0.0.1 (ports picked by the system, read from the broker's "broker on"
log line) or ipc in the test's temp dir. Workers log each job's start and end in a
file (see workers_for_tests), with CLOCK_MONOTONIC times comparable to the test's
``time.monotonic()``; the broker's counters come from its "broker stopped:" log
line after SIGTERM.

Figures measured on the way (re-queue delay, resume time) are printed and stored
with ``record_property``; ``pytest -rP`` shows them. The assertions on them are
generous bounds (10x the expected figure): speed belongs to bench/failover.py.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import pytest
import zmq

from rigs import Event, Processes, concurrent_requests, read_log, request, runs, wait_until

from workers_for_tests import GATE_ENV, LOG_ENV

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""

HEARTBEAT = 0.1
LIVENESS = 3
WINDOW = HEARTBEAT * LIVENESS
"""Silence after which a peer is dead (0.3 s)."""
HB_OPTIONS = ("--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS))

ENDPOINTS_RE = re.compile(r"broker on requests=(\S+) workers=(\S+) answers=(\S+) .*core=(\w+)\)")
SUMMARY_RE = re.compile(r"broker stopped: (.*)")


class RunningBroker(NamedTuple):
    proc: object
    requests: str
    workers: str
    answers: str
    up_at: float  # time.monotonic() when the test saw its "broker on" line

    @property
    def endpoints(self) -> List[str]:
        return [self.requests, self.workers, self.answers]


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "jobs.log"


def start_broker(
    procs: Processes, transport: str, core_name: str, *options: str, addrs: Optional[Sequence[str]] = None
) -> RunningBroker:
    """A broker process with the short heartbeat; `addrs` binds given endpoints
    (a restart on the same ones), else tcp port * or ipc files in the temp dir.
    -vv: it logs each message it drops, with the reason."""
    if addrs is None:
        if transport == "ipc":
            addrs = [f"ipc://{procs.directory}/{name}" for name in ("req", "wrk", "ans")]
        else:
            addrs = ["tcp://127.0.0.1:*"] * 3
    proc = procs.start(["-vv", "broker", "--core", core_name, *HB_OPTIONS, *options, *addrs], "broker")

    def endpoints():
        if proc.poll() is not None:
            pytest.fail(f"the broker exited with {proc.returncode}\n{procs.output()}")
        return ENDPOINTS_RE.search(proc.stderr_path.read_text(errors="replace"))

    match = wait_until(endpoints, timeout=WAIT, interval=0.005, message="the broker's 'broker on' log line")
    up_at = time.monotonic()
    assert match.group(4) == core_name, "the broker process runs another core than the one under test"
    return RunningBroker(proc, match.group(1), match.group(2), match.group(3), up_at)


def start_dealer(
    procs: Processes,
    broker: RunningBroker,
    cls: str,
    log_path,
    name: str,
    credit: int = 1,
    env: Optional[Dict[str, str]] = None,
):
    """A DEALER worker process (FBW01) with the broker's heartbeat; answers on the same socket."""
    args = ["-v", "worker", f"workers_for_tests:{cls}", broker.workers, *HB_OPTIONS, "--credit", str(credit)]
    return procs.start(args, name, env={LOG_ENV: str(log_path), **(env or {})})


def start_req_worker(procs: Processes, broker: RunningBroker, cls: str, log_path, name: str):
    """An original-protocol worker process (ReqWorker subclass: REQ asks, PUSH answers)."""
    return procs.start(
        ["worker", f"workers_for_tests:{cls}", broker.workers, broker.answers], name, env={LOG_ENV: str(log_path)}
    )


class PendingRequest:
    """A request sent from its own REQ socket; the answer is collected later."""

    def __init__(self, ctx: zmq.Context, address: str, payload: bytes) -> None:
        self.payload = payload
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Sent while the broker restarts: the client's reconnection interval
        # (default 100 ms) must not hide the workers' own.
        self.sock.setsockopt(zmq.RECONNECT_IVL, 5)
        self.sock.connect(address)
        self.sock.send(payload)
        self.answered_at: Optional[float] = None

    def answer(self, procs: Processes, wait: float = WAIT) -> List[bytes]:
        try:
            if not self.sock.poll(int(wait * 1000)):
                pytest.fail(f"no answer to {self.payload!r} within {wait} s\n{procs.output()}")
            self.answered_at = time.monotonic()
            return self.sock.recv_multipart()
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pending(ctx):
    """Makes PendingRequests; closes any left unanswered at teardown."""
    made: List[PendingRequest] = []

    def send(address: str, payload: bytes) -> PendingRequest:
        made.append(PendingRequest(ctx, address, payload))
        return made[-1]

    yield send
    for p in made:
        p.close()


def warm_up(ctx, broker: RunningBroker, pids, log_path, procs: Processes, prefix: str) -> None:
    """Requests ``0:PREFIX-N``, one at a time, until each process in `pids` has
    run one (so all are connected and registered). Bounded by WAIT s and 200 requests."""
    sent = iter(range(200))

    def all_served() -> bool:
        n = next(sent, None)
        if n is None:
            pytest.fail(f"not every worker ran a job in 200 requests: {pids}\n{read_log(log_path)}\n{procs.output()}")
        payload = f"0:{prefix}-{n}".encode()
        assert request(ctx, broker.requests, [payload], WAIT) == [b"-" + payload], procs.output()
        return set(pids) <= {e.pid for e in read_log(log_path) if e.payload.startswith(f"0:{prefix}-")}

    # Between two requests wait_until pauses 20 ms: a worker process may still be starting up.
    wait_until(
        all_served,
        timeout=WAIT,
        interval=0.02,
        message=lambda: f"every worker to run a job: {pids}\n{read_log(log_path)}\n{procs.output()}",
    )


def stop_broker(broker: RunningBroker, procs: Processes) -> Dict[str, int]:
    """SIGTERM the broker; its counters and gauges from the 'broker stopped' line."""
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(WAIT) == 0, procs.output()
    err = broker.proc.stderr_path.read_text(errors="replace")
    match = SUMMARY_RE.search(err)
    assert match, err
    assert "Traceback" not in err, err
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def drop_reasons(broker: RunningBroker) -> List[str]:
    """Reasons of the messages the broker dropped (it runs with -vv, which logs them)."""
    err = broker.proc.stderr_path.read_text(errors="replace")
    return re.findall(r"dropped \d+ message\(s\): (.*)", err)


def events(log_path, event: str = "start", prefix: str = "") -> List[Event]:
    return [e for e in read_log(log_path) if e.event == event and e.payload.startswith(prefix)]


def max_concurrency(log_path, pid: int, prefix: str) -> int:
    """Most jobs (payloads starting with `prefix`) that `pid` ran at once, from the
    start/done times in the log (a job is running from its start to its done)."""
    points = []
    for e in read_log(log_path):
        if e.pid == pid and e.payload.startswith(prefix) and e.event in ("start", "done"):
            # At equal times a done comes first: the job ended before the next began.
            points.append((e.time, 1 if e.event == "start" else -1))
    points.sort(key=lambda p: (p[0], p[1]))
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def record(record_property, name: str, value: float, unit: str = "s") -> None:
    record_property(name, round(value, 4))
    print(f"MEASURED {name} = {value:.3f} {unit}")


def no_traceback(*workers) -> None:
    for w in workers:
        err = w.stderr_path.read_text(errors="replace")
        assert "Traceback" not in err, err


# -- 1. broker SIGKILLed and restarted -----------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_broker_sigkill_restart_same_workers_resume(
    transport, procs, ctx, pending, log_path, core_name, record_property
):
    first = start_broker(procs, transport, core_name)
    workers = [start_dealer(procs, first, "DealerSlow", log_path, f"w{n}") for n in range(2)]
    pids = {w.pid for w in workers}
    warm_up(ctx, first, pids, log_path, procs, "before")

    killed_at = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(WAIT) == -signal.SIGKILL
    # The broker stays away until each worker has given up on it twice: they are
    # in their reconnection back-off, the slow case, when it comes back.
    lost = lambda w: w.stderr_path.read_text(errors="replace").count("no word from the broker")  # noqa: E731
    wait_until(
        lambda: all(lost(w) >= 2 for w in workers),
        timeout=WAIT,
        message=f"the workers to notice the broker's death\n{procs.output()}",
    )
    # Two 1 s jobs, sent before the broker is back (the REQ sockets queue them):
    # the first worker back takes one, the other waits at the broker for the
    # second worker. More pairs until both ran one (bounded).
    batch = [pending(first.requests, f"1.0:after-0{tag}".encode()) for tag in "ab"]
    # The same endpoints (tcp: the ports the first broker got).
    second = start_broker(procs, transport, core_name, addrs=first.endpoints)
    assert second.endpoints == first.endpoints

    first_start: Dict[int, float] = {}
    deadline = time.monotonic() + WAIT
    for n in range(1, 20):
        for p in batch:
            assert p.answer(procs) == [b"-" + p.payload]
        for e in events(log_path, prefix="1.0:after-"):
            first_start.setdefault(e.pid, e.time)
        if set(first_start) >= pids or time.monotonic() > deadline:
            break
        batch = [pending(second.requests, f"1.0:after-{n}{tag}".encode()) for tag in "ab"]
    # The same worker processes serve the new broker: no other process ran a job.
    assert set(first_start) == pids, f"{first_start} vs {pids}\n{procs.output()}"
    assert all(w.poll() is None for w in workers), procs.output()

    resume_first = min(first_start.values()) - second.up_at
    resume_all = max(first_start.values()) - second.up_at
    record(record_property, f"broker_restart_{transport}_broker_away", second.up_at - killed_at)
    record(record_property, f"broker_restart_{transport}_first_worker_resumed", resume_first)
    record(record_property, f"broker_restart_{transport}_all_workers_resumed", resume_all)
    # Expected within about 2 x liveness x heartbeat (0.6 s) of the broker's return.
    assert resume_all < 10 * 2 * WINDOW, f"workers took {resume_all:.2f} s to resume\n{procs.output()}"
    for w in workers:
        assert "reconnecting to" in w.stderr_path.read_text(errors="replace"), procs.output()
    no_traceback(*workers)
    stats = stop_broker(second, procs)
    assert stats["workers_joined"] >= 2 and stats["answered"] == len(events(log_path, prefix="1.0:after-")), stats
    # The only messages dropped: answers to the dead broker's warm-ups that the
    # workers could not know were delivered, sent again after reconnecting.
    assert set(drop_reasons(second)) <= {"answer for an unknown or already answered task"}, drop_reasons(second)


# -- 2. worker SIGKILLed mid-job -------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_jobs_of_sigkilled_dealer_worker_requeued_within_liveness(
    transport, procs, ctx, pending, log_path, core_name, record_property
):
    # The attempt timeout (60 s) is far beyond every wait here: only the broker's
    # liveness check can bring the jobs back in time.
    broker = start_broker(procs, transport, core_name, "-T", "60", "-t", "3")
    victim = start_dealer(procs, broker, "DealerHang", log_path, "victim", credit=2)
    # Two jobs in hand, sent one after the other so the broker sends them in that order.
    jobs = []
    for tag in "ab":
        jobs.append(pending(broker.requests, f"0:job-kill-{tag}".encode()))
        wait_until(
            lambda: runs(log_path, f"0:job-kill-{tag}"),
            timeout=WAIT,
            message=f"the victim to take job {tag}\n{procs.output()}",
        )
    # The rescuer joins while the victim's credit is used up: warm-ups go to it.
    rescuer = start_dealer(procs, broker, "DealerSlow", log_path, "rescuer")
    warm_up(ctx, broker, {rescuer.pid}, log_path, procs, "warm")

    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    for job in jobs:
        assert job.answer(procs) == [b"-" + job.payload]
    assert victim.wait(WAIT) == -signal.SIGKILL
    for tag in "ab":
        assert runs(log_path, f"0:job-kill-{tag}") == [victim.pid, rescuer.pid]
    again = [e for e in events(log_path, prefix="0:job-kill-") if e.pid == rescuer.pid]
    # Back to the front of the queue oldest first: in the order they were sent.
    assert [e.payload for e in again] == ["0:job-kill-a", "0:job-kill-b"], again
    delay = again[0].time - killed_at
    record(record_property, f"worker_kill_{transport}_requeue_delay", delay)
    record(
        record_property, f"worker_kill_{transport}_both_answered_after", max(j.answered_at for j in jobs) - killed_at
    )
    # Expected: the window (0.3 s) plus up to one heartbeat; the job timeout is 60 s.
    assert delay < 10 * 2 * WINDOW, f"re-queued {delay:.2f} s after the SIGKILL\n{procs.output()}"
    stats = stop_broker(broker, procs)
    assert stats["workers_dead"] == 1 and stats["requeued"] == 2, stats
    assert stats["timeouts"] == 0 and stats["aborted"] == 0 and stats["dropped"] == 0, stats


def test_dealer_holding_a_job_when_the_broker_dies_serves_the_new_one(
    procs, ctx, pending, log_path, core_name, tmp_path
):
    gate = tmp_path / "gate"
    first = start_broker(procs, "tcp", core_name)
    worker = start_dealer(procs, first, "DealerGated", log_path, "worker", credit=2, env={GATE_ENV: str(gate)})
    old = pending(first.requests, b"0:gated-old")
    wait_until(
        lambda: runs(log_path, "0:gated-old"), timeout=WAIT, message=f"the worker to take the job\n{procs.output()}"
    )
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(WAIT) == -signal.SIGKILL
    second = start_broker(procs, "tcp", core_name, addrs=first.endpoints)

    # The job taken from the dead broker still runs (gate closed): the worker
    # serves the new broker with the rest of its credit, one job at a time.
    new = [pending(second.requests, f"0.1:new-{n}".encode()) for n in range(3)]
    for p in new:
        assert p.answer(procs) == [b"-" + p.payload]
    assert not gate.exists() and runs(log_path, "0:gated-old", "done") == []
    assert max_concurrency(log_path, worker.pid, "0.1:new-") == 1, read_log(log_path)

    # The old job ends; its answer reaches a broker that never knew it (dropped),
    # and the worker takes two jobs at once again.
    gate.touch()
    wait_until(lambda: runs(log_path, "0:gated-old", "done"), timeout=WAIT, message="the old job to end")
    wait_until(
        lambda: "answer for an unknown or already answered task" in drop_reasons(second),
        timeout=WAIT,
        message=f"the new broker to drop the old job's answer\n{procs.output()}",
    )
    again = [pending(second.requests, f"0.5:again-{n}".encode()) for n in range(2)]
    for p in again:
        assert p.answer(procs) == [b"-" + p.payload]
    assert max_concurrency(log_path, worker.pid, "0.5:again-") == 2, read_log(log_path)
    assert {e.pid for e in events(log_path)} == {worker.pid}
    old.close()  # its request died with the first broker
    no_traceback(worker)
    stats = stop_broker(second, procs)
    assert stats["answered"] == 5 and stats["requeued"] == 0 and stats["workers_dead"] == 0, stats


# -- 3. a job far longer than the heartbeat ---------------------------------------------------


@pytest.mark.parametrize("cls", ["DealerSlow", "DealerSpin"], ids=["sleeping", "cpu-bound"])
def test_job_ten_heartbeats_long_runs_once(cls, procs, ctx, pending, log_path, core_name):
    broker = start_broker(procs, "tcp", core_name, "-T", "60")
    workers = [start_dealer(procs, broker, cls, log_path, f"w{n}") for n in range(2)]
    warm_up(ctx, broker, {w.pid for w in workers}, log_path, procs, "warm")
    warm_ups = len(events(log_path, prefix="0:warm-"))

    seconds = 10 * HEARTBEAT
    payload = f"{seconds}:long".encode()
    job = pending(broker.requests, payload)
    assert job.answer(procs) == [b"-" + payload]
    # Had the broker taken the busy worker for dead, the other one (idle) would have
    # run the job again.
    started = runs(log_path, payload.decode())
    assert len(started) == 1 and started == runs(log_path, payload.decode(), "done"), read_log(log_path)
    done = [e for e in read_log(log_path) if e.payload == payload.decode()]
    assert done[1].time - done[0].time >= seconds * 0.99
    for w in workers:
        err = w.stderr_path.read_text(errors="replace")
        assert "reconnecting" not in err, err
    no_traceback(*workers)
    stats = stop_broker(broker, procs)
    assert stats["requeued"] == 0 and stats["workers_dead"] == 0 and stats["timeouts"] == 0, stats
    assert stats["dispatched"] == stats["answered"] == warm_ups + 1, stats
    assert stats["workers_joined"] == 2, stats


@pytest.mark.parametrize(
    "cls",
    [
        "DealerSpin",
        pytest.param(
            "DealerGilHolder",
            marks=pytest.mark.compiled_only(
                reason="needs the compiled core: the pure session's loop takes the GIL for each heartbeat"
            ),
        ),
    ],
    ids=["python-cpu-bound", "gil-held-in-c"],
)
def test_job_holding_the_gil_ten_seconds_keeps_its_worker(cls, procs, ctx, pending, log_path, core_name):
    """Issue 15: a job that keeps the GIL for 10 s (100 heartbeats, 33 times the broker's
    patience): in Python code (both sessions), or in C without ever letting it go (the
    compiled session, whose loop heartbeats without the GIL). The worker is not taken
    for dead, its job runs once, and the job sent meanwhile goes to the other worker:
    the busy one, at credit 1, gets nothing more."""
    broker = start_broker(procs, "tcp", core_name, "-T", "60")
    workers = [start_dealer(procs, broker, cls, log_path, f"w{n}") for n in range(2)]
    warm_up(ctx, broker, {w.pid for w in workers}, log_path, procs, "warm")
    warm_ups = len(events(log_path, prefix="0:warm-"))

    seconds = 10
    payload = f"{seconds}:hold".encode()
    job = pending(broker.requests, payload)
    started = wait_until(lambda: events(log_path, prefix=payload.decode()), timeout=WAIT, message="the job's start")
    holder = started[0].pid
    meanwhile = pending(broker.requests, b"0:meanwhile")
    assert meanwhile.answer(procs) == [b"-0:meanwhile"]
    assert [e.pid for e in events(log_path, prefix="0:meanwhile")] != [holder], read_log(log_path)
    assert job.answer(procs, wait=WAIT + seconds) == [b"-" + payload]
    assert meanwhile.answered_at is not None and job.answered_at is not None
    assert meanwhile.answered_at < job.answered_at
    assert len(runs(log_path, payload.decode())) == 1, read_log(log_path)
    for w in workers:
        err = w.stderr_path.read_text(errors="replace")
        assert "reconnecting" not in err and "DISCONNECT" not in err, err
    no_traceback(*workers)
    stats = stop_broker(broker, procs)
    assert stats["requeued"] == 0 and stats["workers_dead"] == 0 and stats["timeouts"] == 0, stats
    assert stats["dispatched"] == stats["answered"] == warm_ups + 2, stats
    assert stats["workers_joined"] == 2, stats


# -- 4. credit ------------------------------------------------------------------------------


@pytest.mark.parametrize("credit", [1, 4])
def test_credit_bounds_jobs_held_by_a_worker(credit, procs, ctx, pending, log_path, core_name, tmp_path):
    broker = start_broker(procs, "ipc", core_name)
    worker = start_dealer(procs, broker, "DealerSlow", log_path, "worker", credit=credit)
    warm_up(ctx, broker, {worker.pid}, log_path, procs, "warm")

    # Slow jobs, all queued at once: the worker runs `credit` of them at a time.
    n_jobs, seconds = (10, 0.3) if credit > 1 else (4, 0.2)
    sent = [pending(broker.requests, f"{seconds}:slow-{n}".encode()) for n in range(n_jobs)]
    for p in sent:
        assert p.answer(procs) == [b"-" + p.payload]
    assert sorted(e.payload for e in events(log_path, prefix=f"{seconds}:slow-")) == sorted(
        p.payload.decode() for p in sent
    )
    assert max_concurrency(log_path, worker.pid, f"{seconds}:slow-") == credit, read_log(log_path)

    # The broker's side: a second worker, gated, holds `credit` jobs and never
    # more; the rest stay at the broker, so a worker arriving later gets them
    # while the gated one still holds its own. (The gated worker's pool has
    # `credit` threads, so its log alone could not show a broker sending more.)
    gate = tmp_path / "gate"
    gated = start_dealer(procs, broker, "DealerGated", log_path, "gated", credit=credit, env={GATE_ENV: str(gate)})
    worker.send_signal(signal.SIGTERM)  # only the gated worker is left
    assert worker.wait(WAIT) == 0, procs.output()
    held = [pending(broker.requests, f"0:gated-{n}".encode()) for n in range(credit + 3)]
    wait_until(
        lambda: len(events(log_path, prefix="0:gated-")) >= credit,
        timeout=WAIT,
        message=f"the gated worker to take {credit} jobs\n{procs.output()}",
    )
    late = start_dealer(procs, broker, "DealerSlow", log_path, "late")
    in_gated = {e.payload for e in events(log_path, prefix="0:gated-") if e.pid == gated.pid}
    others = [p for p in held if p.payload.decode() not in in_gated]
    assert len(in_gated) == credit and len(others) == 3
    for p in others:  # answered by the late worker while the gate is still closed
        assert p.answer(procs) == [b"-" + p.payload]
    assert not gate.exists()
    gate.touch()
    for p in held:
        if p not in others:
            assert p.answer(procs) == [b"-" + p.payload]
    starts = events(log_path, prefix="0:gated-")
    assert sorted(e.payload for e in starts) == sorted(p.payload.decode() for p in held), "each job ran once"
    assert {e.payload for e in starts if e.pid == gated.pid} == in_gated
    assert {e.pid for e in starts if e.payload not in in_gated} == {late.pid}
    assert max_concurrency(log_path, gated.pid, "0:gated-") == credit
    no_traceback(worker, gated, late)
    stats = stop_broker(broker, procs)
    assert stats["requeued"] == 0 and stats["dropped"] == 0, stats


# -- 5. REQ/PUSH and DEALER workers on one broker ---------------------------------------------


def test_req_and_dealer_workers_share_one_broker(procs, ctx, log_path, core_name):
    broker = start_broker(procs, "tcp", core_name)
    req_workers = [start_req_worker(procs, broker, "Slow", log_path, f"req{n}") for n in range(2)]
    dealers = [
        start_dealer(procs, broker, "DealerSlow", log_path, "dealer1"),
        start_dealer(procs, broker, "DealerSlow", log_path, "dealer2", credit=2),
    ]
    req_pids = {w.pid for w in req_workers}
    dealer_pids = {w.pid for w in dealers}
    warm_up(ctx, broker, req_pids | dealer_pids, log_path, procs, "warm")
    warm_ups = len(events(log_path, prefix="0:warm-"))

    n_clients, per_client = 5, 8
    answers, errors = concurrent_requests(
        ctx,
        broker.requests,
        [[f"0.03:mixed-{c}-{i}".encode() for i in range(per_client)] for c in range(n_clients)],
        WAIT,
    )
    assert not errors, f"{errors}\n{procs.output()}"
    answers = {p.decode(): a for p, a in answers.items()}
    expected = sorted(f"0.03:mixed-{c}-{i}" for c in range(n_clients) for i in range(per_client))
    assert sorted(answers) == expected
    assert all(answer == [b"-" + p.encode()] for p, answer in answers.items())
    starts = events(log_path, prefix="0.03:mixed-")
    assert sorted(e.payload for e in starts) == expected, "each job ran exactly once"
    ran = {e.pid for e in starts}
    assert ran <= req_pids | dealer_pids
    assert ran & req_pids and ran & dealer_pids, f"both kinds of worker served: {ran}"
    no_traceback(*req_workers, *dealers)
    stats = stop_broker(broker, procs)
    total = warm_ups + len(expected)
    assert stats["requests"] == stats["answered"] == stats["dispatched"] == total, stats
    assert stats["dropped"] == stats["requeued"] == stats["workers_dead"] == 0, stats
    assert stats["workers_joined"] == 2, stats


# -- 6. SIGTERM to a worker holding two jobs, others queued -------------------------------------


def test_sigterm_to_dealer_holding_two_jobs_while_others_queue(procs, ctx, pending, log_path, core_name, tmp_path):
    gate = tmp_path / "gate"
    broker = start_broker(procs, "ipc", core_name)
    holder = start_dealer(procs, broker, "DealerGated", log_path, "holder", credit=2, env={GATE_ENV: str(gate)})
    held = [pending(broker.requests, f"0.2:gated-{tag}".encode()) for tag in "ab"]
    wait_until(
        lambda: len(events(log_path, prefix="0.2:gated-")) == 2,
        timeout=WAIT,
        message=f"the holder to take both jobs\n{procs.output()}",
    )
    assert {e.pid for e in events(log_path, prefix="0.2:gated-")} == {holder.pid}
    # Another worker joins; the holder's credit is used up, so warm-ups go to it.
    other = start_dealer(procs, broker, "DealerSlow", log_path, "other")
    warm_up(ctx, broker, {other.pid}, log_path, procs, "warm")

    holder.send_signal(signal.SIGTERM)
    wait_until(
        lambda: "stopping: finishing 2 job(s) in hand" in holder.stderr_path.read_text(errors="replace"),
        timeout=WAIT,
        message=f"the holder to start stopping\n{procs.output()}",
    )
    # Stopping, it keeps heartbeating: several liveness windows pass and the broker
    # does not take it for dead (it would re-queue its jobs to the idle worker)...
    # (The wait is the point: that nothing happens for 3 windows has no event to wait for.)
    time.sleep(3 * WINDOW)
    # ...and it takes no new job: these go to the other worker, gate still closed.
    later = [pending(broker.requests, f"0:later-{n}".encode()) for n in range(3)]
    for p in later:
        assert p.answer(procs) == [b"-" + p.payload]
    assert holder.poll() is None and not gate.exists()
    assert {e.pid for e in events(log_path, prefix="0:later-")} == {other.pid}

    gate.touch()
    for p in held:
        assert p.answer(procs) == [b"-" + p.payload]
    assert holder.wait(WAIT) == 0, procs.output()
    for tag in "ab":
        assert runs(log_path, f"0.2:gated-{tag}") == runs(log_path, f"0.2:gated-{tag}", "done") == [holder.pid]
    no_traceback(holder, other)
    stats = stop_broker(broker, procs)
    assert stats["requeued"] == 0 and stats["workers_dead"] == 0, stats
    assert stats["workers_left"] == 1 and stats["workers_joined"] == 2, stats
    assert stats["answered"] == stats["dispatched"] == stats["requests"], stats
