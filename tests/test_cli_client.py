"""The client sub-commands of ``fastbroker`` (submit, status, cancel) and the broker's
retention options, run as real processes against a real broker and workers."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest

from fastbroker import Client, TaskCancelled
from rigs import PYTHON, runs, wait_until

from workers_for_tests import GATE_ENV, LOG_ENV

WAIT = 20.0


@pytest.fixture
def addrs(tmp_path):
    return [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]


def run_cli(args, env, cwd, stdin: bytes = b"", timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "fastbroker", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


@pytest.fixture
def cluster(procs, addrs, core_name, tmp_path):
    """Starts a broker process and one worker process of the class named (credit 4,
    logging to ``cluster.log_path``, gated by ``cluster.gate``); returns the
    requests address."""
    log_path = tmp_path / "jobs.log"
    gate = tmp_path / "gate"

    def start(worker_class: str, *broker_options: str):
        procs.start(["-v", "broker", "--core", core_name, "--heartbeat", "0.2", *broker_options, *addrs], "broker")
        procs.start(
            ["worker", f"workers_for_tests:{worker_class}", addrs[1], "--credit", "4", "--heartbeat", "0.2"],
            worker_class,
            env={LOG_ENV: str(log_path), GATE_ENV: str(gate)},
        )
        return addrs[0]

    start.log_path = log_path  # type: ignore[attr-defined]
    start.gate = gate  # type: ignore[attr-defined]
    yield start
    gate.touch()


def test_submit_prints_the_answer_and_exits_0(cluster, tmp_path, subprocess_env, procs):
    address = cluster("DealerEcho")
    result = run_cli(["submit", address, "hello", "--wait", str(WAIT)], subprocess_env, tmp_path)
    assert (result.returncode, result.stdout) == (0, b"-hello"), (result, procs.output())
    assert result.stderr == b""
    # From stdin (no PAYLOAD, or "-"), bytes exactly as given; -v prints the id.
    data = b"\x00\xffbinary\n"
    result = run_cli(["submit", "-v", address, "--wait", str(WAIT)], subprocess_env, tmp_path, stdin=data)
    assert (result.returncode, result.stdout) == (0, b"-" + data), result
    found = re.search(rb"request id ([0-9a-f]{32})", result.stderr)
    assert found, result.stderr
    # The id it printed is the request's: the broker keeps its outcome under it.
    status = run_cli(["status", address, found.group(1).decode()], subprocess_env, tmp_path)
    assert (status.returncode, status.stdout) == (0, b"done (after 1 attempt)\n"), status
    result = run_cli(["submit", address, "-", "-T", "5", "-t", "2"], subprocess_env, tmp_path, stdin=b"piped")
    assert (result.returncode, result.stdout) == (0, b"-piped"), result


def test_submit_failed_exits_1_with_the_workers_error(cluster, tmp_path, subprocess_env):
    address = cluster("DealerFailer")
    result = run_cli(["submit", address, "doomed", "--tries", "2", "--wait", str(WAIT)], subprocess_env, tmp_path)
    assert result.returncode == 1, result
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "Dropped" in lines[0] and "doomed" in lines[0], lines
    assert len(runs(cluster.log_path, "doomed")) == 2


def test_submit_timed_out_exits_3_and_no_outcome_exits_6(cluster, tmp_path, subprocess_env):
    address = cluster("DealerGated")
    result = run_cli(
        ["submit", address, "0:gated-x", "-T", "0.2", "-t", "1", "--wait", str(WAIT)], subprocess_env, tmp_path
    )
    assert result.returncode == 3, result
    assert "timed out" in result.stderr.decode()
    result = run_cli(["submit", "-v", address, "0:gated-y", "--wait", "0.3"], subprocess_env, tmp_path)
    assert result.returncode == 6, result
    assert "no outcome within 0.3 s" in result.stderr.decode()


def test_status_and_cancel_of_a_running_request(cluster, tmp_path, subprocess_env, ctx):
    address = cluster("DealerGated")
    with Client(address, ctx) as client:
        future = client.submit(b"0:gated-long", tries=3)
        wait_until(lambda: runs(cluster.log_path, "0:gated-long"), timeout=WAIT, message="the job to start")
        rid_hex = future.request_id.hex()
        status = run_cli(["status", address, rid_hex], subprocess_env, tmp_path)
        assert (status.returncode, status.stdout.decode()) == (0, "running (attempt 1 of 3)\n"), status
        # The uuid form of the id works too.
        cancel = run_cli(["cancel", address, str(uuid.UUID(bytes=future.request_id))], subprocess_env, tmp_path)
        assert (cancel.returncode, cancel.stdout.decode()) == (0, "cancelled\n"), cancel
        with pytest.raises(TaskCancelled):
            future.result(WAIT)
        # The kept outcome of a cancelled request is CANCELLED: cancelling again says so.
        again = run_cli(["cancel", address, rid_hex], subprocess_env, tmp_path)
        assert (again.returncode, again.stdout.decode()) == (0, "cancelled\n"), again
        done = client.submit(b"0:quick", tries=3)
        assert done.result(WAIT) == b"-0:quick"
    late = run_cli(["cancel", address, done.request_id.hex()], subprocess_env, tmp_path)
    assert (late.returncode, late.stdout.decode()) == (1, "already finished: ok\n"), late
    unknown = uuid.uuid4().hex
    for command in ("status", "cancel"):
        result = run_cli([command, address, unknown], subprocess_env, tmp_path)
        assert (result.returncode, result.stdout.decode()) == (1, "unknown\n"), result


def test_broker_retention_0_keeps_no_outcome(cluster, tmp_path, subprocess_env):
    address = cluster("DealerEcho", "--retention", "0", "--retention-memory", "1G")
    result = run_cli(["submit", "-v", address, "forgotten", "--wait", str(WAIT)], subprocess_env, tmp_path)
    assert (result.returncode, result.stdout) == (0, b"-forgotten"), result
    rid = re.search(rb"request id ([0-9a-f]{32})", result.stderr).group(1).decode()
    status = run_cli(["status", address, rid], subprocess_env, tmp_path)
    assert (status.returncode, status.stdout) == (1, b"unknown\n"), status


def test_client_commands_without_a_broker_exit_6(tmp_path, subprocess_env, addrs):
    for args in (
        ["submit", addrs[0], "x", "--wait", "0.2"],
        ["status", addrs[0], uuid.uuid4().hex, "--wait", "0.2"],
        ["cancel", addrs[0], uuid.uuid4().hex, "-w", "0.2"],
    ):
        result = run_cli(args, subprocess_env, tmp_path)
        assert result.returncode == 6, result
        assert len(result.stderr.decode().splitlines()) == 1, result


A = "ipc://@A"  # placeholder, replaced by a real address

ERROR_CASES = {
    "submit-no-address": (["submit"], "required"),
    "submit-bad-address": (["submit", "nowhere", "x"], "not a ZeroMQ address"),
    "submit-bad-scheme": (["submit", "bogus://x", "x"], "bogus://x"),
    "submit-timeout-0": (["submit", A, "x", "-T", "0"], "timeout"),
    "submit-timeout-too-big": (["submit", A, "x", "--timeout", "5000000"], "at most"),
    "submit-timeout-nan": (["submit", A, "x", "-T", "nan"], "timeout"),
    "submit-tries-0": (["submit", A, "x", "--tries", "0"], "tries"),
    "submit-tries-too-many": (["submit", A, "x", "--tries", "1000001"], "tries"),
    "submit-tries-float": (["submit", A, "x", "-t", "1.5"], "not a whole number"),
    "submit-wait-0": (["submit", A, "x", "--wait", "0"], "--wait"),
    "submit-wait-word": (["submit", A, "x", "--wait", "long"], "not a number"),
    "submit-extra": (["submit", A, "x", "y"], "unrecognized"),
    "status-no-id": (["status", A], "required"),
    "status-bad-id": (["status", A, "1234"], "not a request id"),
    "cancel-bad-id": (["cancel", A, "zz" * 16], "not a request id"),
    "broker-retention-negative": (["broker", "--retention", "-1", A, A, A], "retention"),
    "broker-retention-word": (["broker", "--retention", "long", A, A, A], "not a number"),
    "broker-retention-memory-suffix": (["broker", "--retention-memory", "64Q", A, A, A], "not a size"),
    "broker-retention-memory-negative": (["broker", "--retention-memory=-1M", A, A, A], "retention_bytes"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, subprocess_env, addrs):
    args, expected = ERROR_CASES[case]
    args = [addrs[0] if a == A else a for a in args]
    result = run_cli(args, subprocess_env, tmp_path)
    assert result.returncode == 2, result
    err = result.stderr.decode()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert result.stdout == b""


def test_retention_memory_sizes():
    from fastbroker.cli import _memory

    assert _memory("65536") == 65536
    assert _memory("64M") == _memory("64MiB") == _memory("64mb") == 64 << 20
    assert _memory("1G") == 1 << 30
    assert _memory("0") == 0
    assert _memory("1.5K") == 1536
