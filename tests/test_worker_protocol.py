"""The FBW01 worker protocol on the live core, driven in-process.

The core runs in short slices in the test thread (as in test_core_loop.py); raw DEALER
sockets play the workers and speak the frames of the spec themselves:
[b"", b"FBW01", command, body...]. Every time the test pumps the core it also reads what
the workers got: broker heartbeats are counted apart, everything else is kept in order.
A "live" worker, once registered, sends HEARTBEAT every few milliseconds so that only the
workers a test makes silent can ever be taken for dead, however loaded the machine is.
"""

from __future__ import annotations

import time

import pytest
import zmq

from fastbroker import protocol
from fastbroker.protocol import (
    CMD_ANSWER,
    CMD_DISCONNECT,
    CMD_FAILED,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_TASK,
    DROP_REASONS,
    MAX_CREDIT,
    RUN_DROP,
    WORKER_SIGNATURE as SIG,
)
from rigs import DISCONNECT_MSG, EPOCH, HEARTBEAT, LONG_TIMEOUT, WRig, assert_stats, credit_frame, peer_gone, wait_until

LIVENESS = 3  # 0.3 s of silence kills; live test workers talk every HEARTBEAT / 5

UNKNOWN = DROP_REASONS[protocol.DROP_ANSWER_UNKNOWN]
BAD_COMMAND = DROP_REASONS[protocol.DROP_WORKER_BAD_COMMAND]
BAD_FRAMES = DROP_REASONS[protocol.DROP_WORKER_BAD_FRAMES]


def dealer_client(rig: WRig, jobs) -> zmq.Socket:
    """A DEALER client (one pipe, so the jobs arrive in order) that sent `jobs`."""
    before = rig.stats()["requests"]
    client = rig.client(zmq.DEALER)
    for job in jobs:
        client.send_multipart([b"", job])
    rig.pump_stat("requests", before + len(jobs))
    return client


def serve_with_new_dealer(rig: WRig, payload: bytes = b"after") -> None:
    """A whole job through a fresh DEALER worker and REQ client."""
    before = rig.stats()
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(payload)
    task_id, body = rig.task(worker)
    assert body == [payload]
    worker.answer(task_id, b"re:" + payload)
    assert rig.receive(client) == [b"re:" + payload]
    assert rig.stats()["answered"] == before["answered"] + 1


# ---------------------------------------------------------------------------
# READY, TASK, ANSWER
# ---------------------------------------------------------------------------


def test_ready_registers_and_task_answer_round_trip(make_wrig):
    rig = make_wrig()
    worker = rig.dealer()
    worker.ready(1)
    rig.pump_stat("workers_joined", 1)
    assert_stats(rig.stats(), workers=1, ready=1, idle_workers=1, dropped=0)
    client = rig.client()
    client.send_multipart([b"job", b"part two"])
    message = rig.next_message(worker)
    assert message[:3] == [b"", SIG, CMD_TASK] and message[4:] == [b"job", b"part two"]
    task_id = message[3]
    assert len(task_id) == 16 and task_id[:8] == EPOCH
    assert_stats(rig.stats(), dispatched=1, running=1, idle_workers=0, queued=0)
    worker.answer(task_id, b"answer", b"in two")
    assert rig.receive(client) == [b"answer", b"in two"]
    # The credit is free again: the worker is idle and gets the next job.
    assert_stats(rig.stats(), answered=1, running=0, idle_workers=1, workers=1, dropped=0)
    client.send(b"second")
    task_id2, payload = rig.task(worker)
    assert payload == [b"second"] and task_id2 != task_id
    worker.answer(task_id2, b"done")
    assert rig.receive(client) == [b"done"]
    assert_stats(rig.stats(), answered=2, dispatched=2, workers_joined=1, ready=1, dropped=0)


def test_ready_with_max_credit_is_accepted(make_wrig):
    rig = make_wrig()
    worker = rig.dealer()
    rig.register(worker, MAX_CREDIT)
    client = dealer_client(rig, [b"j%d" % i for i in range(3)])
    got = rig.tasks_in(worker, 3)
    assert [p for _, p in got] == [[b"j0"], [b"j1"], [b"j2"]]
    assert_stats(rig.stats(), idle_workers=1, running=3, dropped=0)
    for task_id, payload in got:
        worker.answer(task_id, b"re:" + payload[0])
        assert rig.receive(client) == [b"", b"re:" + payload[0]]


# ---------------------------------------------------------------------------
# credit
# ---------------------------------------------------------------------------


def test_credit_limits_the_jobs_in_flight(make_wrig):
    rig = make_wrig()
    jobs = [b"job%d" % i for i in range(10)]
    client = dealer_client(rig, jobs)
    worker = rig.dealer()
    rig.register(worker, 4)
    held = rig.tasks_in(worker, 4)
    rig.settle()
    assert worker.inbox == []  # exactly 4 before any answer
    assert_stats(rig.stats(), running=4, queued=6, idle_workers=0, dispatched=4)
    seen = [p[0] for _, p in held]
    for _ in range(10):
        if not held:
            break
        task_id, payload = held.pop(0)
        worker.answer(task_id, b"re:" + payload[0])
        assert rig.receive(client) == [b"", b"re:" + payload[0]]
        if len(seen) < 10:
            # One answer frees one credit: exactly one more job.
            held += rig.tasks_in(worker, 1)
            seen.append(held[-1][1][0])
            rig.settle(3)
            assert worker.inbox == []
        assert len(held) <= 4
        assert rig.stats()["running"] == len(held)
    assert seen == jobs  # FIFO
    assert_stats(rig.stats(), answered=10, dispatched=10, running=0, queued=0, idle_workers=1)


def test_credit_one_never_holds_two(make_wrig):
    rig = make_wrig()
    client = dealer_client(rig, [b"a", b"b", b"c"])
    worker = rig.dealer()
    rig.register(worker, 1)
    for expected in (b"a", b"b", b"c"):
        task_id, payload = rig.task(worker)
        assert payload == [expected]
        rig.settle(3)
        assert worker.inbox == []
        assert_stats(rig.stats(), running=1, idle_workers=0)
        worker.answer(task_id, expected.upper())
        assert rig.receive(client) == [b"", expected.upper()]
    assert_stats(rig.stats(), answered=3, running=0, queued=0, idle_workers=1)


def test_a_later_ready_changes_the_credit(make_wrig):
    rig = make_wrig()
    client = dealer_client(rig, [b"job%d" % i for i in range(7)])
    worker = rig.dealer()
    rig.register(worker, 1)
    held = rig.tasks_in(worker, 1)
    rig.settle(3)
    assert worker.inbox == []
    # More credit: two more jobs at once, no new registration.
    worker.ready(3)
    held += rig.tasks_in(worker, 2)
    rig.settle(3)
    assert worker.inbox == []
    assert_stats(rig.stats(), ready=2, workers_joined=1, workers=1, running=3, queued=4, idle_workers=0)
    # Credit 0: it finishes what it holds and gets nothing more.
    worker.ready(0)
    rig.pump_stat("ready", 3)
    for task_id, payload in held:
        worker.answer(task_id, b"re:" + payload[0])
        assert rig.receive(client) == [b"", b"re:" + payload[0]]
    rig.settle()
    assert worker.inbox == []
    assert_stats(rig.stats(), running=0, queued=4, idle_workers=0, workers=1, answered=3)
    # And it can take jobs again.
    worker.ready(2)
    again = rig.tasks_in(worker, 2)
    assert [p for _, p in again] == [[b"job3"], [b"job4"]]
    rig.settle(3)
    assert worker.inbox == []
    assert_stats(rig.stats(), running=2, queued=2, workers_joined=1)


# ---------------------------------------------------------------------------
# several workers
# ---------------------------------------------------------------------------


def test_round_robin_among_dealer_workers_with_spare_credit(make_wrig):
    rig = make_wrig()
    a, b = rig.dealer(), rig.dealer()
    rig.register(a, 2)
    rig.register(b, 2)
    assert rig.stats()["idle_workers"] == 2
    client = dealer_client(rig, [b"j0", b"j1", b"j2", b"j3", b"j4"])
    got_a = rig.tasks_in(a, 2)
    got_b = rig.tasks_in(b, 2)
    assert [p for _, p in got_a] == [[b"j0"], [b"j2"]]
    assert [p for _, p in got_b] == [[b"j1"], [b"j3"]]
    rig.settle(3)
    assert a.inbox == [] and b.inbox == []
    assert_stats(rig.stats(), running=4, queued=1, idle_workers=0)
    # The first to free a credit gets the next job.
    b.answer(got_b[0][0], b"r1")
    assert rig.receive(client) == [b"", b"r1"]
    task_id, payload = rig.task(b)
    assert payload == [b"j4"]
    rig.settle(3)
    assert a.inbox == []
    for worker, (tid, p) in [(a, got_a[0]), (a, got_a[1]), (b, got_b[1]), (b, (task_id, payload))]:
        worker.answer(tid, b"re:" + p[0])
        assert rig.receive(client) == [b"", b"re:" + p[0]]
    assert_stats(rig.stats(), answered=5, running=0, idle_workers=2, workers=2)


def test_req_worker_and_dealer_worker_served_by_one_core(make_wrig):
    rig = make_wrig()
    req_worker = rig.worker()
    rig.ready(req_worker, 1)
    dealer = rig.dealer()
    rig.register(dealer, 1)
    assert_stats(rig.stats(), ready=2, workers=1, idle_workers=2)
    client = dealer_client(rig, [b"first", b"second"])
    tid1, payload1 = rig.receive(req_worker)  # the original protocol, unchanged
    assert payload1 == b"first" and tid1[:8] == EPOCH
    tid2, payload2 = rig.task(dealer)
    assert payload2 == [b"second"]
    dealer.answer(tid2, b"from dealer")
    rig.answer(tid1, b"from req")
    answers = [rig.receive(client), rig.receive(client)]
    assert sorted(answers) == [[b"", b"from dealer"], [b"", b"from req"]]
    assert_stats(rig.stats(), answered=2, running=0, idle_workers=1, workers=1, dropped=0)
    # No FBW01 traffic ever reaches the REQ worker (it would break its REQ state).
    rig.settle()
    assert req_worker.poll(0) == 0


# ---------------------------------------------------------------------------
# heartbeats and liveness
# ---------------------------------------------------------------------------


def test_broker_heartbeats_a_registered_worker(make_wrig):
    rig = make_wrig(liveness=LIVENESS)
    req_worker = rig.worker()
    rig.ready(req_worker, 1)
    worker = rig.dealer()
    started = time.monotonic()
    rig.register(worker, 1)
    rig.pump(lambda: len(worker.heartbeat_times) >= 2, timeout=10)
    # Not a burst: a second heartbeat is at least one interval after joining.
    assert worker.heartbeat_times[1] - started >= HEARTBEAT
    assert worker.inbox == []
    assert req_worker.poll(0) == 0  # only DEALER workers get heartbeats
    assert_stats(rig.stats(), workers=1, workers_dead=0, dropped=0)
    # Over a measured stretch, about one heartbeat per interval, not one per loop turn.
    count, t0 = len(worker.heartbeat_times), time.monotonic()
    rig.pump_for(5 * HEARTBEAT)
    elapsed = time.monotonic() - t0
    assert len(worker.heartbeat_times) - count <= elapsed / HEARTBEAT + 2


def test_silent_worker_is_dead_and_its_job_goes_to_another_at_once(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, liveness=LIVENESS)
    silent = rig.dealer(live=False)
    last_heard = time.monotonic()
    rig.register(silent, 1)
    client = rig.client()
    client.send(b"job")
    task_id, payload = rig.task(silent)
    other = rig.dealer()
    rig.register(other, 1)
    retry_id, retry_payload = rig.task(other, timeout=20)
    found = time.monotonic() - last_heard
    assert retry_id == task_id and retry_payload == payload == [b"job"]
    assert found >= LIVENESS * HEARTBEAT  # not before the silence was long enough
    assert found < LONG_TIMEOUT / 6  # and not by the job timeout
    assert_stats(
        rig.stats(), workers_dead=1, workers=1, requeued=1, retried=1, timeouts=0, dispatched=2, running=1, queued=0
    )
    # The dead worker gets nothing more, not even heartbeats.
    beats = len(silent.heartbeat_times)
    rig.pump_for(4 * HEARTBEAT)
    assert silent.inbox == [] and len(silent.heartbeat_times) == beats
    other.answer(task_id, b"answer")
    assert rig.receive(client) == [b"answer"]
    assert_stats(rig.stats(), answered=1, running=0, late_answers=0, aborted=0)


def test_a_worker_whose_connection_closed_is_dead_at_the_next_heartbeat(make_wrig):
    # Liveness of 1000 heartbeats: silence alone would take 100 s. The HEARTBEAT the
    # broker sends every 0.1 s fails for a connection that is gone (ROUTER_MANDATORY).
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, liveness=1000)
    gone = rig.dealer()
    rig.register(gone, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(gone)
    gone.close()
    other = rig.dealer()
    rig.register(other, 1)
    assert rig.task(other, timeout=20)[0] == task_id
    assert_stats(rig.stats(), workers_dead=1, unreachable_workers=1, requeued=1, workers=1, timeouts=0)


def test_probe_workers_forgets_at_once_the_workers_whose_connection_closed(make_wrig):
    # Heartbeats every 10 s (liveness 3): nothing but the probe can find the dead worker
    # within the test. The probe's HEARTBEAT to the live one is harmless.
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, heartbeat=10.0, liveness=3)
    gone, alive = rig.dealer(live=False), rig.dealer(live=False)
    rig.register(gone, 1)
    rig.register(alive, 1)
    assert rig.core.probe_workers() == 0
    gone.close()
    # The ROUTER learns of the closed connection asynchronously: probe until it has.
    found = []
    rig.pump(lambda: found.append(rig.core.probe_workers()) or sum(found) == 1)
    rig.pump(lambda: alive.heartbeat_times)
    assert_stats(rig.stats(), workers_dead=1, unreachable_workers=1, workers=1, dropped=0)
    assert rig.core.probe_workers() == 0


def test_a_worker_that_said_disconnect_then_closed_has_left_though_a_probe_found_it_gone(make_wrig):
    # The worker's DISCONNECT waits unread in the broker's socket when the probe's
    # HEARTBEAT to it fails: the broker must read it before judging, and count the worker
    # as one that left, not one that died (CI once saw workers_dead=1 in this race).
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, heartbeat=10.0, liveness=3)
    leaving = rig.dealer(live=False)
    rig.register(leaving, 1)
    leaving.disconnect()
    leaving.sock.close(linger=2000)  # the DISCONNECT goes out before the connection closes
    # The ROUTER learns of the closed connection asynchronously; the core's loop does
    # not run meanwhile, so nothing reads the DISCONNECT.
    assert wait_until(rig.core.probe_workers, message="the probe to find the closed connection") == 1
    assert_stats(rig.stats(), unreachable_workers=1, workers_dead=0, workers_left=0)
    rig.pump_stat("workers_left", 1)
    assert_stats(rig.stats(), workers=0, workers_left=1, workers_dead=0, unreachable_workers=1, dropped=0)


def test_dead_worker_job_with_a_single_try_is_aborted(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=1, liveness=LIVENESS)
    silent = rig.dealer(live=False)
    rig.register(silent, 1)
    client = rig.client()
    client.send(b"job")
    rig.task(silent)
    assert rig.receive(client, timeout=20) == [b""]
    assert_stats(
        rig.stats(), workers_dead=1, workers=0, requeued=1, aborted=1, retried=0, timeouts=0, queued=0, running=0
    )
    other = rig.dealer()
    rig.register(other, 1)
    rig.settle()
    assert other.inbox == []
    assert rig.stats()["dispatched"] == 1


def test_heartbeating_worker_keeps_its_job(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, liveness=LIVENESS)
    alive = rig.dealer(live=True)
    rig.register(alive, 1)
    client_a = rig.client()
    client_a.send(b"long job")
    task_a, _ = rig.task(alive)
    # A silent twin holding a job shows that the stretch below is long enough to kill.
    silent = rig.dealer(live=False)
    rig.register(silent, 1)
    client_s = rig.client()
    client_s.send(b"other job")
    task_s, _ = rig.task(silent)
    started = time.monotonic()
    rig.pump_stat("workers_dead", 1, timeout=20)
    rig.pump_for(10 * HEARTBEAT - (time.monotonic() - started))
    assert time.monotonic() - started >= 10 * HEARTBEAT
    assert len(alive.heartbeat_times) >= 2
    assert alive.inbox == []
    # The silent one's job waits for a credit (`alive` has none spare); alive's is untouched.
    assert_stats(rig.stats(), workers=1, workers_dead=1, requeued=1, running=1, queued=1, timeouts=0)
    alive.answer(task_a, b"long answer")
    assert rig.receive(client_a) == [b"long answer"]
    # The freed credit takes the requeued job, same id.
    retry_id, payload = rig.task(alive)
    assert retry_id == task_s and payload == [b"other job"]
    alive.answer(retry_id, b"other answer")
    assert rig.receive(client_s) == [b"other answer"]
    assert_stats(rig.stats(), answered=2, requeued=1, workers_dead=1, dropped=0)


def test_any_message_from_a_worker_keeps_it_alive(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, liveness=LIVENESS)
    chatty = rig.dealer(live=False)  # never sends HEARTBEAT, only READY again and again
    rig.register(chatty, 1)
    mute = rig.dealer(live=False)  # the control: says nothing after its READY
    rig.register(mute, 1)
    started = time.monotonic()
    for _ in range(1000):
        if time.monotonic() - started >= 2 * LIVENESS * HEARTBEAT and rig.stats()["workers_dead"]:
            break
        chatty.ready(1)
        rig.pump_for(HEARTBEAT / 2)
    assert time.monotonic() - started >= 2 * LIVENESS * HEARTBEAT
    assert_stats(rig.stats(), workers=1, workers_dead=1, workers_joined=2, idle_workers=1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(chatty)
    chatty.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]


# ---------------------------------------------------------------------------
# FAILED
# ---------------------------------------------------------------------------


def test_failed_job_is_retried_at_once_on_another_idle_worker(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3)
    a = rig.dealer()
    rig.register(a, 2)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(a)
    b = rig.dealer()
    rig.register(b, 1)
    # Both are idle and `a` (spare credit) is first in line; its failed job must
    # still go to `b`.
    assert rig.stats()["idle_workers"] == 2
    a.failed(task_id, b"ValueError", b"bad input")
    retry_id, payload = rig.task(b)
    assert retry_id == task_id and payload == [b"job"]
    rig.settle(3)
    assert a.inbox == []
    assert_stats(rig.stats(), failed=1, retried=1, dispatched=2, timeouts=0, running=1, queued=0, dropped=0)
    b.answer(retry_id, b"fine")
    assert rig.receive(client) == [b"fine"]
    assert_stats(rig.stats(), answered=1, running=0, idle_workers=2)
    # `a` is not shunned for new jobs.
    client.send(b"next")
    next_id, payload = rig.task(a)
    assert payload == [b"next"] and next_id != task_id


def test_failed_job_goes_back_to_the_only_worker(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    worker.failed(task_id)
    retry_id, payload = rig.task(worker)
    assert retry_id == task_id and payload == [b"job"]
    worker.answer(task_id, b"second time lucky")
    assert rig.receive(client) == [b"second time lucky"]
    assert_stats(rig.stats(), failed=1, retried=1, dispatched=2, answered=1, aborted=0)


@pytest.mark.parametrize("tries", [1, 3])
def test_always_failing_worker_uses_every_try_then_the_client_gets_the_empty_frame(make_wrig, tries):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=tries)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"doomed")
    attempts = []
    for _ in range(tries):
        task_id, payload = rig.task(worker)
        assert payload == [b"doomed"]
        attempts.append(task_id)
        worker.failed(task_id, b"RuntimeError", "näy".encode())
    assert rig.receive(client) == [b""]
    rig.settle()
    assert worker.inbox == []
    assert attempts == [attempts[0]] * tries
    assert_stats(
        rig.stats(),
        failed=tries,
        dispatched=tries,
        retried=tries - 1,
        aborted=1,
        answered=0,
        running=0,
        queued=0,
        timeouts=0,
        idle_workers=1,
    )


def test_failed_for_a_task_not_running_on_that_worker_is_dropped(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3)
    a, b = rig.dealer(), rig.dealer()
    rig.register(a, 1)
    rig.register(b, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(a)
    b.failed(task_id)  # another worker's job
    rig.pump_stat("dropped", 1)
    b.failed(EPOCH + b"\xff" * 8)  # no such task
    rig.pump_stat("dropped", 2)
    assert rig.stats()["drops"] == {UNKNOWN: 2}
    assert_stats(rig.stats(), failed=0, retried=0, running=1, queued=0, dispatched=1)
    rig.settle(3)
    assert a.inbox == [] and b.inbox == []  # no retry, and no DISCONNECT to a known worker
    a.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    a.failed(task_id)  # already answered
    rig.pump_stat("dropped", 3)
    assert_stats(rig.stats(), failed=0, answered=1, retried=0, drops={UNKNOWN: 3})


def test_failed_with_a_malformed_task_id_is_dropped_like_such_an_answer(make_wrig):
    # ANSWER and FAILED both carry a task id; a malformed one is counted alike.
    rig = make_wrig()
    worker = rig.dealer()
    rig.register(worker, 1)
    worker.answer(b"short", b"answer")
    rig.pump_stat("dropped", 1)
    worker.failed(b"short")
    rig.pump_stat("dropped", 2)
    bad_id = DROP_REASONS[protocol.DROP_ANSWER_BAD_ID]
    assert rig.stats()["drops"] == {bad_id: 2}
    assert worker.inbox == []  # a known worker is not told to register again
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    worker.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    assert_stats(rig.stats(), failed=0, answered=1, dropped=2)


# ---------------------------------------------------------------------------
# DISCONNECT and unknown workers
# ---------------------------------------------------------------------------


def test_disconnect_from_a_worker(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3)
    leaving = rig.dealer()
    rig.register(leaving, 2)
    client = dealer_client(rig, [b"j0", b"j1"])
    held = rig.tasks_in(leaving, 2)
    leaving.disconnect()
    rig.pump_stat("workers_left", 1)
    assert_stats(rig.stats(), workers=0, idle_workers=0, requeued=2, retried=2, queued=2, running=0, timeouts=0)
    # Nothing more is sent to it: no heartbeat, no job (a third job stays queued too).
    beats = len(leaving.heartbeat_times)
    client.send_multipart([b"", b"j2"])
    rig.pump_stat("requests", 3)
    rig.pump_for(4 * HEARTBEAT)
    assert leaving.inbox == [] and len(leaving.heartbeat_times) == beats
    assert rig.stats()["queued"] == 3
    # Its jobs, same ids, go to the next worker.
    other = rig.dealer()
    rig.register(other, 3)
    got = rig.tasks_in(other, 3)
    assert sorted(tid for tid, _ in got[:2]) == sorted(tid for tid, _ in held)
    assert got[2][1] == [b"j2"]
    for task_id, payload in got:
        other.answer(task_id, b"re:" + payload[0])
        assert rig.receive(client) == [b"", b"re:" + payload[0]]
    # The worker that left may join again.
    rig.register(leaving, 1)
    assert_stats(rig.stats(), workers_joined=3, workers=2, answered=3, dropped=0)


def test_requeued_jobs_keep_their_order_ahead_of_new_requests(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT)
    leaving = rig.dealer()
    rig.register(leaving, 3)
    client = dealer_client(rig, [b"j0", b"j1", b"j2"])
    held = rig.tasks_in(leaving, 3)
    assert [p for _, p in held] == [[b"j0"], [b"j1"], [b"j2"]]
    client.send_multipart([b"", b"j3"])
    rig.pump_stat("requests", 4)
    leaving.disconnect()
    rig.pump_stat("workers_left", 1)
    other = rig.dealer()
    rig.register(other, 4)
    got = rig.tasks_in(other, 4)
    # Oldest first, as the attempts were sent, then the new request.
    assert [p for _, p in got] == [[b"j0"], [b"j1"], [b"j2"], [b"j3"]]
    assert [tid for tid, _ in got[:3]] == [tid for tid, _ in held]


def test_unknown_worker_heartbeat_or_failed_gets_disconnect(make_wrig):
    rig = make_wrig()
    stranger = rig.dealer()
    stranger.heartbeat()
    assert rig.next_message(stranger) == DISCONNECT_MSG
    assert_stats(rig.stats(), workers=0, workers_joined=0, dropped=0)
    stranger.failed(EPOCH + b"\x00" * 8)
    assert rig.next_message(stranger) == DISCONNECT_MSG
    assert_stats(rig.stats(), workers=0, failed=0, dropped=1, drops={UNKNOWN: 1})
    # DISCONNECT from a stranger: nothing back, nothing counted.
    stranger.disconnect()
    rig.settle()
    assert stranger.inbox == []
    assert_stats(rig.stats(), workers=0, workers_left=0, dropped=1)
    # After READY it is a worker like any other.
    rig.register(stranger, 1)
    stranger.heartbeat()
    rig.settle()
    assert stranger.inbox == []
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(stranger)
    stranger.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]


def test_unknown_worker_heartbeat_while_running_jobs_does_not_disturb_them(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    stranger = rig.dealer()
    stranger.heartbeat()
    assert rig.next_message(stranger) == DISCONNECT_MSG
    stranger.failed(task_id)  # not its job: dropped, DISCONNECT again, no retry
    assert rig.next_message(stranger) == DISCONNECT_MSG
    rig.settle(3)
    assert worker.inbox == []
    assert_stats(rig.stats(), failed=0, retried=0, running=1, workers=1, drops={UNKNOWN: 1})
    worker.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]


def test_answer_from_a_forgotten_worker_is_accepted_and_gets_disconnect(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3, liveness=LIVENESS)
    silent = rig.dealer(live=False)
    rig.register(silent, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(silent)
    rig.pump_stat("workers_dead", 1, timeout=20)
    assert_stats(rig.stats(), workers=0, queued=1, running=0, requeued=1)
    # Its answer arrives after all (say it reconnected): the job is still known.
    silent.answer(task_id, b"better late")
    assert rig.receive(client) == [b"better late"]
    assert rig.next_message(silent) == DISCONNECT_MSG
    assert_stats(rig.stats(), answered=1, late_answers=1, queued=0, workers=0, dropped=0)
    # A second answer for it is dropped, and still gets DISCONNECT.
    silent.answer(task_id, b"twin")
    assert rig.next_message(silent) == DISCONNECT_MSG
    assert_stats(rig.stats(), answered=1, drops={UNKNOWN: 1})
    # The answered job is not sent to the next worker.
    other = rig.dealer()
    rig.register(other, 1)
    rig.settle()
    assert other.inbox == []


def test_answer_from_an_unknown_worker_for_a_running_job(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    stranger = rig.dealer()
    stranger.answer(task_id, b"from a stranger")
    assert rig.receive(client) == [b"from a stranger"]
    assert rig.next_message(stranger) == DISCONNECT_MSG
    # The worker that held it is still busy with it: no job for it until it answers
    # (its credit is a "ghost"); its own answer, a duplicate, frees the credit.
    assert_stats(rig.stats(), answered=1, running=0, idle_workers=0, workers=1)
    client.send(b"next")
    rig.settle()
    assert worker.inbox == []
    worker.answer(task_id, b"mine")
    rig.pump_stat("dropped", 1)
    next_id, payload = rig.task(worker)
    assert payload == [b"next"]
    assert DISCONNECT_MSG not in worker.inbox  # a known worker is not told to register again


def test_timed_out_job_keeps_its_busy_worker_out_of_the_queue(make_wrig):
    """A slow worker whose attempt timed out is still working on it: the retry goes
    to another worker, and the slow one gets nothing until it answers (then the late
    answer is delivered and its credit is free again)."""
    rig = make_wrig(timeout=0.2, tries=3)
    slow = rig.dealer()
    rig.register(slow, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(slow)
    rig.pump_stat("timeouts", 1)
    assert_stats(rig.stats(), retried=1, queued=1, idle_workers=0)
    rig.settle()
    assert slow.inbox == []  # not sent its own job again, nor anything else
    other = rig.dealer()
    rig.register(other, 1)
    retry_id, _ = rig.task(other)
    assert retry_id == task_id
    slow.answer(task_id, b"late but first")
    assert rig.receive(client) == [b"late but first"]
    assert_stats(rig.stats(), late_answers=0, answered=1)
    client.send(b"next")
    next_id, payload = rig.task(slow)
    assert payload == [b"next"]


def test_disconnect_workers(make_wrig):
    """What the broker does when it closes: every worker is told DISCONNECT; the
    jobs they held are neither re-queued nor aborted (a job on its last try, as
    here with tries=1, must not reach its client as an abort)."""
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=1)
    a, b = rig.dealer(), rig.dealer()
    rig.register(a, 1)
    rig.register(b, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(a)
    req_worker = rig.worker()
    # Quiet workers, and no heartbeat of theirs still on the way, so that the only
    # thing they can get from now on is what disconnect_workers sends.
    a.live = b.live = False
    rig.settle(3)
    assert a.inbox == [] and b.inbox == []
    assert rig.core.disconnect_workers() == 2
    assert_stats(rig.stats(), workers=0, idle_workers=0, requeued=0, aborted=0, queued=0, running=1)
    rig.settle(3)
    assert a.inbox == [DISCONNECT_MSG] and b.inbox == [DISCONNECT_MSG]
    assert client.poll(0) == 0, "the client of the held job got something"
    # Nothing was re-queued: an original worker that asks now gets nothing.
    rig.ready(req_worker, 3)
    rig.settle(3)
    assert req_worker.poll(0) == 0
    # The held job's answer, should it still come, is delivered.
    rig.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    assert rig.core.disconnect_workers() == 0
    # The forgotten workers are strangers now.
    a.inbox.clear()
    a.heartbeat()
    assert rig.next_message(a) == DISCONNECT_MSG
    rig.pump_for(3 * HEARTBEAT)
    assert b.inbox == [DISCONNECT_MSG]


# ---------------------------------------------------------------------------
# malformed FBW01 messages
# ---------------------------------------------------------------------------

TID = EPOCH + b"\x00" * 8  # replaced by the id of a running job where there is one
MALFORMED = [
    ("unknown-command", [b"", SIG, b"\x07"], protocol.DROP_WORKER_BAD_COMMAND),
    ("command-zero", [b"", SIG, b"\x00", credit_frame(1)], protocol.DROP_WORKER_BAD_COMMAND),
    ("command-two-bytes", [b"", SIG, CMD_READY + b"\x00", credit_frame(1)], protocol.DROP_WORKER_BAD_COMMAND),
    ("command-empty", [b"", SIG, b"", credit_frame(1)], protocol.DROP_WORKER_BAD_COMMAND),
    ("task-from-worker", [b"", SIG, CMD_TASK, TID, b"payload"], protocol.DROP_WORKER_BAD_COMMAND),
    ("ready-without-credit", [b"", SIG, CMD_READY], protocol.DROP_WORKER_BAD_FRAMES),
    ("ready-credit-3-bytes", [b"", SIG, CMD_READY, b"\x00\x00\x01"], protocol.DROP_WORKER_BAD_FRAMES),
    ("ready-credit-5-bytes", [b"", SIG, CMD_READY, b"\x00" * 4 + b"\x01"], protocol.DROP_WORKER_BAD_FRAMES),
    ("ready-credit-over-max", [b"", SIG, CMD_READY, credit_frame(MAX_CREDIT + 1)], protocol.DROP_WORKER_BAD_FRAMES),
    ("ready-credit-all-ones", [b"", SIG, CMD_READY, b"\xff" * 4], protocol.DROP_WORKER_BAD_FRAMES),
    ("ready-extra-frame", [b"", SIG, CMD_READY, credit_frame(1), b"x"], protocol.DROP_WORKER_BAD_FRAMES),
    ("heartbeat-extra-frame", [b"", SIG, CMD_HEARTBEAT, b"x"], protocol.DROP_WORKER_BAD_FRAMES),
    ("disconnect-extra-frame", [b"", SIG, CMD_DISCONNECT, b"x"], protocol.DROP_WORKER_BAD_FRAMES),
    ("answer-without-answer-frames", [b"", SIG, CMD_ANSWER, TID], protocol.DROP_WORKER_BAD_FRAMES),
    ("answer-without-body", [b"", SIG, CMD_ANSWER], protocol.DROP_WORKER_BAD_FRAMES),
    ("failed-two-fields", [b"", SIG, CMD_FAILED, TID, b"ValueError"], protocol.DROP_WORKER_BAD_FRAMES),
    ("failed-four-fields", [b"", SIG, CMD_FAILED, TID, b"ValueError", b"msg", b"x"], protocol.DROP_WORKER_BAD_FRAMES),
    ("failed-id-only", [b"", SIG, CMD_FAILED, TID], protocol.DROP_WORKER_BAD_FRAMES),
    # Well-formed ANSWER frames with a bad id: dropped, and (from a stranger) DISCONNECT.
    ("answer-bad-id", [b"", SIG, CMD_ANSWER, b"short", b"answer"], protocol.DROP_ANSWER_BAD_ID),
    # Another signature is no FBW01 message: an original ready with two body frames.
    ("other-signature", [b"", b"FBW99", CMD_READY, credit_frame(1)], protocol.DROP_READY_BAD_FRAMES),
]


@pytest.mark.parametrize("frames, reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_worker_message_is_dropped(make_wrig, frames, reason):
    rig = make_wrig()
    sender = rig.dealer()
    sender.send(*frames)
    assert rig.core.run(-1, 30.0, stop_on_drop=True) == RUN_DROP
    assert rig.core.last_drop == DROP_REASONS[reason]
    rig.settle(3)
    assert_stats(
        rig.stats(),
        dropped=1,
        drops={DROP_REASONS[reason]: 1},
        workers=0,
        workers_joined=0,
        ready=0,
        idle_workers=0,
        failed=0,
        answered=0,
    )
    if frames[2] == CMD_ANSWER and reason == protocol.DROP_ANSWER_BAD_ID:
        assert sender.inbox == [DISCONNECT_MSG]  # an ANSWER from a stranger
    else:
        assert sender.inbox == []  # no reply, not even DISCONNECT
    serve_with_new_dealer(rig)
    assert rig.stats()["dropped"] == 1


def test_malformed_messages_from_a_registered_worker_leave_its_session_alone(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, tries=3)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    for _, frames, _reason in MALFORMED:
        worker.send(*[task_id if f == TID else f for f in frames])
    rig.pump_stat("dropped", len(MALFORMED))
    expected: dict = {}
    for _, _frames, reason in MALFORMED:
        expected[DROP_REASONS[reason]] = expected.get(DROP_REASONS[reason], 0) + 1
    assert rig.stats()["drops"] == expected
    rig.settle(3)
    assert worker.inbox == []
    assert_stats(
        rig.stats(),
        workers=1,
        workers_joined=1,
        ready=1,
        running=1,
        failed=0,
        retried=0,
        requeued=0,
        answered=0,
        workers_left=0,
    )
    worker.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    assert_stats(rig.stats(), answered=1, idle_workers=1)


# ---------------------------------------------------------------------------
# unreachable workers
# ---------------------------------------------------------------------------


def test_unreachable_dealer_worker_at_dispatch(make_wrig):
    # Long heartbeat: the closed worker must be found out by the send, not by silence.
    rig = make_wrig(heartbeat=1.0, liveness=30)
    gone = rig.dealer(identity=b"gone-worker")
    live = rig.dealer(identity=b"live-worker")
    rig.register(gone, 1)
    rig.register(live, 1)
    gone.close()
    wait_until(peer_gone(rig, b"gone-worker"), message="the router to drop the closed worker")
    client = rig.client()
    client.send(b"job")
    task_id, payload = rig.task(live)
    assert payload == [b"job"]
    assert_stats(rig.stats(), unreachable_workers=1, workers_dead=1, workers=1, dispatched=1, running=1, idle_workers=0)
    live.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    # The forgotten session is not tried again.
    client.send(b"again")
    task_id, _ = rig.task(live)
    live.answer(task_id, b"ok2")
    assert rig.receive(client) == [b"ok2"]
    assert rig.stats()["unreachable_workers"] == 1


def test_unreachable_worker_with_a_job_in_flight_gives_it_back(make_wrig):
    rig = make_wrig(timeout=LONG_TIMEOUT, heartbeat=1.0, liveness=30)
    gone = rig.dealer(identity=b"gone-worker")
    rig.register(gone, 2)
    client = dealer_client(rig, [b"j0"])
    held_id, _ = rig.task(gone)
    live = rig.dealer(identity=b"live-worker")
    rig.register(live, 2)
    gone.close()
    wait_until(peer_gone(rig, b"gone-worker"), message="the router to drop the closed worker")
    # `gone` (spare credit, first in line) is tried for j1 and found gone: j1 goes to
    # `live`; `gone` is forgotten at the next scan, once its last messages are read,
    # and j0 goes back to the queue, then to `live`.
    client.send_multipart([b"", b"j1"])
    got = sorted(rig.tasks_in(live, 2), key=lambda task: task[1])
    assert got[0] == (held_id, [b"j0"])
    assert got[1][1] == [b"j1"]
    assert_stats(
        rig.stats(), unreachable_workers=1, workers_dead=1, requeued=1, workers=1, dispatched=3, running=2, queued=0
    )
    for task_id, payload in got:
        live.answer(task_id, b"re:" + payload[0])
        assert rig.receive(client) == [b"", b"re:" + payload[0]]
