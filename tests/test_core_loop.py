"""BrokerCore driven directly, in-process: inproc sockets in one context, the core's
loop run in short slices by `pump` while the test plays clients and workers (rigs.Rig,
from the make_rig fixture).

Everything happens in the test thread (except the wake-fd test), so the order of
events is the order the test writes them; no sleeps drive behaviour.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import zmq

from fastbroker import protocol
from fastbroker.protocol import DROP_REASONS, RUN_DROP, RUN_TIMEOUT, RUN_WOKEN
from rigs import EPOCH, SLICE, Rig, assert_stats, peer_gone, settle, wait_until

UNKNOWN = DROP_REASONS[protocol.DROP_ANSWER_UNKNOWN]
SHORT_TIMEOUT = 0.1  # per-attempt timeout where a test needs attempts to expire


@pytest.fixture
def ctx():
    """Here the context is terminated (not destroyed): a socket a rig left open hangs the test."""
    context = zmq.Context()
    yield context
    context.term()


def serve_one(rig: Rig, payload: bytes = b"check") -> None:
    """A whole valid job, with a fresh REQ client and REQ worker."""
    before = rig.stats()
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, before["ready"] + 1)
    client.send(payload)
    task_id, body = rig.receive(worker)
    assert body == payload
    assert len(task_id) == 16 and task_id[:8] == EPOCH
    rig.answer(task_id, b"re:" + payload)
    assert rig.receive(client) == [b"re:" + payload]
    assert rig.stats()["answered"] == before["answered"] + 1


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


def test_request_goes_only_to_a_worker_that_asked(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()
    client.send(b"job")
    rig.pump_stat("requests", 1)
    settle(rig.core)
    assert worker.poll(0) == 0
    assert_stats(rig.stats(), queued=1, running=0, dispatched=0, idle_workers=0)
    rig.ready(worker, 1)
    task_id, payload = rig.receive(worker)
    assert payload == b"job"
    assert len(task_id) == 16 and task_id[:8] == EPOCH
    assert_stats(rig.stats(), queued=0, running=1, dispatched=1, idle_workers=0)
    rig.answer(task_id, b"done")
    assert rig.receive(client) == [b"done"]
    assert_stats(
        rig.stats(), requests=1, dispatched=1, answered=1, queued=0, running=0, timeouts=0, dropped=0, drops={}
    )


def test_idle_worker_waits_for_a_request(make_rig):
    rig = make_rig()
    worker = rig.worker()
    rig.ready(worker, 1)
    settle(rig.core)
    assert worker.poll(0) == 0
    assert_stats(rig.stats(), idle_workers=1, queued=0, dispatched=0)
    client = rig.client()
    client.send(b"job")
    task_id, payload = rig.receive(worker)
    assert payload == b"job"
    assert_stats(rig.stats(), idle_workers=0, running=1, dispatched=1)
    rig.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]


def test_fifo_among_waiting_jobs(make_rig):
    rig = make_rig()
    client = rig.client(zmq.DEALER)  # one pipe: the jobs arrive in the order sent
    for i in range(5):
        client.send_multipart([b"", b"job%d" % i])
    rig.pump_stat("requests", 5)
    assert rig.stats()["queued"] == 5
    worker = rig.worker()
    seen = []
    for i in range(5):
        rig.ready(worker, i + 1)
        task_id, payload = rig.receive(worker)
        seen.append(payload)
        rig.answer(task_id, b"re:" + payload)
        assert rig.receive(client) == [b"", b"re:" + payload]
        assert rig.stats()["queued"] == 4 - i
    assert seen == [b"job%d" % i for i in range(5)]


def test_fifo_among_idle_workers(make_rig):
    rig = make_rig()
    workers = [rig.worker() for _ in range(4)]
    for i, worker in enumerate(workers):
        rig.ready(worker, i + 1)
    assert rig.stats()["idle_workers"] == 4
    client = rig.client(zmq.DEALER)
    for i in range(4):
        client.send_multipart([b"", b"job%d" % i])
    rig.pump(lambda: all(w.poll(0) for w in workers))
    got = [w.recv_multipart() for w in workers]
    assert [payload for _, payload in got] == [b"job%d" % i for i in range(4)]
    assert len({task_id for task_id, _ in got}) == 4
    assert_stats(rig.stats(), dispatched=4, running=4, idle_workers=0, queued=0)


def test_second_ready_from_same_address_replaces_first(make_rig):
    rig = make_rig()
    a = rig.worker(zmq.DEALER, identity=b"worker-a")
    b = rig.worker(zmq.DEALER, identity=b"worker-b")
    rig.ready(a, 1)
    rig.ready(b, 2)
    rig.ready(a, 3)  # a's second ready: a moves behind b, still one entry
    assert rig.stats()["idle_workers"] == 2
    client = rig.client(zmq.DEALER)
    client.send_multipart([b"", b"first"])
    assert rig.receive(b)[2:] == [b"first"]
    assert a.poll(0) == 0
    client.send_multipart([b"", b"second"])
    assert rig.receive(a)[2:] == [b"second"]
    client.send_multipart([b"", b"third"])
    rig.pump_stat("requests", 3)
    settle(rig.core)
    # a got one job for its two readies: the third waits.
    assert a.poll(0) == 0 and b.poll(0) == 0
    assert_stats(rig.stats(), queued=1, dispatched=2, idle_workers=0)


def test_multipart_payload_forwarded_intact(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()
    payload = [b"head", b"", b"\x00\xff\x00", b"x" * 1000, b""]
    rig.ready(worker, 1)
    client.send_multipart(payload)
    task_id, *body = rig.receive(worker)
    assert body == payload
    answer = [b"", b"a", b"\x00" * 17, b""]
    rig.answer(task_id, *answer)
    assert rig.receive(client) == answer


def test_single_empty_payload_frame_is_a_request(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(b"")
    task_id, *body = rig.receive(worker)
    assert body == [b""]
    rig.answer(task_id, b"answer")
    assert rig.receive(client) == [b"answer"]
    assert rig.stats()["dropped"] == 0


def test_large_payload_forwarded_intact(make_rig):
    rig = make_rig()
    rng = random.Random(1)
    payload = rng.randbytes(1 << 20)
    answer = rng.randbytes(1 << 20)
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(payload)
    task_id, body = rig.receive(worker)
    assert body == payload
    rig.answer(task_id, answer)
    assert rig.receive(client) == [answer]


def test_routing_envelopes_with_several_frames(make_rig):
    rig = make_rig()
    # A client behind a proxy hop and a worker behind one: both envelopes are kept.
    client = rig.client(zmq.DEALER)
    worker = rig.worker(zmq.DEALER)
    worker.send_multipart([b"worker-hop", b"", b"ready"])
    rig.pump_stat("ready", 1)
    client.send_multipart([b"hop1", b"hop2", b"", b"job"])
    hop, delimiter, task_id, payload = rig.receive(worker)
    assert (hop, delimiter, payload) == (b"worker-hop", b"", b"job")
    rig.answer(task_id, b"done")
    assert rig.receive(client) == [b"hop1", b"hop2", b"", b"done"]


def test_many_jobs_many_workers_each_answered_once(make_rig):
    rig = make_rig()
    client = rig.client(zmq.DEALER)
    workers = [rig.worker(zmq.DEALER) for _ in range(4)]
    for n, worker in enumerate(workers, 1):
        rig.ready(worker, n)
    n_jobs = 300
    for i in range(n_jobs):
        client.send_multipart([b"", b"%d" % i])
    answers = []
    deadline = time.monotonic() + 20
    while len(answers) < n_jobs and time.monotonic() < deadline:
        rig.core.run(-1, SLICE)
        for worker in workers:
            while worker.poll(0):
                _, task_id, payload = worker.recv_multipart()
                rig.answer(task_id, b"re:" + payload)
                worker.send_multipart([b"", b"ready"])
        while client.poll(0):
            answers.append(client.recv_multipart()[1])
    assert sorted(answers) == sorted(b"re:%d" % i for i in range(n_jobs))
    settle(rig.core, 2)
    assert client.poll(0) == 0
    assert_stats(
        rig.stats(), requests=n_jobs, dispatched=n_jobs, answered=n_jobs, queued=0, running=0, idle_workers=4, dropped=0
    )


# ---------------------------------------------------------------------------
# deadlines and tries
# ---------------------------------------------------------------------------


def test_timeout_resends_same_task_id_to_another_worker(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT)
    client, w1, w2 = rig.client(), rig.worker(), rig.worker()
    rig.ready(w1, 1)
    client.send(b"job")
    tid1, payload1 = rig.receive(w1)
    rig.ready(w2, 2)
    tid2, payload2 = rig.receive(w2)
    assert (tid2, payload2) == (tid1, payload1) == (tid1, b"job")
    assert_stats(rig.stats(), timeouts=1, retried=1, dispatched=2, running=1, queued=0, aborted=0)
    rig.answer(tid2, b"from w2")
    assert rig.receive(client) == [b"from w2"]
    # The first attempt's answer now finds no task: dropped, not delivered twice.
    rig.answer(tid1, b"from w1")
    rig.pump_stat("dropped", 1)
    settle(rig.core, 3)
    assert client.poll(0) == 0
    assert_stats(rig.stats(), answered=1, late_answers=0, dropped=1, drops={UNKNOWN: 1}, running=0, queued=0)


def test_retried_job_goes_before_waiting_jobs(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT)
    client = rig.client(zmq.DEALER)
    w1 = rig.worker()
    rig.ready(w1, 1)
    client.send_multipart([b"", b"A"])
    client.send_multipart([b"", b"B"])
    tid_a, payload = rig.receive(w1)
    assert payload == b"A"
    rig.pump_stat("retried", 1)
    assert rig.stats()["queued"] == 2
    w2, w3 = rig.worker(), rig.worker()
    rig.ready(w2, 2)
    assert rig.receive(w2) == [tid_a, b"A"]
    rig.ready(w3, 3)
    tid_b, payload = rig.receive(w3)
    assert payload == b"B" and tid_b != tid_a


def test_answer_before_timeout_cancels_the_deadline(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT, tries=1)
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(b"job")
    task_id, _ = rig.receive(worker)
    rig.answer(task_id, b"in time")
    assert rig.receive(client) == [b"in time"]
    # Well past the deadline: nothing expires, nothing is sent to the client.
    settle(rig.core, turns=4, max_wait=SHORT_TIMEOUT)
    assert client.poll(0) == 0
    assert_stats(rig.stats(), timeouts=0, aborted=0, answered=1, running=0)


def test_tries_exhausted_sends_empty_answer(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT, tries=2)
    client, w1, w2 = rig.client(), rig.worker(), rig.worker()
    rig.ready(w1, 1)
    client.send(b"job")
    tid1, _ = rig.receive(w1)
    rig.ready(w2, 2)
    tid2, _ = rig.receive(w2)
    assert tid2 == tid1
    assert rig.receive(client) == [b""]
    assert_stats(rig.stats(), timeouts=2, retried=1, aborted=1, dispatched=2, answered=0, running=0, queued=0)
    # An answer after the abort is dropped.
    rig.answer(tid1, b"too late")
    rig.pump_stat("dropped", 1)
    settle(rig.core, 3)
    assert client.poll(0) == 0
    assert rig.stats()["drops"] == {UNKNOWN: 1}
    # The REQ client can ask again and is served.
    client.send(b"again")
    rig.ready(w1, 3)  # REQ w1 got its job; its next ready is legal
    task_id, payload = rig.receive(w1)
    assert payload == b"again" and task_id != tid1
    rig.answer(task_id, b"fine")
    assert rig.receive(client) == [b"fine"]


def test_single_try_is_not_retried(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT, tries=1)
    client, w1, w2 = rig.client(), rig.worker(), rig.worker()
    rig.ready(w1, 1)
    client.send(b"job")
    rig.receive(w1)
    rig.ready(w2, 2)  # an idle worker is there, but there is no second try
    assert rig.receive(client) == [b""]
    settle(rig.core, 3)
    assert w2.poll(0) == 0
    assert_stats(rig.stats(), timeouts=1, retried=0, aborted=1, dispatched=1, idle_workers=1)


def test_late_answer_while_waiting_for_retry_is_delivered_once(make_rig):
    rig = make_rig(timeout=SHORT_TIMEOUT, tries=3)
    client, w1 = rig.client(), rig.worker()
    rig.ready(w1, 1)
    client.send(b"job")
    tid, _ = rig.receive(w1)
    rig.pump_stat("retried", 1)
    assert_stats(rig.stats(), timeouts=1, queued=1, running=0)
    rig.answer(tid, b"late")
    assert rig.receive(client) == [b"late"]
    assert_stats(rig.stats(), answered=1, late_answers=1, queued=0, running=0, dropped=0)
    # Its twin (the same task id again) is dropped.
    rig.answer(tid, b"twin")
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN: 1}
    # The answered job is not sent again to a worker that asks.
    w2 = rig.worker()
    rig.ready(w2, 2)
    settle(rig.core)
    assert w2.poll(0) == 0
    assert client.poll(0) == 0
    assert_stats(rig.stats(), dispatched=1, idle_workers=1, queued=0)
    # And the core goes on serving.
    client.send(b"next")
    task_id, payload = rig.receive(w2)
    assert payload == b"next" and task_id != tid
    rig.answer(task_id, b"next done")
    assert rig.receive(client) == [b"next done"]
    assert_stats(rig.stats(), answered=2, late_answers=1, aborted=0)


def test_timeout_zero_answer_is_late_but_delivered(make_rig):
    rig = make_rig(timeout=0)
    assert rig.core.timeout == 0
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(b"job")
    tid, payload = rig.receive(worker)
    assert payload == b"job"
    rig.pump_stat("retried", 1)
    rig.answer(tid, b"answer")
    assert rig.receive(client) == [b"answer"]
    assert_stats(
        rig.stats(), dispatched=1, timeouts=1, retried=1, answered=1, late_answers=1, queued=0, running=0, aborted=0
    )


def test_timeout_zero_single_try_aborts(make_rig):
    rig = make_rig(timeout=0, tries=1)
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(b"job")
    assert rig.receive(worker)[1] == b"job"
    assert rig.receive(client) == [b""]
    assert_stats(rig.stats(), dispatched=1, timeouts=1, aborted=1, running=0, queued=0)


# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------


def test_req_worker_ready_before_its_answer_is_honoured(make_rig):
    rig = make_rig()
    client, worker = rig.client(zmq.DEALER), rig.worker()
    rig.ready(worker, 1)
    client.send_multipart([b"", b"job1"])
    tid1, _ = rig.receive(worker)
    # The worker asks again before its answer is in; both are pending together.
    worker.send(b"ready")
    rig.answer(tid1, b"answer1")
    assert rig.receive(client) == [b"", b"answer1"]
    rig.pump_stat("ready", 2)
    assert_stats(rig.stats(), idle_workers=1, answered=1, running=0)
    client.send_multipart([b"", b"job2"])
    tid2, payload = rig.receive(worker)
    assert payload == b"job2" and tid2 != tid1


def test_req_worker_gets_a_second_job_before_answering_the_first(make_rig):
    rig = make_rig()
    client, worker = rig.client(zmq.DEALER), rig.worker()
    client.send_multipart([b"", b"job1"])
    client.send_multipart([b"", b"job2"])
    rig.pump_stat("requests", 2)
    rig.ready(worker, 1)
    tid1, p1 = rig.receive(worker)
    rig.ready(worker, 2)
    tid2, p2 = rig.receive(worker)
    assert (p1, p2) == (b"job1", b"job2")
    assert_stats(rig.stats(), running=2, queued=0)
    rig.answer(tid2, b"a2")
    rig.answer(tid1, b"a1")
    assert rig.receive(client) == [b"", b"a2"]
    assert rig.receive(client) == [b"", b"a1"]
    assert_stats(rig.stats(), answered=2, running=0)


def test_job_for_a_vanished_worker_goes_to_the_next(make_rig):
    rig = make_rig()
    dead = rig.worker(identity=b"dead-worker")
    live = rig.worker(identity=b"live-worker")
    rig.ready(dead, 1)
    rig.ready(live, 2)
    dead.close(0)
    wait_until(peer_gone(rig, b"dead-worker"), message="the router to drop the closed worker")
    client = rig.client()
    client.send(b"job")
    task_id, payload = rig.receive(live)
    assert payload == b"job"
    assert_stats(rig.stats(), unreachable_workers=1, dispatched=1, idle_workers=0, running=1)
    rig.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]


def test_job_stays_queued_when_its_only_worker_vanished(make_rig):
    rig = make_rig()
    dead = rig.worker(identity=b"dead-worker")
    rig.ready(dead, 1)
    dead.close(0)
    wait_until(peer_gone(rig, b"dead-worker"), message="the router to drop the closed worker")
    client = rig.client()
    client.send(b"job")
    rig.pump_stat("unreachable_workers", 1)
    assert_stats(rig.stats(), queued=1, dispatched=0, idle_workers=0)
    live = rig.worker()
    rig.ready(live, 2)
    task_id, payload = rig.receive(live)
    assert payload == b"job"
    rig.answer(task_id, b"ok")
    assert rig.receive(client) == [b"ok"]
    assert_stats(rig.stats(), unreachable_workers=1, dispatched=1, answered=1)


def test_answer_for_a_vanished_client_is_counted_and_harmless(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()
    rig.ready(worker, 1)
    client.send(b"job")
    task_id, _ = rig.receive(worker)
    client.close(0)
    rig.answer(task_id, b"nobody listens")
    rig.pump_stat("answered", 1)
    assert_stats(rig.stats(), running=0, dropped=0)
    serve_one(rig)


# ---------------------------------------------------------------------------
# malformed messages
# ---------------------------------------------------------------------------

MALFORMED = [
    ("requests", zmq.DEALER, [b"no delimiter"], protocol.DROP_REQUEST_NO_DELIMITER),
    ("requests", zmq.DEALER, [b"a", b"b"], protocol.DROP_REQUEST_NO_DELIMITER),
    ("requests", zmq.DEALER, [b""], protocol.DROP_REQUEST_NO_PAYLOAD),
    ("requests", zmq.DEALER, [b"hop", b""], protocol.DROP_REQUEST_NO_PAYLOAD),
    ("workers", zmq.DEALER, [b"ready"], protocol.DROP_READY_NO_DELIMITER),
    ("workers", zmq.DEALER, [b""], protocol.DROP_READY_BAD_FRAMES),
    ("workers", zmq.DEALER, [b"", b"ready", b"extra"], protocol.DROP_READY_BAD_FRAMES),
    ("answers", zmq.PUSH, [b"x" * 16], protocol.DROP_ANSWER_TOO_SHORT),
    ("answers", zmq.PUSH, [b"short", b"answer"], protocol.DROP_ANSWER_BAD_ID),
    ("answers", zmq.PUSH, [b"x" * 17, b"answer"], protocol.DROP_ANSWER_BAD_ID),
    ("answers", zmq.PUSH, [b"", b"answer"], protocol.DROP_ANSWER_BAD_ID),
    ("answers", zmq.PUSH, [b"x" * 16, b"answer"], protocol.DROP_ANSWER_UNKNOWN),
    ("answers", zmq.PUSH, [EPOCH + b"\xff" * 8, b"answer"], protocol.DROP_ANSWER_UNKNOWN),
]
MALFORMED_IDS = [
    "request-no-delimiter",
    "request-two-frames-no-delimiter",
    "request-only-delimiter",
    "request-hop-and-delimiter",
    "ready-no-delimiter",
    "ready-no-body",
    "ready-two-body-frames",
    "answer-one-frame",
    "answer-short-id",
    "answer-long-id",
    "answer-empty-id",
    "answer-unknown-id",
    "answer-unknown-id-same-epoch",
]


@pytest.mark.parametrize("endpoint, kind, frames, reason", MALFORMED, ids=MALFORMED_IDS)
def test_malformed_message_is_dropped_and_counted(make_rig, endpoint, kind, frames, reason):
    rig = make_rig()
    sender = rig.peer(endpoint, kind)
    sender.send_multipart(frames)
    rig.pump_stat("dropped", 1)
    stats = rig.stats()
    assert stats["drops"] == {DROP_REASONS[reason]: 1}
    assert_stats(stats, requests=0, ready=0, answered=0, queued=0, idle_workers=0)
    # The core still serves a valid job, and the sender got nothing back.
    serve_one(rig)
    if kind != zmq.PUSH:
        assert sender.poll(0) == 0
    assert rig.stats()["dropped"] == 1


@pytest.mark.parametrize("endpoint, kind, frames, reason", MALFORMED, ids=MALFORMED_IDS)
def test_stop_on_drop_returns_run_drop(make_rig, endpoint, kind, frames, reason):
    rig = make_rig()
    sender = rig.peer(endpoint, kind)
    sender.send_multipart(frames)
    started = time.monotonic()
    assert rig.core.run(-1, 30.0, stop_on_drop=True) == RUN_DROP
    assert time.monotonic() - started < 20  # returned on the drop, not on max_wait
    assert rig.core.last_drop == DROP_REASONS[reason]
    assert rig.stats()["dropped"] == 1


def test_all_malformed_kinds_together(make_rig):
    rig = make_rig()
    expected: dict = {}
    for endpoint, kind, frames, reason in MALFORMED:
        rig.peer(endpoint, kind).send_multipart(frames)
        text = DROP_REASONS[reason]
        expected[text] = expected.get(text, 0) + 1
    rig.pump_stat("dropped", len(MALFORMED))
    assert rig.stats()["drops"] == expected
    serve_one(rig)


def test_last_drop_and_run_codes(make_rig):
    rig = make_rig()
    assert rig.core.last_drop is None
    assert rig.core.run(-1, 0.01, stop_on_drop=True) == RUN_TIMEOUT
    assert rig.core.last_drop is None
    sender = rig.peer("answers", zmq.PUSH)
    sender.send_multipart([b"lonely"])
    # Without stop_on_drop the drop is recorded and the run goes on to max_wait.
    rig.pump_stat("dropped", 1)
    assert rig.core.last_drop == DROP_REASONS[protocol.DROP_ANSWER_TOO_SHORT]
    # A later run without drops clears it.
    assert rig.core.run(-1, 0.01) == RUN_TIMEOUT
    assert rig.core.last_drop is None
    sender.send_multipart([b"y" * 3, b"answer"])
    assert rig.core.run(-1, 30.0, stop_on_drop=True) == RUN_DROP
    assert rig.core.last_drop == DROP_REASONS[protocol.DROP_ANSWER_BAD_ID]
    serve_one(rig)
    assert rig.stats()["dropped"] == 2


def test_too_many_frames(make_rig):
    limit = protocol.MAX_FRAMES
    rig = make_rig()
    pusher = rig.peer("answers", zmq.PUSH)
    pusher.send_multipart([b"z" * 16] + [b"f"] * (limit - 1))  # exactly the limit
    rig.pump_stat("dropped", 1)
    assert rig.stats()["drops"] == {UNKNOWN: 1}
    pusher.send_multipart([b"z" * 16] + [b"f"] * limit)  # one frame too many
    rig.pump_stat("dropped", 2)
    too_many = DROP_REASONS[protocol.DROP_TOO_MANY_FRAMES]
    assert rig.stats()["drops"] == {UNKNOWN: 1, too_many: 1}
    # A REQ client's request: the router adds its identity and the delimiter.
    client, worker = rig.client(), rig.worker()
    client.send_multipart([b"p"] * (limit - 1))
    rig.pump_stat("dropped", 3)
    assert rig.stats()["drops"] == {UNKNOWN: 1, too_many: 2}
    assert rig.stats()["requests"] == 0
    client2 = rig.client()
    client2.send_multipart([b"q"] * (limit - 2))
    rig.pump_stat("requests", 1)
    rig.ready(worker, 1)
    task_id, *body = rig.receive(worker)
    assert body == [b"q"] * (limit - 2)
    rig.answer(task_id, b"ok")
    assert rig.receive(client2) == [b"ok"]
    assert client.poll(0) == 0


# ---------------------------------------------------------------------------
# run() control
# ---------------------------------------------------------------------------


def test_run_zero_dispatches_what_is_pending(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()
    worker.send(b"ready")
    client.send(b"job")
    # Both messages are pending; one run(-1, 0) handles them: the job is dispatched.
    assert rig.core.run(-1, 0) == RUN_TIMEOUT
    assert_stats(rig.stats(), ready=1, requests=1, dispatched=1, queued=0, idle_workers=0)
    assert worker.poll(0)


def test_run_zero_with_stop_on_drop_reports_the_drop(make_rig):
    rig = make_rig()
    rig.peer("answers", zmq.PUSH).send_multipart([b"lonely"])
    assert rig.core.run(-1, 0, stop_on_drop=True) == RUN_DROP
    assert rig.core.last_drop == DROP_REASONS[protocol.DROP_ANSWER_TOO_SHORT]


def test_run_returns_after_max_wait(make_rig):
    rig = make_rig()
    started = time.monotonic()
    assert rig.core.run(-1, 0.05) == RUN_TIMEOUT
    assert time.monotonic() - started >= 0.049
    assert rig.core.run(-1, 0) == RUN_TIMEOUT
    assert rig.core.run(-1, -1.0) == RUN_TIMEOUT  # negative: like 0


def test_wake_fd_already_readable(make_rig):
    rig = make_rig()
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        started = time.monotonic()
        assert rig.core.run(r, 30.0) == RUN_WOKEN
        assert time.monotonic() - started < 20
        # The core does not consume the byte: the fd stays readable.
        assert rig.core.run(r, 30.0) == RUN_WOKEN
        os.read(r, 1)
        assert rig.core.run(r, 0.01) == RUN_TIMEOUT
    finally:
        os.close(r)
        os.close(w)


def test_wake_fd_wakes_a_running_core_that_serves_meanwhile(make_rig):
    rig = make_rig()
    client, worker = rig.client(), rig.worker()  # used by this thread only
    r, w = os.pipe()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(rig.core.run(r, 60.0)), daemon=True)
    try:
        thread.start()
        worker.send(b"ready")
        client.send(b"job")
        assert worker.poll(10_000), "the running core did not dispatch"
        task_id, payload = worker.recv_multipart()
        assert payload == b"job"
        rig.answer(task_id, b"done")
        assert client.poll(10_000), "the running core did not answer"
        assert client.recv_multipart() == [b"done"]
        assert thread.is_alive() and not result
        os.write(w, b"x")
        thread.join(20)
        assert not thread.is_alive()
        assert result == [RUN_WOKEN]
    finally:
        if thread.is_alive():  # never leave the core running on closed sockets
            os.write(w, b"x")
            thread.join(20)
        os.close(r)
        os.close(w)


def test_close_then_run_raises(make_rig):
    rig = make_rig(timeout=5.0)
    client = rig.client(zmq.DEALER)
    worker = rig.worker(zmq.DEALER)
    rig.ready(worker, 1)
    client.send_multipart([b"", b"one"])
    client.send_multipart([b"", b"two"])
    rig.pump_stat("requests", 2)
    client.send_multipart([b"", b"three"])
    rig.pump_stat("requests", 3)
    assert_stats(rig.stats(), running=1, queued=2)
    rig.core.close()
    with pytest.raises(RuntimeError):
        rig.core.run(-1, 0)
    with pytest.raises(RuntimeError):
        rig.core.run(-1, 0.01, stop_on_drop=True)
    stats = rig.core.stats()
    assert_stats(stats, queued=0, running=0, idle_workers=0)
    rig.core.close()  # idempotent
