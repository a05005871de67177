"""The ``fastbroker`` command, run as a real process (``python -m fastbroker``):
bad input ends in one line on stderr and exit status 2; SIGTERM and SIGINT stop
the broker and the workers cleanly (exit 0), a worker finishing its job first."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest
import zmq

import fastbroker
from rigs import PYTHON, Processes, descendants, pid_alive, read_log, request, run_cli, runs, wait_until

from workers_for_tests import LOG_ENV, Echo

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


# -- bad input: exit 2, one line ---------------------------------------------------------

R, W, A = "ipc://@R", "ipc://@W", "ipc://@A"  # placeholders, replaced by the fixture's addresses

ERROR_CASES = {
    "tries-0": (["broker", "-t", "0", R, W, A], "tries"),
    "tries-negative": (["broker", "-t", "-1", R, W, A], "tries"),
    "tries-not-a-number": (["broker", "-t", "x", R, W, A], "not a whole number"),
    "tries-float": (["broker", "--tries", "1.5", R, W, A], "not a whole number"),
    "timeout-negative": (["broker", "-T", "-0.5", R, W, A], "timeout"),
    "timeout-nan": (["broker", "-T", "nan", R, W, A], "timeout"),
    "timeout-inf": (["broker", "-T", "inf", R, W, A], "timeout"),
    "timeout-not-a-number": (["broker", "-T", "soon", R, W, A], "not a number"),
    "bad-scheme": (["broker", "bogus://x", W, A], "requests endpoint"),
    "no-scheme": (["broker", R, "localhost:5555", A], "workers endpoint"),
    "bad-ipc-dir": (["broker", R, W, "ipc:///nonexistent-dir-fb/a"], "answers endpoint"),
    "too-few-addresses": (["broker", R, W], "required"),
    "too-many-addresses": (["broker", R, W, A, "ipc://extra"], "unrecognized"),
    "unknown-core": (["broker", "--core", "turbo", R, W, A], "invalid choice"),
    "unknown-command": (["frobnicate"], "invalid choice"),
    "worker-no-colon": (["worker", "workers_for_tests.Echo", W, A], "MODULE:CLASS"),
    "worker-no-class": (["worker", "workers_for_tests:", W, A], "MODULE:CLASS"),
    "worker-no-module": (["worker", ":Echo", W, A], "MODULE:CLASS"),
    "worker-missing-module": (["worker", "no_such_module_fb:Echo", W, A], "cannot import"),
    "worker-module-fails": (["worker", "broken_module_fb:Echo", W, A], "cannot import"),
    "worker-missing-class": (["worker", "workers_for_tests:NoSuchClass", W, A], "no attribute"),
    "worker-not-a-subclass": (["worker", "workers_for_tests:NotAWorker", W, A], "not a subclass"),
    "worker-not-a-class": (["worker", "workers_for_tests:log_event", W, A], "not a subclass"),
    "worker-bad-address": (["worker", "workers_for_tests:Echo", "not-an-address", A], "not a ZeroMQ address"),
    "worker-bad-scheme": (["worker", "workers_for_tests:Echo", W, "bogus://x"], "bogus://x"),
    "worker-processes-0": (["worker", "workers_for_tests:Echo", W, A, "--processes", "0"], "at least 1"),
    "worker-too-few-args": (["worker", "workers_for_tests:Echo", W], "required"),
    "worker-no-address": (["worker", "workers_for_tests:DealerEcho"], "required"),
    "worker-req-credit": (["worker", "workers_for_tests:Echo", W, A, "--credit", "2"], "only for fastbroker.Worker"),
    "worker-req-heartbeat": (
        ["worker", "workers_for_tests:Echo", W, A, "--heartbeat", "0.5"],
        "only for fastbroker.Worker",
    ),
    "worker-dealer-credit-0": (["worker", "workers_for_tests:DealerEcho", W, "--credit", "0"], "credit"),
    "worker-dealer-credit-huge": (["worker", "workers_for_tests:DealerEcho", W, "--credit", "99999999"], "credit"),
    "worker-dealer-prefetch-negative": (["worker", "workers_for_tests:DealerEcho", W, "--prefetch", "-1"], "prefetch"),
    "worker-dealer-credit-plus-prefetch": (
        ["worker", "workers_for_tests:DealerEcho", W, "--credit", "65536", "--prefetch", "1"],
        "credit + prefetch",
    ),
    "worker-req-prefetch": (
        ["worker", "workers_for_tests:Echo", W, A, "--prefetch", "2"],
        "only for fastbroker.Worker",
    ),
    "worker-dealer-protocol-3": (["worker", "workers_for_tests:DealerEcho", W, "--protocol", "3"], "invalid choice"),
    "worker-req-protocol": (
        ["worker", "workers_for_tests:Echo", W, A, "--protocol", "1"],
        "only for fastbroker.Worker",
    ),
    "worker-dealer-heartbeat-0": (["worker", "workers_for_tests:DealerEcho", W, "--heartbeat", "0"], "heartbeat"),
    "worker-dealer-heartbeat-nan": (["worker", "workers_for_tests:DealerEcho", W, "--heartbeat", "nan"], "heartbeat"),
    "worker-dealer-liveness-0": (["worker", "workers_for_tests:DealerEcho", W, "--liveness", "0"], "liveness"),
    "worker-dealer-liveness-float": (
        ["worker", "workers_for_tests:DealerEcho", W, "--liveness", "1.5"],
        "not a whole number",
    ),
    "worker-dealer-bad-scheme": (["worker", "workers_for_tests:DealerEcho", "bogus://x"], "bogus://x"),
    "worker-dealer-bad-answers-address": (
        ["worker", "workers_for_tests:DealerEcho", W, "nowhere"],
        "not a ZeroMQ address",
    ),
    "broker-heartbeat-0": (["broker", "--heartbeat", "0", R, W, A], "heartbeat"),
    "broker-heartbeat-not-a-number": (["broker", "--heartbeat", "often", R, W, A], "not a number"),
    "broker-liveness-0": (["broker", "--liveness", "0", R, W, A], "liveness"),
    "broker-liveness-too-big": (["broker", "--liveness", "1001", R, W, A], "liveness"),
    "demo-drop-rate": (["demo", "--drop-rate", "1.5"], "between 0 and 1"),
    "demo-jobs-0": (["demo", "--jobs", "0"], "at least 1"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, addrs, subprocess_env):
    args, expected = ERROR_CASES[case]
    args = [{R: addrs[0], W: addrs[1], A: addrs[2]}.get(a, a) for a in args]
    (tmp_path / "broken_module_fb.py").write_text("raise RuntimeError('this module fails on import')\n")
    result = run_cli(args, subprocess_env, tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""


def test_address_in_use_exits_2(tmp_path, addrs, subprocess_env):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(["broker", addrs[0], f"tcp://127.0.0.1:{port}", addrs[2]], subprocess_env, tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "in use" in result.stderr and str(port) in result.stderr, result.stderr


def test_version(tmp_path, subprocess_env):
    result = run_cli(["--version"], subprocess_env, tmp_path)
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"fastbroker {fastbroker.__version__}"


# -- signals -----------------------------------------------------------------------------


def start_broker(procs: Processes, addrs, core_name, *options):
    broker = procs.start(["-v", "broker", "--core", core_name, *options, *addrs], "broker")
    return broker


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_stops_on_signal_with_exit_0(signum, procs, ctx, addrs, threads, core_name):
    broker = start_broker(procs, addrs, core_name, "-T", "5", "-t", "2")
    threads(Echo(ctx, addrs[1], addrs[2]))
    assert request(ctx, addrs[0], [b"ready?"], WAIT) == [b"-ready?"], procs.output()
    broker.send_signal(signum)
    assert broker.wait(WAIT) == 0, procs.output()
    err = broker.stderr_path.read_text()
    assert f"core={core_name}" in err
    assert re.search(r"broker stopped: requests=1, dispatched=1, answered=1", err), err
    assert "Traceback" not in err


def test_worker_pool_serves_with_two_processes_and_stops_on_sigterm(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    broker = start_broker(procs, addrs, core_name)
    pool = procs.start(
        ["worker", "workers_for_tests:Slow", addrs[1], addrs[2], "--processes", "2"],
        "pool",
        env={LOG_ENV: str(log_path)},
    )
    # Two jobs at once, each long enough to keep its worker busy: with two idle
    # workers, each gets one.
    for n in range(10):
        first = ctx.socket(zmq.REQ)
        second = ctx.socket(zmq.REQ)
        try:
            for sock, tag in ((first, b"a"), (second, b"b")):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(addrs[0])
                sock.send(b"0.3:%d%s" % (n, tag))
            for sock, tag in ((first, b"a"), (second, b"b")):
                assert sock.poll(int(WAIT * 1000)), procs.output()
                assert sock.recv() == b"-0.3:%d%s" % (n, tag)
        finally:
            first.close()
            second.close()
        pids = {e.pid for e in read_log(log_path)}
        if len(pids) == 2:
            break
    else:
        pytest.fail(f"jobs ran on {pids} only\n{procs.output()}")
    assert pool.pid not in pids, "the jobs ran in the pool's child processes"

    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
    for pid in pids:
        wait_until(lambda: not pid_alive(pid), timeout=WAIT, message=f"pool child {pid} to exit")
    assert broker.poll() is None


def test_pool_stopped_while_its_workers_are_being_built_exits_0(procs, addrs, core_name, tmp_path):
    """A SIGTERM forwarded to children still constructing their worker stops them
    cleanly once built (they must not run the parent's forwarding handler)."""
    log_path = tmp_path / "jobs.log"
    start_broker(procs, addrs, core_name)
    pool = procs.start(
        ["worker", "workers_for_tests:DealerSlowStart", addrs[1], "--processes", "2"],
        "pool",
        env={LOG_ENV: str(log_path)},
    )
    wait_until(
        lambda: len(runs(log_path, "", event="building")) >= 2, timeout=WAIT, message="both children to start building"
    )
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
    assert "Traceback" not in procs.output()


def test_worker_sigterm_during_job_answers_then_exits_0(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    start_broker(procs, addrs, core_name)
    worker = procs.start(
        ["worker", "workers_for_tests:Slow", addrs[1], addrs[2]], "worker", env={LOG_ENV: str(log_path)}
    )
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addrs[0])
    sock.send(b"1.0:in-hand")
    wait_until(lambda: runs(log_path, "1.0:in-hand"), timeout=WAIT, message="the worker to take the job")
    worker.send_signal(signal.SIGTERM)
    assert sock.poll(int(WAIT * 1000)), f"the job in hand was not answered\n{procs.output()}"
    assert sock.recv_multipart() == [b"-1.0:in-hand"]
    sock.close()
    assert worker.wait(WAIT) == 0, procs.output()
    assert runs(log_path, "1.0:in-hand", "done") == [worker.pid]
    assert "Traceback" not in worker.stderr_path.read_text()


def test_demo_runs_and_prints_a_summary(tmp_path, subprocess_env, core_name):
    result = run_cli(
        ["demo", "--jobs", "8", "--workers", "2", "--core", core_name], subprocess_env, tmp_path, timeout=90
    )
    assert result.returncode == 0, result
    assert f"{core_name} core" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("summary (REQ clients):")]
    assert len(summary) == 1, result.stdout
    assert summary[0].startswith("summary (REQ clients): 8 requests:")
    # The FBC01 part: one line per outcome kind it sets up, then map's answers in order.
    for line in (
        "client: hello -> OK -hello",
        "client: slow (0.2 s timeout, 1 try) -> TIMED_OUT",
        "client: slow, cancelled -> CANCELLED",
        "8 answers in order: -map-0 ... -map-7",
    ):
        assert line in result.stdout, result.stdout
    # The client speaks FBC02 to this broker throughout (a STATUS overtaking its
    # request's batch once made it fall back to FBC01).
    assert "does not speak FBC02" not in result.stdout + result.stderr
    # FAILED with the worker's text if a DEALER worker ran it; REQ workers can only time out.
    assert (
        "client: broken (2 tries) -> FAILED: Dropped: this job always fails" in result.stdout
        or "client: broken (2 tries) -> TIMED_OUT" in result.stdout
    ), result.stdout
    assert "Traceback" not in result.stderr


# -- DEALER workers (FBW01) through the CLI ------------------------------------------------


def test_dealer_worker_sigterm_answers_jobs_in_hand_then_disconnects(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    broker = start_broker(procs, addrs, core_name, "--heartbeat", "0.2")
    # No ANSWERS_ADDR: answers travel on the DEALER socket.
    worker = procs.start(
        ["worker", "workers_for_tests:DealerSlow", addrs[1], "--credit", "2", "--heartbeat", "0.2"],
        "worker",
        env={LOG_ENV: str(log_path)},
    )
    socks = []
    try:
        for tag in (b"a", b"b"):
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addrs[0])
            sock.send(b"1.0:" + tag)
            socks.append(sock)
        # credit 2: both jobs run at once in the one worker process
        wait_until(
            lambda: runs(log_path, "1.0:a") and runs(log_path, "1.0:b"),
            timeout=WAIT,
            message=f"both jobs to start\n{procs.output()}",
        )
        assert runs(log_path, "1.0:a") == runs(log_path, "1.0:b") == [worker.pid]
        worker.send_signal(signal.SIGTERM)
        for sock, tag in zip(socks, (b"a", b"b")):
            assert sock.poll(int(WAIT * 1000)), f"a job in hand was not answered\n{procs.output()}"
            assert sock.recv_multipart() == [b"-1.0:" + tag]
    finally:
        for sock in socks:
            sock.close()
    assert worker.wait(WAIT) == 0, procs.output()
    assert "Traceback" not in worker.stderr_path.read_text()
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(WAIT) == 0, procs.output()
    err = broker.stderr_path.read_text()
    # The worker said DISCONNECT: it left, it did not die.
    assert re.search(r"broker stopped: .*answered=2,.* workers_joined=1, workers_left=1, workers_dead=0", err), err


def test_dealer_worker_failure_is_retried_at_once_not_after_the_timeout(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    # The attempt timeout is far beyond WAIT: only FAILED can make the retries happen in time.
    start_broker(procs, addrs, core_name, "-T", "600", "-t", "3")
    worker = procs.start(
        ["-v", "worker", "workers_for_tests:DealerFailer", addrs[1]], "failer", env={LOG_ENV: str(log_path)}
    )
    with pytest.raises(fastbroker.TaskAborted):
        with fastbroker.ReqClient(addrs[0], ctx, timeout=WAIT) as client:
            client.request(b"doomed")
    assert runs(log_path, "doomed") == [worker.pid] * 3
    assert worker.poll() is None, "the worker survives its jobs' exceptions"
    err = worker.stderr_path.read_text()
    assert err.count("processing failed") == 3 and "Dropped: b'doomed'" in err, err


def test_dealer_worker_reconnects_to_a_restarted_broker(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    first = start_broker(procs, addrs, core_name, "--heartbeat", "0.1")
    worker = procs.start(
        ["-v", "worker", "workers_for_tests:DealerEcho", addrs[1], "--heartbeat", "0.1", "--liveness", "3"],
        "worker",
        env={LOG_ENV: str(log_path)},
    )
    assert request(ctx, addrs[0], [b"before"], WAIT) == [b"-before"], procs.output()
    first.send_signal(signal.SIGKILL)
    first.wait(WAIT)
    start_broker(procs, addrs, core_name, "--heartbeat", "0.1")
    assert request(ctx, addrs[0], [b"after"], WAIT) == [b"-after"], procs.output()
    assert runs(log_path, "after") == [worker.pid]
    # Whichever came first: its silence timer (a new socket), or the new broker's
    # DISCONNECT in answer to a heartbeat (READY again on the same socket).
    err = worker.stderr_path.read_text()
    assert "reconnecting to" in err or "the broker sent DISCONNECT: registering again" in err, err


def test_worker_pool_restarts_a_child_that_dies(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    start_broker(procs, addrs, core_name)
    pool = procs.start(
        ["worker", "workers_for_tests:DealerSlow", addrs[1], "-p", "2"], "pool", env={LOG_ENV: str(log_path)}
    )
    children = wait_until(
        lambda: len(descendants(pool.pid)) == 2 and descendants(pool.pid), timeout=WAIT, message="two pool children"
    )
    victim = children[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in descendants(pool.pid) and len(descendants(pool.pid)) == 2,
        timeout=WAIT,
        message=f"the killed child to be replaced\n{procs.output()}",
    )
    replacement = (set(descendants(pool.pid)) - set(children)).pop()
    assert "died unexpectedly" in pool.stderr_path.read_text()
    # The replacement serves: two jobs at once, each long enough to keep its
    # worker (credit 1) busy, go one to each child.
    for n in range(10):
        socks = [ctx.socket(zmq.REQ) for _ in range(2)]
        try:
            for sock, tag in zip(socks, (b"a", b"b")):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(addrs[0])
                sock.send(b"0.3:%d%s" % (n, tag))
            for sock, tag in zip(socks, (b"a", b"b")):
                assert sock.poll(int(WAIT * 1000)), procs.output()
                assert sock.recv() == b"-0.3:%d%s" % (n, tag)
        finally:
            for sock in socks:
                sock.close()
        if replacement in {e.pid for e in read_log(log_path)}:
            break
    else:
        pytest.fail(f"the replacement {replacement} ran no job\n{procs.output()}")
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 0, procs.output()
    # Stopped, not restarted: the children exit and none takes their place.
    for pid in (replacement, children[1]):
        wait_until(lambda: not pid_alive(pid), timeout=WAIT, message=f"pool child {pid} to exit")
    assert pool.stderr_path.read_text().count("died unexpectedly") == 1, procs.output()


def test_worker_pool_backs_off_restarting_a_child_that_dies_at_once(procs, addrs, tmp_path):
    log_path = tmp_path / "jobs.log"
    pool = procs.start(
        ["worker", "workers_for_tests:DiesAtOnce", addrs[1], "-p", "2"], "pool", env={LOG_ENV: str(log_path)}
    )
    # Each death of a slot in a row doubles its delay: 0.5 s, then 1 s, then 2 s...
    wait_until(
        lambda: pool.stderr_path.read_text().count("restarting in 1.0 s") == 2,
        timeout=WAIT,
        message=f"each slot's second restart\n{procs.output()}",
    )
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(WAIT) == 3, procs.output()  # the children's status
    err = pool.stderr_path.read_text()
    assert "restarting in 0.5 s" in err and "Traceback" not in err
    # Each slot ran twice at least; a spinning pool would have run hundreds of
    # children, a backing-off one needs over 15 s for 6 runs per slot.
    assert 4 <= len(read_log(log_path)) <= 12, err


def test_output_to_a_closed_pipe_is_no_traceback(tmp_path, subprocess_env):
    # `fastbroker ... | head -1`: the reader may be gone before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    err = tmp_path / "err"
    with open(err, "wb") as err_file:
        code = subprocess.run(
            [PYTHON, "-m", "fastbroker", "keygen", "k", "--dir", str(tmp_path)],
            stdout=write_end,
            stderr=err_file,
            env=subprocess_env,
            timeout=60,
        ).returncode
    os.close(write_end)
    assert code == 141, err.read_text()
    assert err.read_text() == ""
