"""Operations (issue 7): the STATS command, the latency histogram, the core's event
queue and the broker's INFO lines for it, `fastbroker stats`, the Prometheus endpoint
(--metrics-port) and JSON log lines (--log-format json).

Core-level tests drive the core in slices in the test thread (rigs.CRig,
raw FBW01 workers and FBC01 clients); the rest run a Broker in a thread or the
real `fastbroker` processes.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest
import zmq

from fastbroker import Broker, Client, protocol
from fastbroker.protocol import (
    C_STATS,
    CLIENT_SIGNATURE as CSIG,
    COUNTERS,
    DROP_REASONS,
    GAUGES,
    LATENCY_BOUNDS,
    R_FAILED,
    R_OK,
    R_STATS,
    R_TIMED_OUT,
    RUN_EVENT,
    RUN_TIMEOUT,
    decode_stats,
    stats_fields,
)
from fastbroker.server.logsetup import JsonFormatter, level_for
from fastbroker.server.metrics import MetricsServer, decode_stats_reply, format_stats
from rigs import PYTHON, SLICE, CRig, new_id, opts, reply, wait_until

WAIT = 20.0  # upper bound of waits on processes


def ask_stats(rig: CRig, client, rid: bytes = b"S" * 16) -> list:
    """Send STATS and return the reply frames."""
    assert client.inbox == [], client.inbox
    client.command(C_STATS, rid)
    return rig.reply(client)


def serve(rig: CRig, worker, client, payload: bytes) -> None:
    """One FBC01 job (no ACCEPTED) answered by `worker`."""
    rid = new_id()
    client.submit(rid, payload, options=opts(protocol.OPT_NO_ACK))
    task_id, got = rig.task(worker)
    assert got == [payload]
    worker.answer(task_id, b"re:" + payload)
    assert rig.reply(client) == reply(R_OK, rid, b"re:" + payload)


# ---------------------------------------------------------------------------
# STATS and the latency histogram, on the core
# ---------------------------------------------------------------------------


def test_stats_reply_carries_every_figure_of_core_stats(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    serve(rig, worker, client, b"one")
    serve(rig, worker, client, b"two")
    # A third request times out on its only try (the worker keeps it).
    rid = new_id()
    client.submit(rid, b"kept", options=opts(protocol.OPT_NO_ACK, 100, 1))
    rig.task(worker)
    assert rig.reply(client) == reply(R_TIMED_OUT, rid)

    frames = ask_stats(rig, client)
    assert frames[:3] == [CSIG, R_STATS, b"S" * 16] and len(frames) == 5, frames
    assert frames[3] == ",".join(stats_fields()).encode("ascii")
    assert len(frames[4]) == 8 * len(stats_fields())
    figures = decode_stats(frames[3], frames[4])
    assert decode_stats_reply(frames, b"S" * 16) == figures
    assert decode_stats_reply(frames, b"T" * 16) is None  # another request's reply

    stats = rig.stats()
    assert {k: figures[k] for k in COUNTERS + GAUGES} == {k: stats[k] for k in COUNTERS + GAUGES}
    assert (figures["requests"], figures["answered"], figures["timeouts"], figures["aborted"]) == (3, 2, 1, 1)
    assert (figures["workers"], figures["queued"], figures["running"], figures["dropped"]) == (1, 0, 0, 0)
    buckets = [figures[f"latency_le_{b:g}"] for b in LATENCY_BOUNDS] + [figures["latency_le_inf"]]
    assert buckets == stats["latency"]["counts"]
    assert figures["latency_count"] == 2 == sum(buckets)  # the timed-out request is not in it
    assert figures["latency_sum_us"] == int(stats["latency"]["sum"] * 1e6) > 0
    # STATS changes no figure but its own answer: asking again gives the same counters.
    again = decode_stats(*ask_stats(rig, client)[3:])
    assert {k: again[k] for k in COUNTERS} == {k: figures[k] for k in COUNTERS}


def test_stats_with_a_wrong_id_or_extra_frames_is_dropped(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    client.send(CSIG, C_STATS, b"short")
    client.send(CSIG, C_STATS, b"S" * 16, b"extra")
    rig.pump_stat("dropped", 2)
    drops = rig.stats()["drops"]
    assert drops == {DROP_REASONS[protocol.DROP_CLIENT_BAD_ID]: 1, DROP_REASONS[protocol.DROP_CLIENT_BAD_COMMAND]: 1}
    rig.quiet(client)


def test_latency_histogram_counts_answered_requests_by_their_time(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 2)
    client = rig.fbclient()
    for payload in (b"a", b"b", b"c"):
        serve(rig, worker, client, payload)
    # One more answered only after >= 0.15 s in the broker: it lands at or above 0.25 s.
    rid = new_id()
    client.submit(rid, b"slow", options=opts(protocol.OPT_NO_ACK))
    task_id, _ = rig.task(worker)
    held_from = time.monotonic()
    rig.pump_for(0.15)
    assert time.monotonic() - held_from >= 0.15
    worker.answer(task_id, b"late")
    assert rig.reply(client) == reply(R_OK, rid, b"late")

    latency = rig.stats()["latency"]
    assert tuple(latency["bounds"]) == LATENCY_BOUNDS
    counts = latency["counts"]
    assert len(counts) == len(LATENCY_BOUNDS) + 1
    assert latency["count"] == sum(counts) == 4
    slow = sum(n for bound, n in zip(LATENCY_BOUNDS + (float("inf"),), counts) if bound >= 0.25)
    assert slow >= 1, counts
    assert latency["sum"] >= 0.15


# ---------------------------------------------------------------------------
# The event queue
# ---------------------------------------------------------------------------


def pump_events(rig: CRig, expected: list, timeout: float = 10.0) -> None:
    """Run the core until it recorded len(expected) events; they must be `expected`."""
    got: list = []
    rig.pump(lambda: got.extend(rig.core.events()) or len(got) >= len(expected), timeout)
    rig.settle()
    got.extend(rig.core.events())
    assert got == expected


def test_events_of_workers_joining_leaving_and_dying(make_crig):
    rig = make_crig(liveness=3)  # 0.3 s of silence kills
    rig.core.record_events(True)
    staying = rig.dealer(b"W-stays")
    rig.register(staying, 1)
    pump_events(rig, [("worker_joined", b"W-stays", 0)])
    silent = rig.dealer(b"W-silent", live=False)
    rig.register(silent, 1)
    pump_events(rig, [("worker_joined", b"W-silent", 0)])
    pump_events(rig, [("worker_dead", b"W-silent", 0)])
    assert rig.stats()["workers_dead"] == 1
    staying.disconnect()
    pump_events(rig, [("worker_left", b"W-stays", 0)])
    assert rig.stats()["events_lost"] == 0


def test_events_of_requests_given_up(make_crig):
    rig = make_crig(timeout=0.1, tries=2)
    rig.core.record_events(True)
    worker = rig.dealer(b"W-events")
    rig.register(worker, 8)  # timed-out attempts keep their credit: room for all of them
    pump_events(rig, [("worker_joined", b"W-events", 0)])

    # A REQ client's request: both attempts time out, the client gets the empty answer.
    req = rig.client()
    req.send(b"req-job")
    attempts = [rig.task(worker)[0], rig.task(worker)[0]]
    assert rig.receive(req) == [b""]
    aborted = rig.core.events()
    rig.settle()
    aborted += rig.core.events()
    # A request keeps its task id across attempts; the event names it.
    assert attempts[0] == attempts[1]
    assert aborted == [("aborted", attempts[0], 2)]

    # FBC01: the worker reports FAILED on each of two tries.
    client = rig.fbclient()
    rid_failed = new_id()
    client.submit(rid_failed, b"fails", options=opts(protocol.OPT_NO_ACK, 60_000, 2))
    for _ in range(2):
        task_id, _ = rig.task(worker)
        worker.failed(task_id, b"ValueError", b"no")
    assert rig.reply(client) == reply(R_FAILED, rid_failed, b"ValueError", b"no")
    pump_events(rig, [("failed", rid_failed, 2)])

    # FBC01: three tries of 0.1 s, none answered.
    rid_timed = new_id()
    client.submit(rid_timed, b"hangs", options=opts(protocol.OPT_NO_ACK, 100, 3))
    for _ in range(3):
        rig.task(worker)
    assert rig.reply(client) == reply(R_TIMED_OUT, rid_timed)
    pump_events(rig, [("timed_out", rid_timed, 3)])


def test_no_events_are_kept_unless_asked_and_run_returns_on_one(make_crig):
    rig = make_crig(timeout=0.1, tries=1)
    worker = rig.dealer(b"W-quiet")
    rig.register(worker, 4)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"hangs", options=opts(protocol.OPT_NO_ACK))
    rig.task(worker)
    assert rig.reply(client) == reply(R_TIMED_OUT, rid)
    worker.disconnect()
    rig.pump_stat("workers_left", 1)
    # stop_on_event without record_events: nothing is kept, run() waits its time out.
    assert rig.core.run(-1, 0.05, False, True) == RUN_TIMEOUT
    assert rig.core.events() == []

    # Turned on: run(stop_on_event=True) returns RUN_EVENT after the turn of the join.
    rig.core.record_events(True)
    other = rig.dealer(b"W-loud")
    other.ready(1)
    deadline = time.monotonic() + 10
    result = RUN_TIMEOUT
    for _ in range(1000):
        result = rig.core.run(-1, SLICE, False, True)
        if result == RUN_EVENT or time.monotonic() > deadline:
            break
    assert result == RUN_EVENT
    assert rig.core.events() == [("worker_joined", b"W-loud", 0)]
    assert rig.core.events() == []  # read once
    # Turned off again: what was pending is dropped, nothing new is kept.
    other.disconnect()
    rig.pump_stat("workers_left", 2)
    rig.core.record_events(False)
    assert rig.core.events() == []


# ---------------------------------------------------------------------------
# Broker.run logs the events at INFO
# ---------------------------------------------------------------------------


class RunningBroker:
    """A Broker on ipc endpoints in tmp_path, run() in a thread; a raw FBW01 worker
    and an FBC01 DEALER client on another context."""

    def __init__(self, tmp_path, core_name: str, ctx: zmq.Context, **options) -> None:
        addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
        self.broker = Broker(None, None, None, *addrs, core=core_name, heartbeat=1.0, liveness=20, **options)
        self.ctx = ctx
        self.addrs = addrs
        self.thread = threading.Thread(target=self.broker.run, daemon=True)

    def start(self) -> RunningBroker:
        self.thread.start()
        return self

    def dealer(self, address: str, identity: bytes = b"") -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(address)
        return sock

    def close(self) -> None:
        self.broker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.broker.close()


def recv(sock: zmq.Socket, timeout: float = 10.0) -> list:
    assert sock.poll(int(timeout * 1000)), "nothing received"
    return sock.recv_multipart()


def next_task(sock: zmq.Socket, timeout: float = 10.0) -> list:
    """The next TASK a raw FBW01 worker gets (skipping heartbeats)."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        frames = recv(sock, max(0.01, deadline - time.monotonic()))
        if frames[2] == protocol.CMD_TASK:
            return frames
    pytest.fail("no TASK")


def test_broker_run_logs_one_info_line_per_event(tmp_path, core_name, ctx, caplog):
    caplog.set_level(logging.INFO, logger="fastbroker.broker")
    rb = RunningBroker(tmp_path, core_name, ctx).start()
    try:
        worker = rb.dealer(rb.addrs[1], b"W-log")
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_READY, (4).to_bytes(4, "big")])
        client = rb.dealer(rb.addrs[0])
        rid_failed, rid_timed = uuid.uuid4().bytes, uuid.uuid4().bytes
        client.send_multipart([CSIG, protocol.C_SUBMIT, rid_failed, opts(protocol.OPT_NO_ACK, 0, 1), b"fails"])
        task = next_task(worker)
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_FAILED, task[3], b"KeyError", b"k"])
        assert recv(client)[:3] == [CSIG, R_FAILED, rid_failed]
        client.send_multipart([CSIG, protocol.C_SUBMIT, rid_timed, opts(protocol.OPT_NO_ACK, 100, 1), b"hangs"])
        next_task(worker)
        assert recv(client) == [CSIG, R_TIMED_OUT, rid_timed]
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_DISCONNECT])

        def events():
            return [r for r in caplog.records if r.name == "fastbroker.broker" and hasattr(r, "event")]

        wait_until(lambda: len(events()) >= 4, timeout=10, message="four event lines")
    finally:
        rb.close()
    records = events()
    assert [r.levelno for r in records] == [logging.INFO] * 4
    assert [(r.event, r.getMessage()) for r in records] == [
        ("worker_joined", f"worker {b'W-log'.hex()} joined"),
        ("failed", f"request {rid_failed.hex()} failed after 1 attempt(s)"),
        ("timed_out", f"request {rid_timed.hex()} timed out after 1 attempt(s)"),
        ("worker_left", f"worker {b'W-log'.hex()} left (DISCONNECT)"),
    ]
    assert records[0].worker == b"W-log".hex()
    assert (records[1].request_id, records[1].attempts) == (rid_failed.hex(), 1)
    assert "broker stopped" in caplog.text


def test_broker_run_keeps_no_events_with_info_off(tmp_path, core_name, ctx, caplog):
    caplog.set_level(logging.WARNING, logger="fastbroker.broker")
    rb = RunningBroker(tmp_path, core_name, ctx).start()
    try:
        worker = rb.dealer(rb.addrs[1], b"W-off")
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_READY, (1).to_bytes(4, "big")])
        wait_until(lambda: rb.broker.stats()["workers_joined"] == 1, timeout=10, message="the worker to join")
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_DISCONNECT])
        wait_until(lambda: rb.broker.stats()["workers_left"] == 1, timeout=10, message="the worker to leave")
        rb.broker.stop()
        rb.thread.join(10)
        # The core was never asked to keep events (a private look: nothing else shows it).
        assert rb.broker._core.events() == []
    finally:
        rb.close()
    assert not [r for r in caplog.records if hasattr(r, "event")]


# ---------------------------------------------------------------------------
# The metrics collector and server, in-process
# ---------------------------------------------------------------------------


def scrape(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_server_reads_the_running_broker(tmp_path, core_name, ctx):
    rb = RunningBroker(tmp_path, core_name, ctx)
    server = MetricsServer(rb.broker, 0, wait=5.0)
    try:
        # Before run(): no STATS answer, the scrape carries no fastbroker metric.
        server.collector.wait = 0.1
        assert not [k for k in scrape(server.url) if k[0].startswith("fastbroker_")]
        server.collector.wait = 5.0
        rb.start()
        worker = rb.dealer(rb.addrs[1], b"W-metrics")
        worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_READY, (1).to_bytes(4, "big")])
        client = rb.dealer(rb.addrs[0])
        for _ in range(2):
            rid = uuid.uuid4().bytes
            client.send_multipart([CSIG, protocol.C_SUBMIT, rid, opts(protocol.OPT_NO_ACK), b"job"])
            task = next_task(worker)
            worker.send_multipart([b"", protocol.WORKER_SIGNATURE, protocol.CMD_ANSWER, task[3], b"done"])
            assert recv(client) == [CSIG, R_OK, rid, b"done"]
        client.send_multipart([CSIG, C_STATS, b"bad id"])  # dropped: a reason label counts it
        wait_until(lambda: rb.broker.stats()["dropped"] == 1, timeout=10, message="the drop")
        samples = scrape(server.url)
    finally:
        server.close()
        rb.close()
    assert samples[("fastbroker_requests_total", ())] == 2
    assert samples[("fastbroker_answered_total", ())] == 2
    assert samples[("fastbroker_workers", ())] == 1
    assert samples[("fastbroker_workers_idle", ())] == 1
    assert samples[("fastbroker_jobs_running", ())] == 0
    assert samples[("fastbroker_job_latency_seconds_count", ())] == 2
    assert samples[("fastbroker_job_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("fastbroker_job_latency_seconds_sum", ())] > 0
    bad_id = DROP_REASONS[protocol.DROP_CLIENT_BAD_ID]
    assert samples[("fastbroker_dropped_total", (("reason", bad_id),))] == 1
    assert sum(v for (name, _), v in samples.items() if name == "fastbroker_dropped_total") == 1
    # Replies the broker could not send (none here) are exported from the first scrape on.
    assert samples[("fastbroker_replies_dropped_total", ())] == 0
    assert samples[("fastbroker_replies_unroutable_total", ())] == 0


# ---------------------------------------------------------------------------
# JSON log lines
# ---------------------------------------------------------------------------


def test_json_formatter_writes_the_extra_fields_and_the_exception():
    formatter = JsonFormatter()
    record = logging.LogRecord("fastbroker.broker", logging.INFO, __file__, 1, "worker %s joined", ("ab",), None)
    record.event, record.worker = "worker_joined", "ab"
    line = json.loads(formatter.format(record))
    assert {k: line[k] for k in ("level", "logger", "message", "event", "worker")} == {
        "level": "INFO",
        "logger": "fastbroker.broker",
        "message": "worker ab joined",
        "event": "worker_joined",
        "worker": "ab",
    }
    assert line["time"].endswith("+00:00")
    try:
        raise KeyError("boom")
    except KeyError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(formatter.format(record))
    assert "KeyError" in line["exception"] and line["message"] == "failed"
    assert [level_for(n) for n in (0, 1, 2, 3)] == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]


def test_format_stats_table():
    figures = {
        "requests": 3,
        "queued": 0,
        "latency_le_0.001": 1,
        "latency_le_inf": 1,
        "latency_count": 2,
        "latency_sum_us": 3000,
    }
    lines = format_stats(figures).splitlines()
    assert lines[0].split() == ["requests", "3"]
    assert ["latency_mean", "1.500", "ms"] in [line.split() for line in lines]
    assert [line.split() for line in lines[-2:]] == [["latency", "<=", "1", "ms", "1"], ["latency", "<=", "inf", "1"]]


# ---------------------------------------------------------------------------
# The command: stats, --metrics-port, --log-format json
# ---------------------------------------------------------------------------


def run_cli(args, env, cwd, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "fastbroker", *args], capture_output=True, env=env, cwd=str(cwd), timeout=timeout
    )


def json_lines(path) -> list:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_stats_command_and_metrics_of_a_broker_process(procs, tmp_path, subprocess_env, core_name, ctx):
    addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
    broker = procs.start(
        [
            "-v",
            "--log-format",
            "json",
            "broker",
            "--core",
            core_name,
            "--heartbeat",
            "0.2",
            "--metrics-port",
            "0",
            *addrs,
        ],
        "broker",
    )
    procs.start(["worker", "workers_for_tests:DealerEcho", addrs[1], "--heartbeat", "0.2"], "worker")

    def metrics_url():
        try:
            entries = json_lines(broker.stderr_path)
        except ValueError:  # a line being written
            return None
        for entry in entries:
            if entry["logger"] == "fastbroker.metrics" and "metrics on http" in entry["message"]:
                return entry["message"].split(" on ", 1)[1]
        return None

    url = wait_until(metrics_url, timeout=WAIT, message=f"the metrics line\n{procs.output()}")
    with Client(addrs[0], ctx) as client:
        assert [client.call(b"job%d" % i, wait=WAIT) for i in range(3)] == [b"-job0", b"-job1", b"-job2"]

    result = run_cli(["stats", addrs[0], "--json"], subprocess_env, tmp_path)
    assert result.returncode == 0, result
    figures = json.loads(result.stdout)
    assert list(figures) == list(stats_fields())
    assert (figures["requests"], figures["answered"], figures["workers"], figures["latency_count"]) == (3, 3, 1, 3)

    result = run_cli(["stats", addrs[0]], subprocess_env, tmp_path)
    assert result.returncode == 0 and result.stderr == b"", result
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.decode().splitlines()}
    assert rows["answered"] == ["3"] and rows["workers"] == ["1"] and rows["latency_count"] == ["3"]

    samples = scrape(url)
    assert samples[("fastbroker_requests_total", ())] == 3
    assert samples[("fastbroker_answered_total", ())] == 3
    assert samples[("fastbroker_workers", ())] == 1
    assert samples[("fastbroker_workers_joined_total", ())] == 1
    assert samples[("fastbroker_jobs_queued", ())] == 0
    assert samples[("fastbroker_job_latency_seconds_count", ())] == 3
    # Cumulative buckets: never decreasing, +Inf is the count.
    le = [
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "fastbroker_job_latency_seconds_bucket"
    ]
    values = [v for _, v in sorted(le)]
    assert len(values) == len(LATENCY_BOUNDS) + 1 and values == sorted(values) and values[-1] == 3
    for name in ("failed", "timeouts", "retried", "aborted", "cancelled", "rejected", "workers_left", "workers_dead"):
        assert samples[(f"fastbroker_{name}_total", ())] == 0, name

    broker.terminate()
    assert broker.wait(WAIT) == 0, procs.output()
    entries = json_lines(broker.stderr_path)  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    joined = [e for e in entries if e.get("event") == "worker_joined"]
    assert len(joined) == 1 and joined[0]["level"] == "INFO" and len(joined[0]["worker"]) >= 2
    assert any(e["message"].startswith("broker stopped") for e in entries)


def test_stats_command_errors(tmp_path, subprocess_env):
    result = run_cli(["stats", f"ipc://{tmp_path}/nobody", "--wait", "0.3"], subprocess_env, tmp_path)
    assert result.returncode == 6, result
    assert result.stdout == b"" and len(result.stderr.splitlines()) == 1 and b"no answer" in result.stderr
    result = run_cli(["stats", "not-an-address"], subprocess_env, tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
    result = run_cli(["--log-format", "xml", "stats", "ipc://x"], subprocess_env, tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result


def test_metrics_port_in_use_exits_2_with_one_line(tmp_path, subprocess_env, core_name):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
        result = run_cli(
            ["broker", "--core", core_name, "--metrics-port", str(port), *addrs], subprocess_env, tmp_path, timeout=WAIT
        )
    assert result.returncode == 2, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines
    result = run_cli(["broker", "--metrics-port", "70000", *addrs], subprocess_env, tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
