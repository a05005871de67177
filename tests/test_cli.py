"""The ``fastbroker`` command, run as a real process (``python -m fastbroker``):
bad input ends in one line on stderr and exit status 2; SIGTERM and SIGINT stop
the broker and the workers cleanly (exit 0), a worker finishing its job first."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading

import pytest
import zmq

import fastbroker
from conftest import PYTHON, wait_until
from workers_for_tests import LOG_ENV, Echo, Processes, pid_alive, read_log, request, runs

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


@pytest.fixture
def echo_thread(ctx):
    """Runs an in-process Echo worker in a thread: call with (workers, answers) addresses."""
    started = []

    def start(workers_addr: str, answers_addr: str) -> Echo:
        worker = Echo(ctx, workers_addr, answers_addr)
        thread = threading.Thread(target=worker.run, name="echo-worker")
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(WAIT)
        worker.close()


def run_cli(args, env, cwd, timeout=60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "fastbroker", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


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
def test_broker_stops_on_signal_with_exit_0(signum, procs, ctx, addrs, echo_thread, core_name):
    broker = start_broker(procs, addrs, core_name, "-T", "5", "-t", "2")
    echo_thread(addrs[1], addrs[2])
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
    pool = procs.start(["worker", "workers_for_tests:Slow", addrs[1], addrs[2], "--processes", "2"], "pool", env={LOG_ENV: str(log_path)})
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


def test_worker_sigterm_during_job_answers_then_exits_0(procs, ctx, addrs, core_name, tmp_path):
    log_path = tmp_path / "jobs.log"
    start_broker(procs, addrs, core_name)
    worker = procs.start(["worker", "workers_for_tests:Slow", addrs[1], addrs[2]], "worker", env={LOG_ENV: str(log_path)})
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
    result = run_cli(["demo", "--jobs", "8", "--workers", "2", "--core", core_name], subprocess_env, tmp_path, timeout=90)
    assert result.returncode == 0, result
    assert f"{core_name} core" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert len(summary) == 1, result.stdout
    assert summary[0].startswith("summary: 8 requests:")
    assert "Traceback" not in result.stderr
