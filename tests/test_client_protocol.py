"""The FBC01 client protocol (docs/PROTOCOL.md section 10) on the live core, driven
in-process.

The core runs in short slices in the test thread (as in test_core_loop.py). Raw DEALER
sockets play the FBC01 clients and write every frame themselves:
[b"FBC01", command, id, body...], with no empty delimiter. Raw FBW01 DEALER workers
(rigs.FBWorker) and original REQ clients and workers share the broker
with them. Every pump of the core also reads what the clients and workers got, in order.
"""

from __future__ import annotations

import time

import pytest
import zmq

from fastbroker import protocol
from fastbroker.protocol import (
    C_CANCEL,
    C_RESULT,
    C_STATUS,
    C_SUBMIT,
    CLIENT_SIGNATURE as CSIG,
    CMD_CANCEL,
    CMD_TASK,
    DROP_REASONS,
    MAX_REQUEST_TIMEOUT_MS,
    MAX_REQUEST_TRIES,
    MAX_WAITERS,
    OPT_NO_ACK,
    R_ACCEPTED,
    R_CANCELLED,
    R_FAILED,
    R_OK,
    R_REJECTED,
    R_STATUS,
    R_TIMED_OUT,
    R_UNKNOWN,
    REJECT_BAD_OPTIONS,
    REJECT_REASONS,
    RESULT_OVERHEAD,
    STATE_DONE,
    STATE_QUEUED,
    STATE_RUNNING,
    WORKER_SIGNATURE as WSIG,
)
from rigs import LONG_TIMEOUT, NO_ACK, CRig, FBClient, assert_stats, new_id, opts, peer_gone, reply, status

UNKNOWN_TASK = DROP_REASONS[protocol.DROP_ANSWER_UNKNOWN]
BAD_COMMAND = DROP_REASONS[protocol.DROP_CLIENT_BAD_COMMAND]
BAD_ID = DROP_REASONS[protocol.DROP_CLIENT_BAD_ID]
SHORT_MS = 100  # a per-request timeout that must expire during the test


def tasks_for(worker, payload: bytes) -> list:
    """Task ids of the TASKs `worker` holds in its inbox whose payload is [payload]."""
    return [m[3] for m in worker.inbox if m[2] == CMD_TASK and m[4:] == [payload]]


def serve_one_of_each(rig: CRig) -> None:
    """A whole FBC01 job and a whole REQ job, on fresh sockets and a fresh worker."""
    before = rig.stats()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"fine")
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    task_id, payload = rig.task(worker)
    assert payload == [b"fine"]
    worker.answer(task_id, b"re:fine")
    assert rig.reply(client) == reply(R_OK, rid, b"re:fine")
    req = rig.client()
    req.send(b"classic")
    task_id, payload = rig.task(worker)
    assert payload == [b"classic"]
    worker.answer(task_id, b"re:classic")
    assert rig.receive(req) == [b"re:classic"]
    assert rig.stats()["answered"] == before["answered"] + 2


# ---------------------------------------------------------------------------
# SUBMIT: ACCEPTED, OK, options
# ---------------------------------------------------------------------------


def test_submit_accepted_then_ok_with_the_answer_frames_exactly(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    payload = [b"part one", b"", b"\x00\xff three"]  # empty frames are payload too
    client.submit(rid, *payload)
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    task_id, got = rig.task(worker)
    assert got == payload
    answer = [b"answer", b"", b"\x00in three"]
    worker.answer(task_id, *answer)
    assert rig.reply(client) == reply(R_OK, rid, *answer)
    rig.quiet(client, worker)
    assert_stats(
        rig.stats(),
        requests=1,
        dispatched=1,
        answered=1,
        running=0,
        queued=0,
        duplicates=0,
        rejected=0,
        dropped=0,
        idle_workers=1,
    )


def test_all_zero_options_are_the_defaults(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=opts(0, 0, 0))
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, 0)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"done")
    assert rig.reply(client) == reply(R_OK, rid, b"done")


def test_no_ack_gives_only_the_outcome(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"a", b"b", options=NO_ACK)
    task_id, payload = rig.task(worker)
    assert payload == [b"a", b"b"]
    rig.quiet(client)  # no ACCEPTED
    worker.answer(task_id, b"x")
    assert rig.reply(client) == reply(R_OK, rid, b"x")
    rig.quiet(client)
    assert_stats(rig.stats(), requests=1, answered=1)


def test_extreme_valid_options_are_accepted(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=opts(OPT_NO_ACK, MAX_REQUEST_TIMEOUT_MS, MAX_REQUEST_TRIES))
    task_id, _ = rig.task(worker)
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, MAX_REQUEST_TRIES)
    worker.answer(task_id, b"ok")
    assert rig.reply(client) == reply(R_OK, rid, b"ok")
    assert_stats(rig.stats(), rejected=0, timeouts=0)


def test_fbc01_and_req_requests_share_one_fifo(make_crig):
    rig = make_crig()
    req1, req2 = rig.client(), rig.client()
    client = rig.fbclient()
    rid = new_id()
    req1.send(b"r1")
    rig.pump_stat("requests", 1)
    client.submit(rid, b"f1", options=NO_ACK)
    rig.pump_stat("requests", 2)
    req2.send(b"r2")
    rig.pump_stat("requests", 3)
    worker = rig.dealer()
    rig.register(worker, 1)
    for expected, peer in [(b"r1", req1), (b"f1", client), (b"r2", req2)]:
        task_id, payload = rig.task(worker)
        assert payload == [expected]
        worker.answer(task_id, b"re:" + expected)
        if peer is client:
            assert rig.reply(client) == reply(R_OK, rid, b"re:f1")
        else:
            assert rig.receive(peer) == [b"re:" + expected]


# ---------------------------------------------------------------------------
# per-request timeout and tries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("broker_timeout", [None, LONG_TIMEOUT])
def test_per_request_timeout_retries_only_that_request(make_crig, broker_timeout):
    rig = make_crig(timeout=broker_timeout)
    worker = rig.dealer()
    rig.register(worker, 4)  # room for both jobs and the short one's retry (its ghost stays)
    client = rig.fbclient()
    short, default = new_id(), new_id()
    client.submit(short, b"short", options=opts(0, SHORT_MS, 2))
    client.submit(default, b"default")
    assert rig.reply(client) == reply(R_ACCEPTED, short)
    assert rig.reply(client) == reply(R_ACCEPTED, default)
    # The worker never answers: the short one is sent twice, then TIMED_OUT.
    assert rig.reply(client, timeout=10) == reply(R_TIMED_OUT, short)
    assert len(tasks_for(worker, b"short")) == 2
    # The other one, under the broker's timeout (none, or a long one), keeps running.
    rig.pump_for(4 * SHORT_MS / 1000)
    assert len(tasks_for(worker, b"default")) == 1 and len(tasks_for(worker, b"short")) == 2
    assert client.inbox == []
    assert_stats(rig.stats(), timeouts=2, retried=1, aborted=1, dispatched=3, running=1)
    assert rig.ask(client, C_STATUS, default) == status(default, STATE_RUNNING, 1, 0)
    (task_id,) = tasks_for(worker, b"default")
    worker.answer(task_id, b"late but fine")
    assert rig.reply(client) == reply(R_OK, default, b"late but fine")


def test_zero_options_take_the_broker_timeout_and_tries_and_a_longer_one_wins(make_crig):
    rig = make_crig(timeout=SHORT_MS / 1000, tries=2)
    worker = rig.dealer()
    rig.register(worker, 4)
    client = rig.fbclient()
    default, patient = new_id(), new_id()
    client.submit(default, b"default", options=opts(OPT_NO_ACK, 0, 0))
    client.submit(patient, b"patient", options=opts(OPT_NO_ACK, 60_000, 0))
    assert rig.reply(client) == reply(R_TIMED_OUT, default)
    assert len(tasks_for(worker, b"default")) == 2  # the broker's tries
    rig.pump_for(4 * SHORT_MS / 1000)
    assert len(tasks_for(worker, b"patient")) == 1  # its own 60 s, not the broker's 0.1 s
    assert client.inbox == []
    assert rig.ask(client, C_STATUS, patient) == status(patient, STATE_RUNNING, 1, 2)
    assert_stats(rig.stats(), timeouts=2, aborted=1)


@pytest.mark.parametrize("tries", [1, 3])
def test_per_request_tries_are_exact(make_crig, tries):
    rig = make_crig()  # broker: no timeout, unlimited tries
    worker = rig.dealer()
    rig.register(worker, 5)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"doomed", options=opts(OPT_NO_ACK, 50, tries))
    assert rig.reply(client) == reply(R_TIMED_OUT, rid)
    rig.pump_for(0.3)  # no attempt after the last
    assert len(tasks_for(worker, b"doomed")) == tries
    assert set(tasks_for(worker, b"doomed")) == {tasks_for(worker, b"doomed")[0]}  # one id
    assert client.inbox == []
    assert_stats(
        rig.stats(), timeouts=tries, retried=tries - 1, aborted=1, dispatched=tries, answered=0, queued=0, running=0
    )
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_DONE, tries, tries)
    assert rig.ask(client, C_RESULT, rid) == reply(R_TIMED_OUT, rid)


def test_tries_above_the_maximum_are_capped(make_crig):
    rig = make_crig(tries=3)
    client = rig.fbclient()
    ids = {new_id(): t for t in (MAX_REQUEST_TRIES, MAX_REQUEST_TRIES + 1, 0xFFFFFFFF)}
    for rid, tries in ids.items():
        client.submit(rid, b"job", options=opts(OPT_NO_ACK, 0, tries))
    rig.pump_stat("requests", 3)
    for rid in ids:
        assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_QUEUED, 0, MAX_REQUEST_TRIES)
    other = new_id()
    client.submit(other, b"job", options=opts(OPT_NO_ACK, 0, 7))
    rig.pump_stat("requests", 4)
    assert rig.ask(client, C_STATUS, other) == status(other, STATE_QUEUED, 0, 7)
    assert_stats(rig.stats(), rejected=0)


# ---------------------------------------------------------------------------
# FAILED and TIMED_OUT outcomes
# ---------------------------------------------------------------------------


def test_failed_outcome_carries_the_latest_failure(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"doomed", options=opts(OPT_NO_ACK, 0, 3))
    reports = [(b"ValueError", b"first"), (b"KeyError", b"second"), (b"OSError", "tr\u00efd".encode())]
    for kind, message in reports:
        task_id, payload = rig.task(worker)
        assert payload == [b"doomed"]
        worker.failed(task_id, kind, message)
    outcome = reply(R_FAILED, rid, b"OSError", "tr\u00efd".encode())
    assert rig.reply(client) == outcome
    rig.quiet(client, worker)
    assert_stats(rig.stats(), failed=3, retried=2, aborted=1, dispatched=3, answered=0)
    # The kept outcome, to anyone who asks.
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_DONE, 3, 3)
    assert rig.ask(client, C_RESULT, rid) == outcome
    other = rig.fbclient()
    other.submit(rid, b"again")
    assert rig.reply(other) == reply(R_ACCEPTED, rid)
    assert rig.reply(other) == outcome
    rig.quiet(worker, client, other)
    assert_stats(rig.stats(), requests=1, duplicates=1, dispatched=3)


# Each step ends one attempt: the worker reports FAILED, the attempt times out, or the
# worker that holds it disconnects (is lost).
@pytest.mark.parametrize(
    "steps, expected",
    [
        (["failed", "timeout"], "failed"),
        (["timeout", "failed"], "failed"),
        (["failed", "lost"], "failed"),
        (["timeout", "timeout"], "timed_out"),
        (["timeout", "lost"], "timed_out"),
        (["lost"], "timed_out"),
    ],
)
def test_the_outcome_after_the_last_try(make_crig, steps, expected):
    rig = make_crig()
    client = rig.fbclient()
    rid = new_id()
    # A timeout long enough that a FAILED sent at once always comes first.
    client.submit(rid, b"job", options=opts(OPT_NO_ACK, 300, len(steps)))
    # One worker with room for a timed-out attempt's ghost and the retry; after FAILED
    # the retry goes back to it (no other is idle); a new one after it is lost.
    worker = rig.dealer()
    rig.register(worker, 4)
    failures = []
    for i, step in enumerate(steps):
        task_id, payload = rig.task(worker)
        assert payload == [b"job"]
        if step == "failed":
            failures.append((b"Err%d" % i, b"message %d" % i))
            worker.failed(task_id, *failures[-1])
            rig.pump_stat("failed", steps[: i + 1].count("failed"))
        elif step == "timeout":
            rig.pump_stat("timeouts", steps[: i + 1].count("timeout"))
        else:
            worker.disconnect()
            rig.pump_stat("workers_left", steps[: i + 1].count("lost"))
            worker = rig.dealer()
            rig.register(worker, 4)
    if expected == "failed":
        assert rig.reply(client) == reply(R_FAILED, rid, *failures[-1])
    else:
        assert rig.reply(client) == reply(R_TIMED_OUT, rid)
    rig.quiet(client, worker)
    assert_stats(
        rig.stats(),
        aborted=1,
        answered=0,
        dispatched=len(steps),
        queued=0,
        running=0,
        retried=len(steps) - 1,
        requests=1,
    )


@pytest.mark.parametrize("how", ["timeout", "failed"])
def test_req_client_still_gets_the_empty_answer_on_abort(make_crig, how):
    rig = make_crig(timeout=SHORT_MS / 1000 if how == "timeout" else None, tries=1)
    worker = rig.dealer()
    rig.register(worker, 4)
    req = rig.client()
    client = rig.fbclient()
    rid = new_id()
    req.send(b"classic")
    client.submit(rid, b"new", options=NO_ACK)
    if how == "failed":
        rig.pump(lambda: tasks_for(worker, b"classic") and tasks_for(worker, b"new"))
        worker.failed(tasks_for(worker, b"classic")[0], b"ValueError", b"no")
        worker.failed(tasks_for(worker, b"new")[0], b"ValueError", b"no")
    assert rig.receive(req) == [b""]  # the original empty answer
    if how == "timeout":
        expected = reply(R_TIMED_OUT, rid)
    else:
        expected = reply(R_FAILED, rid, b"ValueError", b"no")
    assert rig.reply(client) == expected
    assert_stats(rig.stats(), aborted=2, answered=0)


# ---------------------------------------------------------------------------
# CANCEL
# ---------------------------------------------------------------------------


def test_cancel_a_queued_request(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    rid, later = new_id(), new_id()
    client.submit(rid, b"never", options=opts(0, 0, 5))
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_QUEUED, 0, 5)
    assert rig.ask(client, C_CANCEL, rid) == reply(R_CANCELLED, rid)
    rig.quiet(client)  # once
    assert_stats(
        rig.stats(), cancelled=1, queued=0, running=0, aborted=0, requests=1, retained=1, retained_bytes=RESULT_OVERHEAD
    )  # an outcome without frames
    # A worker that connects later never gets it; it gets the next request.
    worker = rig.dealer()
    rig.register(worker, 1)
    rig.quiet(worker)
    assert rig.stats()["idle_workers"] == 1
    client.submit(later, b"later", options=NO_ACK)
    task_id, payload = rig.task(worker)
    assert payload == [b"later"]
    worker.answer(task_id, b"done")
    assert rig.reply(client) == reply(R_OK, later, b"done")
    # The cancelled one is finished: its kept outcome, never run.
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_DONE, 0, 5)
    assert rig.ask(client, C_RESULT, rid) == reply(R_CANCELLED, rid)
    assert rig.ask(client, C_CANCEL, rid) == reply(R_CANCELLED, rid)
    rig.quiet(client, worker)
    assert_stats(rig.stats(), cancelled=1, dispatched=1)


@pytest.mark.parametrize("ending", ["answer", "failed"])
def test_cancel_a_running_job(make_crig, ending):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    first, second = new_id(), new_id()
    client.submit(first, b"first", options=NO_ACK)
    task_id, _ = rig.task(worker)
    assert rig.ask(client, C_CANCEL, first) == reply(R_CANCELLED, first)
    assert rig.next_message(worker) == [b"", WSIG, CMD_CANCEL, task_id]
    rig.quiet(client, worker)
    assert_stats(rig.stats(), cancelled=1, running=0, queued=0, idle_workers=0, aborted=0)
    # Its credit stays taken: the next request waits for the worker to end the job.
    client.submit(second, b"second", options=NO_ACK)
    rig.pump_stat("requests", 2)
    rig.quiet(worker)
    assert rig.ask(client, C_STATUS, second) == status(second, STATE_QUEUED, 0, 0)
    if ending == "answer":
        worker.answer(task_id, b"too late")
    else:
        worker.failed(task_id, b"CancelledError", b"stopped")
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 1}
    # Now its credit is free.
    second_task, payload = rig.task(worker)
    assert payload == [b"second"]
    worker.answer(second_task, b"two")
    assert rig.reply(client) == reply(R_OK, second, b"two")
    rig.quiet(client, worker)  # never an OK (or anything else) for the cancelled one
    assert rig.ask(client, C_RESULT, first) == reply(R_CANCELLED, first)
    assert rig.ask(client, C_STATUS, first) == status(first, STATE_DONE, 1, 0)
    assert_stats(rig.stats(), cancelled=1, answered=1, failed=0, aborted=0, dispatched=2)


def test_cancel_a_job_running_on_a_req_worker(make_crig):
    rig = make_crig()
    req_worker = rig.worker()
    rig.ready(req_worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=NO_ACK)
    task_id, payload = rig.receive(req_worker)
    assert payload == b"job"
    assert rig.ask(client, C_CANCEL, rid) == reply(R_CANCELLED, rid)
    rig.settle()
    assert req_worker.poll(0) == 0  # a REQ worker is not told
    rig.answer(task_id, b"too late")
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 1}
    rig.quiet(client)
    assert_stats(rig.stats(), cancelled=1, answered=0)


@pytest.mark.parametrize("canceller", ["waiter", "other"])
def test_cancelled_goes_to_every_waiter_and_the_canceller_once(make_crig, canceller):
    rig = make_crig()
    a, b = rig.fbclient(), rig.fbclient()
    rid = new_id()
    a.submit(rid, b"job", options=NO_ACK)
    rig.pump_stat("requests", 1)
    b.submit(rid, b"job", options=NO_ACK)
    rig.pump_stat("duplicates", 1)
    assert rig.ask(a, C_RESULT, rid) == status(rid, STATE_QUEUED, 0, 0)  # a waiter already
    c = a if canceller == "waiter" else rig.fbclient()
    c.command(C_CANCEL, rid)
    peers = [a, b] + ([c] if c is not a else [])
    rig.pump(lambda: all(p.inbox for p in peers))
    rig.settle()
    for peer in peers:
        assert peer.inbox == [reply(R_CANCELLED, rid)]
    assert_stats(rig.stats(), cancelled=1, requests=1)


def test_cancel_by_another_socket_reaches_a_full_list_of_waiters(make_crig):
    """The canceller is told besides the waiters: it must not push the oldest waiter
    out of a full list (MAX_WAITERS) and so leave it without the outcome."""
    rig = make_crig()
    waiters = [rig.fbclient() for _ in range(MAX_WAITERS)]
    rid = new_id()
    for i, client in enumerate(waiters):
        client.submit(rid, b"job", options=NO_ACK)
        rig.pump_stat("duplicates" if i else "requests", i or 1)
    canceller = rig.fbclient()
    canceller.command(C_CANCEL, rid)
    rig.pump(lambda: canceller.inbox)
    rig.settle()
    assert canceller.inbox == [reply(R_CANCELLED, rid)]
    got = {i: w.inbox for i, w in enumerate(waiters)}
    assert got == {i: [reply(R_CANCELLED, rid)] for i in range(MAX_WAITERS)}


def test_cancel_while_waiting_for_a_retry(make_crig):
    rig = make_crig()
    slow = rig.dealer()
    rig.register(slow, 1)
    client = rig.fbclient()
    rid, next_rid = new_id(), new_id()
    client.submit(rid, b"job", options=opts(OPT_NO_ACK, SHORT_MS, 3))
    task_id, _ = rig.task(slow)
    rig.pump_stat("timeouts", 1)  # the retry waits: the slow worker's credit is taken
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_QUEUED, 1, 3)
    assert rig.ask(client, C_CANCEL, rid) == reply(R_CANCELLED, rid)
    other = rig.dealer()
    rig.register(other, 1)
    rig.quiet(other, client)  # never run again
    slow.answer(task_id, b"too late")
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 1}
    rig.quiet(client)  # no OK after CANCELLED
    # Both workers are free.
    assert_stats(rig.stats(), idle_workers=2, cancelled=1, answered=0, dispatched=1)
    client.submit(next_rid, b"next", options=NO_ACK)
    rig.pump(lambda: other.inbox or slow.inbox)
    assert_stats(rig.stats(), dispatched=2)


def test_unknown_ids(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    rid = new_id()
    for cmd in (C_STATUS, C_RESULT, C_CANCEL):
        assert rig.ask(client, cmd, rid) == reply(R_UNKNOWN, rid)
    rig.quiet(client)
    assert_stats(rig.stats(), requests=0, cancelled=0, dropped=0)


# ---------------------------------------------------------------------------
# STATUS
# ---------------------------------------------------------------------------


def test_status_follows_the_request(make_crig):
    rig = make_crig()
    client, watcher = rig.fbclient(), rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=opts(OPT_NO_ACK, 300, 3))
    rig.pump_stat("requests", 1)
    assert rig.ask(watcher, C_STATUS, rid) == status(rid, STATE_QUEUED, 0, 3)
    slow = rig.dealer()
    rig.register(slow, 1)
    task_id, _ = rig.task(slow)
    assert rig.ask(watcher, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, 3)
    # The attempt times out; the slow worker still holds it (its credit is taken), so
    # the retry waits in the queue.
    rig.pump_stat("timeouts", 1)
    assert rig.ask(watcher, C_STATUS, rid) == status(rid, STATE_QUEUED, 1, 3)
    other = rig.dealer()
    rig.register(other, 1)
    retry_id, _ = rig.task(other)
    assert retry_id == task_id
    assert rig.ask(watcher, C_STATUS, rid) == status(rid, STATE_RUNNING, 2, 3)
    other.answer(task_id, b"second")
    assert rig.reply(client) == reply(R_OK, rid, b"second")
    assert rig.ask(watcher, C_STATUS, rid) == status(rid, STATE_DONE, 2, 3)
    # The first attempt's answer comes after the outcome: dropped.
    slow.answer(task_id, b"first")
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 1}
    rig.quiet(client, watcher)  # STATUS made the watcher no waiter
    assert rig.ask(watcher, C_STATUS, new_id())[1] == R_UNKNOWN


def test_late_answer_from_the_first_attempt_wins(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=opts(OPT_NO_ACK, SHORT_MS, 3))
    slow = rig.dealer()
    rig.register(slow, 1)
    task_id, _ = rig.task(slow)
    rig.pump_stat("timeouts", 1)
    slow.answer(task_id, b"slow but first")  # while the retry waits in the queue
    assert rig.reply(client) == reply(R_OK, rid, b"slow but first")
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_DONE, 1, 3)
    other = rig.dealer()
    rig.register(other, 1)
    rig.quiet(other, client)  # the retry was cancelled
    assert_stats(rig.stats(), answered=1, late_answers=1, dispatched=1, queued=0)


# ---------------------------------------------------------------------------
# the same id twice: one execution, every submitter told
# ---------------------------------------------------------------------------


def test_same_id_twice_on_one_socket_runs_once(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 4)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"original")
    client.submit(rid, b"ignored", options=opts(0, 1, 1))  # its payload and options too
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    task_id, payload = rig.task(worker)
    assert payload == [b"original"]
    rig.pump_for(0.1)  # the ignored 1 ms timeout would have expired by now
    assert worker.inbox == []
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_RUNNING, 1, 0)
    worker.answer(task_id, b"once")
    assert rig.reply(client) == reply(R_OK, rid, b"once")
    rig.quiet(client, worker)
    assert_stats(rig.stats(), requests=1, duplicates=1, dispatched=1, answered=1, timeouts=0)


def test_same_id_from_two_sockets_runs_once_and_both_get_the_outcome(make_crig):
    rig = make_crig()
    client_a, client_b = rig.fbclient(), rig.fbclient()
    rid = new_id()
    client_a.submit(rid, b"job")
    assert rig.reply(client_a) == reply(R_ACCEPTED, rid)
    client_b.submit(rid, b"job")
    assert rig.reply(client_b) == reply(R_ACCEPTED, rid)
    assert_stats(rig.stats(), requests=1, duplicates=1, queued=1)
    worker = rig.dealer()
    rig.register(worker, 4)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"shared", b"answer")
    assert rig.reply(client_a) == reply(R_OK, rid, b"shared", b"answer")
    assert rig.reply(client_b) == reply(R_OK, rid, b"shared", b"answer")
    rig.quiet(client_a, client_b, worker)
    # After the outcome: ACCEPTED and the kept outcome at once, nothing run.
    client_c = rig.fbclient()
    client_c.submit(rid, b"job")
    assert rig.reply(client_c) == reply(R_ACCEPTED, rid)
    assert rig.reply(client_c) == reply(R_OK, rid, b"shared", b"answer")
    client_a.submit(rid, b"job", options=NO_ACK)
    assert rig.reply(client_a) == reply(R_OK, rid, b"shared", b"answer")
    rig.quiet(client_a, client_b, client_c, worker)
    assert_stats(rig.stats(), requests=1, duplicates=3, dispatched=1, answered=1)


def test_waiters_are_capped_and_the_oldest_is_replaced(make_crig):
    rig = make_crig()
    clients = [rig.fbclient() for _ in range(MAX_WAITERS + 1)]
    rid = new_id()
    for i, client in enumerate(clients):
        client.submit(rid, b"job", options=NO_ACK)
        rig.pump_stat("duplicates" if i else "requests", i or 1)
    worker = rig.dealer()
    rig.register(worker, 1)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"done")
    for client in clients[1:]:
        assert rig.reply(client) == reply(R_OK, rid, b"done")
    rig.quiet(*clients)  # the first, the oldest waiter, was replaced by the ninth
    # It can still ask for the kept outcome.
    assert rig.ask(clients[0], C_RESULT, rid) == reply(R_OK, rid, b"done")


# ---------------------------------------------------------------------------
# RESULT: routing by id to a new socket
# ---------------------------------------------------------------------------


def test_result_of_a_finished_request_on_a_new_socket(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    old = rig.fbclient()
    rid = new_id()
    old.submit(rid, b"job", options=NO_ACK)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"kept", b"")
    assert rig.reply(old) == reply(R_OK, rid, b"kept", b"")
    old.close()
    new = rig.fbclient()
    assert rig.ask(new, C_RESULT, rid) == reply(R_OK, rid, b"kept", b"")
    assert rig.ask(new, C_STATUS, rid) == status(rid, STATE_DONE, 1, 0)
    # Too late to cancel: the kept outcome instead.
    assert rig.ask(new, C_CANCEL, rid) == reply(R_OK, rid, b"kept", b"")
    rig.quiet(new, worker)
    assert_stats(rig.stats(), cancelled=0, answered=1, dispatched=1)


def test_kept_outcomes_of_every_size_come_back_whole(make_crig):
    """Answer frames from 34 bytes to 8 KiB are kept as copies of their own (not to pin
    libzmq's shared receive buffer); the others as shared frames. Each comes back
    byte for byte, over the network, many at a time."""
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    sizes = [0, 1, 33, 34, 100, 1000, 4000, 8191, 8192, 8193, 70000]
    answers = {}
    for n, size in enumerate(sizes):
        rid = new_id()
        client.submit(rid, b"job", options=NO_ACK)
        task_id, _ = rig.task(worker)
        body = [bytes((n + k) % 251 for k in range(size)), b"tail-%d" % size]
        worker.answer(task_id, *body)
        assert rig.reply(client) == reply(R_OK, rid, *body)
        answers[rid] = body
    other = rig.fbclient()
    for rid, body in answers.items():
        assert rig.ask(other, C_RESULT, rid) == reply(R_OK, rid, *body)
    rig.quiet(other, worker)


def test_queued_payloads_of_every_size_reach_the_worker_whole(make_crig):
    """A request that has to wait gets its own copy of each frame of 34 B to 8 KiB (not
    to pin libzmq's shared receive buffer): FBC01 and REQ requests queued with no
    worker, then taken, arrive byte for byte, and so do their answers."""
    rig = make_crig()
    fbc = rig.fbclient()
    req = rig.client(zmq.DEALER)
    sizes = [1, 33, 34, 100, 1000, 4000, 8191, 8192, 8193, 70000]
    payloads = {}
    for n, size in enumerate(sizes):
        body = [bytes((n * 7 + k) % 251 for k in range(size)), b"second-%d" % size]
        rid = new_id()
        fbc.submit(rid, *body, options=NO_ACK)
        req.send_multipart([b"", *body])
        payloads[rid] = body
    rig.pump_stat("requests", 2 * len(sizes))
    worker = rig.dealer()
    rig.register(worker, 1)
    seen = []
    for _ in range(2 * len(sizes)):
        task_id, payload = rig.task(worker)
        seen.append(payload)
        worker.answer(task_id, *payload)
    expected = [body for body in payloads.values() for _ in (0, 1)]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, expected))
    for rid, body in payloads.items():
        assert rig.reply(fbc) == reply(R_OK, rid, *body)
    got = []
    for _ in sizes:
        assert req.poll(10_000), "a REQ answer is missing"
        got.append(req.recv_multipart())
    assert sorted(map(tuple, got)) == sorted((b"", *body) for body in payloads.values())
    rig.quiet(fbc, worker)


def test_result_while_queued_or_running_routes_the_outcome_to_the_new_socket(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    old = rig.fbclient()
    running, queued = new_id(), new_id()
    old.submit(running, b"running", options=NO_ACK)
    running_task, _ = rig.task(worker)
    old.submit(queued, b"queued", options=NO_ACK)
    rig.pump_stat("requests", 2)
    old.close()
    new = rig.fbclient()
    assert rig.ask(new, C_RESULT, running) == status(running, STATE_RUNNING, 1, 0)
    assert rig.ask(new, C_RESULT, queued) == status(queued, STATE_QUEUED, 0, 0)
    # Asking again adds no second waiter: the outcome still comes once.
    assert rig.ask(new, C_RESULT, running) == status(running, STATE_RUNNING, 1, 0)
    worker.answer(running_task, b"first")
    assert rig.reply(new) == reply(R_OK, running, b"first")
    queued_task, payload = rig.task(worker)
    assert payload == [b"queued"]
    worker.answer(queued_task, b"second")
    assert rig.reply(new) == reply(R_OK, queued, b"second")
    rig.quiet(new, worker)
    assert_stats(rig.stats(), answered=2, requests=2, duplicates=0)


# ---------------------------------------------------------------------------
# kept outcomes: retention in time and in memory
# ---------------------------------------------------------------------------


def run_one(rig: CRig, worker, client: FBClient, answer: list, rid: bytes = None) -> bytes:
    """Submit, let `worker` answer with `answer`, wait for the OK; return the id."""
    rid = rid or new_id()
    client.submit(rid, b"job", options=NO_ACK)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, *answer)
    assert rig.reply(client) == reply(R_OK, rid, *answer)
    return rid


def test_outcome_is_forgotten_after_the_retention_time(make_crig):
    retention = 0.5
    rig = make_crig(retention=retention)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=NO_ACK)
    task_id, _ = rig.task(worker)
    answered_at = time.monotonic()  # the request finishes after this
    worker.answer(task_id, b"answer")
    assert rig.reply(client) == reply(R_OK, rid, b"answer")
    assert rig.ask(client, C_STATUS, rid) == status(rid, STATE_DONE, 1, 0)
    assert_stats(rig.stats(), retained=1, retained_bytes=RESULT_OVERHEAD + len(b"answer"), expired_results=0)

    def forgotten():
        return rig.ask(client, C_STATUS, rid)[1] == R_UNKNOWN

    rig.pump(forgotten, timeout=10, max_wait=0.02)
    assert time.monotonic() - answered_at >= retention * 0.95  # not before its time
    assert rig.ask(client, C_RESULT, rid) == reply(R_UNKNOWN, rid)
    assert_stats(rig.stats(), retained=0, retained_bytes=0, expired_results=1)
    # Unknown again: a SUBMIT of the id runs it anew.
    run_one(rig, worker, client, [b"anew"], rid)
    assert_stats(rig.stats(), requests=2, duplicates=0, dispatched=2)


def test_retention_zero_keeps_no_outcome(make_crig):
    rig = make_crig(retention=0)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = run_one(rig, worker, client, [b"answer"])
    assert rig.ask(client, C_STATUS, rid) == reply(R_UNKNOWN, rid)
    assert_stats(rig.stats(), retained=0, retained_bytes=0)


def test_retention_bytes_forget_the_oldest_outcomes_first(make_crig):
    size = 100
    cost = RESULT_OVERHEAD + size
    rig = make_crig(retention_bytes=3 * cost)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    ids = [run_one(rig, worker, client, [b"a" * size]) for _ in range(3)]
    assert_stats(rig.stats(), retained=3, retained_bytes=3 * cost, expired_results=0)
    for rid in ids:
        assert rig.ask(client, C_STATUS, rid)[1] == R_STATUS
    # A fourth: the oldest goes. Answer bytes are those of all frames.
    ids.append(run_one(rig, worker, client, [b"b" * 60, b"c" * 40]))
    assert_stats(rig.stats(), retained=3, retained_bytes=3 * cost, expired_results=1)
    assert rig.ask(client, C_STATUS, ids[0]) == reply(R_UNKNOWN, ids[0])
    for rid in ids[1:]:
        assert rig.ask(client, C_STATUS, rid)[1] == R_STATUS
    assert rig.ask(client, C_RESULT, ids[3]) == reply(R_OK, ids[3], b"b" * 60, b"c" * 40)
    # A FAILED outcome costs its type and message, and the payload it keeps (it is
    # dead, ready for REQUEUE): the next oldest goes.
    failed = new_id()
    client.submit(failed, b"job", options=opts(OPT_NO_ACK, 0, 1))
    task_id, _ = rig.task(worker)
    worker.failed(task_id, b"E" * 10, b"m" * (size - 13))
    assert rig.reply(client) == reply(R_FAILED, failed, b"E" * 10, b"m" * (size - 13))
    assert_stats(rig.stats(), retained=3, retained_bytes=3 * cost, expired_results=2)
    assert rig.ask(client, C_STATUS, ids[1]) == reply(R_UNKNOWN, ids[1])
    for rid in (ids[2], ids[3], failed):
        assert rig.ask(client, C_STATUS, rid)[1] == R_STATUS
    # An outcome larger than the whole bound is not kept, and the others stay.
    big = run_one(rig, worker, client, [b"z" * (3 * cost)])
    assert rig.ask(client, C_STATUS, big) == reply(R_UNKNOWN, big)
    assert_stats(rig.stats(), retained=3, retained_bytes=3 * cost, expired_results=3)
    for rid in (ids[2], ids[3], failed):
        assert rig.ask(client, C_STATUS, rid)[1] == R_STATUS


# ---------------------------------------------------------------------------
# malformed messages
# ---------------------------------------------------------------------------

RID = b"R" * 16


MALFORMED = [
    ("submit-id-15", [CSIG, C_SUBMIT, b"R" * 15, b"", b"p"], {BAD_ID}),
    ("submit-id-17", [CSIG, C_SUBMIT, b"R" * 17, b"", b"p"], {BAD_ID}),
    ("submit-id-empty", [CSIG, C_SUBMIT, b"", b"", b"p"], {BAD_ID}),
    # The id is checked before the options.
    ("submit-id-15-bad-options", [CSIG, C_SUBMIT, b"R" * 15, b"bad", b"p"], {BAD_ID}),
    ("status-id-15", [CSIG, C_STATUS, b"R" * 15], {BAD_ID}),
    ("result-id-17", [CSIG, C_RESULT, b"R" * 17], {BAD_ID}),
    ("cancel-id-8", [CSIG, C_CANCEL, b"R" * 8], {BAD_ID}),
    # No id frame at all: the spec allows either reading.
    ("submit-no-id", [CSIG, C_SUBMIT], {BAD_ID, BAD_COMMAND}),
    ("status-no-id", [CSIG, C_STATUS], {BAD_ID, BAD_COMMAND}),
    ("no-command", [CSIG], {BAD_COMMAND}),
    ("command-09", [CSIG, b"\x09", RID], {BAD_COMMAND}),
    ("command-00", [CSIG, b"\x00", RID], {BAD_COMMAND}),
    ("reply-code-from-client", [CSIG, R_OK, RID, b"x"], {BAD_COMMAND}),
    ("command-empty", [CSIG, b"", RID], {BAD_COMMAND}),
    ("command-two-bytes", [CSIG, C_SUBMIT + b"\x00", RID, b"", b"p"], {BAD_COMMAND}),
    ("submit-nothing-after-id", [CSIG, C_SUBMIT, RID], {BAD_COMMAND}),
    ("submit-empty-options-no-payload", [CSIG, C_SUBMIT, RID, b""], {BAD_COMMAND}),
    ("submit-options-no-payload", [CSIG, C_SUBMIT, RID, opts()], {BAD_COMMAND}),
    ("status-with-body", [CSIG, C_STATUS, RID, b""], {BAD_COMMAND}),
    ("result-with-body", [CSIG, C_RESULT, RID, b"x"], {BAD_COMMAND}),
    ("cancel-with-body", [CSIG, C_CANCEL, RID, b"x", b"y"], {BAD_COMMAND}),
]


@pytest.mark.parametrize("frames, reasons", [pytest.param(f, r, id=i) for i, f, r in MALFORMED])
def test_malformed_client_message_is_dropped(make_crig, frames, reasons):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    client.send(*frames)
    rig.pump_stat("dropped", 1)
    drops = rig.stats()["drops"]
    assert len(drops) == 1 and set(drops) <= reasons and sum(drops.values()) == 1, drops
    rig.quiet(client, worker)
    assert_stats(rig.stats(), requests=0, rejected=0, duplicates=0, cancelled=0, dispatched=0)
    # Nothing of it stayed in the broker.
    assert rig.ask(client, C_STATUS, RID) == reply(R_UNKNOWN, RID)
    # The socket and the broker are fine.
    rid = new_id()
    client.submit(rid, b"well formed", options=NO_ACK)
    task_id, payload = rig.task(worker)
    assert payload == [b"well formed"]
    worker.answer(task_id, b"yes")
    assert rig.reply(client) == reply(R_OK, rid, b"yes")


@pytest.mark.parametrize(
    "options",
    [
        b"\x00" * 3,
        b"\x00" * 8,
        b"\x00" * 10,
        opts(0x02),
        opts(0x80),
        opts(OPT_NO_ACK | 0x04),  # REJECTED even with NO_ACK
        opts(0, 0xFFFFFFFF, 0),
    ],
    ids=["len3", "len8", "len10", "flag2", "flag80", "noack+flag4", "timeout-max+1"],
)
def test_bad_options_are_rejected(make_crig, options):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"job", options=options)
    assert rig.reply(client) == reply(
        R_REJECTED, rid, bytes([REJECT_BAD_OPTIONS]), REJECT_REASONS[REJECT_BAD_OPTIONS].encode()
    )
    rig.quiet(client, worker)
    assert_stats(rig.stats(), rejected=1, requests=0, dispatched=0, dropped=0, duplicates=0)
    assert rig.ask(client, C_STATUS, rid) == reply(R_UNKNOWN, rid)  # it never entered
    client.submit(rid, b"job")  # the same id, well formed, is a new request
    assert rig.reply(client) == reply(R_ACCEPTED, rid)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"ok")
    assert rig.reply(client) == reply(R_OK, rid, b"ok")
    assert_stats(rig.stats(), rejected=1, requests=1, duplicates=0)


def test_bad_options_on_a_known_id_are_rejected_before_the_duplicate_rule(make_crig):
    rig = make_crig()
    first, second = rig.fbclient(), rig.fbclient()
    rid = new_id()
    first.submit(rid, b"job", options=NO_ACK)
    rig.pump_stat("requests", 1)
    second.submit(rid, b"job", options=opts(0x02))
    assert rig.reply(second) == reply(
        R_REJECTED, rid, bytes([REJECT_BAD_OPTIONS]), REJECT_REASONS[REJECT_BAD_OPTIONS].encode()
    )
    assert_stats(rig.stats(), rejected=1, duplicates=0, requests=1)
    worker = rig.dealer()
    rig.register(worker, 1)
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"done")
    assert rig.reply(first) == reply(R_OK, rid, b"done")
    rig.quiet(second)  # the rejected SUBMIT made it no waiter


def test_broker_serves_after_every_kind_of_bad_client_message(make_crig):
    rig = make_crig()
    client = rig.fbclient()
    bad = [
        [CSIG, C_SUBMIT, b"R" * 15, b"", b"p"],
        [CSIG, C_STATUS, b"R" * 17],
        [CSIG],
        [CSIG, b"\x09", RID],
        [CSIG, C_SUBMIT, RID, b""],
        [CSIG, C_CANCEL, RID, b"x"],
    ]
    for frames in bad:
        client.send(*frames)
    rig.pump_stat("dropped", len(bad))
    for options in (b"\x00" * 3, opts(0x02), opts(0, 0xFFFFFFFF)):
        client.submit(new_id(), b"job", options=options)
    rig.pump_stat("rejected", 3)
    rig.pump(lambda: len(client.inbox) >= 3)
    assert [m[1] for m in client.inbox] == [R_REJECTED] * 3
    client.inbox.clear()
    serve_one_of_each(rig)
    assert_stats(rig.stats(), requests=2, answered=2, dropped=len(bad), rejected=3)


# ---------------------------------------------------------------------------
# telling FBC01 from REQ
# ---------------------------------------------------------------------------


def test_req_client_whose_payload_starts_with_the_signature_is_an_original_request(make_crig):
    rig = make_crig()
    rid = new_id()
    req = rig.client()
    req_payload = [CSIG, C_SUBMIT, rid, b"", b"payload"]
    req.send_multipart(req_payload)
    dealer_req = rig.client(zmq.DEALER)  # a DEALER speaking section 1: delimiter first
    dealer_payload = [CSIG, C_STATUS, rid]
    dealer_req.send_multipart([b"", *dealer_payload])
    rig.pump_stat("requests", 2)
    worker = rig.dealer()
    rig.register(worker, 2)
    got = {tuple(payload): task_id for task_id, payload in rig.tasks_in(worker, 2)}
    assert set(got) == {tuple(req_payload), tuple(dealer_payload)}
    worker.answer(got[tuple(req_payload)], b"to req")
    worker.answer(got[tuple(dealer_payload)], b"to dealer")
    assert rig.receive(req) == [b"to req"]
    assert rig.receive(dealer_req) == [b"", b"to dealer"]
    assert_stats(rig.stats(), requests=2, answered=2, duplicates=0, rejected=0, dropped=0)
    # Neither became an FBC01 request.
    client = rig.fbclient()
    assert rig.ask(client, C_STATUS, rid) == reply(R_UNKNOWN, rid)


# ---------------------------------------------------------------------------
# many clients, many requests
# ---------------------------------------------------------------------------


def test_200_interleaved_submits_from_3_clients_each_get_their_own_answer(make_crig):
    rig = make_crig()
    workers = [rig.dealer(), rig.dealer()]
    for worker in workers:
        rig.register(worker, 8)
    clients = [rig.fbclient() for _ in range(3)]
    sent: dict = {}  # id -> (client index, payload, acked)
    for i in range(200):
        k = i % 3
        rid = new_id()
        payload = b"job-%d-" % i + rid
        acked = i % 2 == 0
        options = (b"" if i % 4 == 0 else opts()) if acked else NO_ACK
        clients[k].submit(rid, payload, options=options)
        sent[rid] = (k, payload, acked)

    def work() -> bool:
        for worker in workers:
            for _ in range(len(worker.inbox)):
                message = worker.inbox.pop(0)
                assert message[2] == CMD_TASK, message
                worker.answer(message[3], b"re:" + message[4], b"tail")
        oks = sum(1 for c in clients for m in c.inbox if m[1] == R_OK)
        return oks >= 200

    rig.pump(work, timeout=20)
    rig.settle()
    for k, client in enumerate(clients):
        mine = {rid: v for rid, v in sent.items() if v[0] == k}
        oks = [m for m in client.inbox if m[1] == R_OK]
        acks = [m[2] for m in client.inbox if m[1] == R_ACCEPTED]
        assert len(oks) + len(acks) == len(client.inbox), client.inbox
        assert sorted(m[2] for m in oks) == sorted(mine)  # each id once, only its own
        for m in oks:
            assert m[3:] == [b"re:" + mine[m[2]][1], b"tail"]
        assert sorted(acks) == sorted(rid for rid, v in mine.items() if v[2])
    assert_stats(rig.stats(), requests=200, answered=200, dispatched=200, duplicates=0, dropped=0, running=0, queued=0)


# ---------------------------------------------------------------------------
# max_queue
# ---------------------------------------------------------------------------


def test_a_full_queue_rejects_new_requests_of_both_kinds_and_takes_them_again_when_it_drains(make_crig):
    rig = make_crig(max_queue=2)
    client = rig.fbclient()
    queued = [new_id(), new_id()]
    for rid in queued:
        client.submit(rid, b"waits")
        assert rig.reply(client) == reply(R_ACCEPTED, rid)
    refused = new_id()
    client.submit(refused, b"one too many")
    assert rig.reply(client) == reply(R_REJECTED, refused, bytes([protocol.REJECT_QUEUE_FULL]), b"queue full")
    # A REQ client gets the original protocol's "no": the empty answer, at once.
    req = rig.client()
    req.send(b"also too many")
    assert rig.receive(req) == [b""]
    # A duplicate of a queued id is not a new request: accepted, not refused.
    client.submit(queued[0], b"again")
    assert rig.reply(client) == reply(R_ACCEPTED, queued[0])
    assert_stats(rig.stats(), requests=2, rejected=2, duplicates=1, queued=2)
    assert rig.ask(client, C_STATUS, refused) == reply(R_UNKNOWN, refused)
    # Once a worker takes one, there is room again.
    worker = rig.dealer()
    rig.register(worker, 1)
    task_id, payload = rig.task(worker)
    assert payload == [b"waits"]
    client.submit(refused, b"room now")
    assert rig.reply(client) == reply(R_ACCEPTED, refused)
    assert_stats(rig.stats(), requests=3, rejected=2, queued=2, running=1)


def test_replies_to_clients_that_have_gone_are_counted_not_lost_unseen(make_crig):
    # The requests ROUTER has ROUTER_MANDATORY: a reply to a client that disconnected
    # fails at its first frame and the core counts it (docs/PROTOCOL.md section 9.2).
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 2)
    fbc = rig.fbclient(identity=b"fbc-gone")
    req = rig.client(zmq.REQ, identity=b"req-gone")
    fbc.submit(new_id(), b"fbc", options=NO_ACK)
    first, _ = rig.task(worker)
    req.send(b"req")
    second, _ = rig.task(worker)
    fbc.close()
    req.close(0)
    rig.pump(peer_gone(rig, b"fbc-gone", "requests"))
    rig.pump(peer_gone(rig, b"req-gone", "requests"))
    before = rig.stats()
    assert_stats(before, replies_unroutable=0, replies_dropped=0)  # the probes were the test's
    worker.answer(first, b"a")
    worker.answer(second, b"b")
    rig.pump_stat("answered", before["answered"] + 2)
    assert_stats(rig.stats(), replies_unroutable=2, replies_dropped=0)
