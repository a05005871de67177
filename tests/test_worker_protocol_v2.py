"""FBW02, the batched worker protocol (docs/PROTOCOL.md section 13), on the live core.

Raw DEALER sockets play the workers and write every frame themselves; FBC02 clients
(rigs.FBClient2) submit many jobs in one message, so that they are all queued in one
turn of the core. A TASK carries [payload frames..., header] (one 18-byte record per
job), an ANSWER [header, frames...] (one 19-byte record per outcome).
"""

from __future__ import annotations

import pytest

from fastbroker import protocol
from fastbroker.protocol import (
    C_CANCEL,
    CMD_ANSWER,
    CMD_CANCEL,
    CMD_DISCONNECT,
    CMD_READY,
    CMD_TASK,
    DROP_REASONS,
    MAX_BATCH,
    R_FAILED,
    R_OK,
    WORKER_SIGNATURE as SIG,
    WORKER_SIGNATURE_V2 as SIG2,
)
from rigs import EPOCH, assert_stats, credit_frame, new_id

BAD_BATCH = DROP_REASONS[protocol.DROP_WORKER_BAD_BATCH]
BAD_FRAMES = DROP_REASONS[protocol.DROP_WORKER_BAD_FRAMES]
UNKNOWN = DROP_REASONS[protocol.DROP_ANSWER_UNKNOWN]


def tasks_of(message: list) -> list:
    """The jobs of an FBW02 TASK as [(task id, payload frames)], checking its header."""
    assert message[:3] == [b"", SIG2, CMD_TASK], message
    body = message[3:]
    header, frames = body[-1], body[:-1]
    assert header and len(header) % 18 == 0, message
    jobs = []
    for at in range(0, len(header), 18):
        task_id, count = header[at : at + 16], int.from_bytes(header[at + 16 : at + 18], "big")
        assert len(task_id) == 16 and task_id[:8] == EPOCH and count >= 1, message
        jobs.append((task_id, frames[:count]))
        frames = frames[count:]
    assert frames == [], "frames beyond the header's records"
    return jobs


def answers(worker, *outcomes) -> None:
    """One FBW02 ANSWER of (task id, code, frames) outcomes."""
    header = b"".join(task_id + code + len(frames).to_bytes(2, "big") for task_id, code, frames in outcomes)
    worker.command(CMD_ANSWER, header, *(f for _, _, frames in outcomes for f in frames))


def queue_jobs(rig, client, payloads) -> list:
    """Submit `payloads` (lists of frames) in one FBC02 SUBMIT; wait until all are queued
    and accepted; returns their ids."""
    ids = [new_id() for _ in payloads]
    before = rig.stats()["requests"]
    client.submit(*[(rid, payload) for rid, payload in zip(ids, payloads)])
    rig.pump_stat("requests", before + len(ids))
    assert [code for _, code, _ in rig.records(client, len(ids))] == [protocol.R_ACCEPTED] * len(ids)
    return ids


def queued_for_a_worker(make_crig, payloads, credit: int, **rig_options):
    """A rig (attempt timeout 60 s), an FBC02 client whose `payloads` are queued, and an
    FBW02 worker then registered with `credit`: (rig, client, ids, worker)."""
    rig = make_crig(timeout=60.0, **rig_options)
    client = rig.fbclient2()
    ids = queue_jobs(rig, client, payloads)
    worker = rig.dealer(protocol=2)
    rig.register(worker, credit)
    return rig, client, ids, worker


def outcomes(rig, client, n: int) -> dict:
    """The next n reply records of `client`, by request id: (code, body frames)."""
    return {rid: (code, body) for rid, code, body in rig.records(client, n)}


def test_a_task_carries_the_queued_jobs_up_to_the_spare_credit(make_crig):
    payloads = [[b"j0"], [b"j1", b"second frame"], [b"j2"], [b"j3"], [b"j4"]]
    rig, client, ids, worker = queued_for_a_worker(make_crig, payloads, 3)
    jobs = tasks_of(rig.next_message(worker))
    assert [payload for _, payload in jobs] == payloads[:3]  # in order, frames kept
    assert_stats(rig.stats(), dispatched=3, running=3, queued=2, idle_workers=0, dropped=0)
    rig.quiet(worker)  # no spare credit: nothing more
    answers(worker, (jobs[0][0], R_OK, [b"re:j0"]))
    # One job answered, one credit spare: a TASK of one job.
    more = tasks_of(rig.next_message(worker))
    assert [payload for _, payload in more] == [payloads[3]]
    answers(worker, *((task_id, R_OK, [b"re:" + payload[0]]) for task_id, payload in jobs[1:] + more))
    last = tasks_of(rig.next_message(worker))
    assert [payload for _, payload in last] == [payloads[4]]
    answers(worker, (last[0][0], R_OK, [b"re:j4", b"two frames"]))
    got = outcomes(rig, client, 5)
    assert got[ids[0]] == (R_OK, [b"re:j0"]) and got[ids[4]] == (R_OK, [b"re:j4", b"two frames"])
    assert all(got[rid] == (R_OK, [b"re:" + payloads[n][0]]) for n, rid in enumerate(ids[:4]))
    assert_stats(rig.stats(), answered=5, dispatched=5, running=0, queued=0, idle_workers=1, dropped=0)


def test_a_busy_credit_one_worker_gets_nothing_more(make_crig):
    rig, client, ids, worker = queued_for_a_worker(make_crig, [[b"a"], [b"b"], [b"c"]], 1)
    for n, rid in enumerate(ids):
        jobs = tasks_of(rig.next_message(worker))
        assert len(jobs) == 1
        rig.quiet(worker)
        answers(worker, (jobs[0][0], R_OK, [b"done%d" % n]))
        assert outcomes(rig, client, 1) == {rid: (R_OK, [b"done%d" % n])}


def test_a_few_jobs_spread_over_the_idle_workers(make_crig):
    # Each idle worker takes its share of the queue (rounded up), not all its credit:
    # 4 jobs for two idle workers of credit 10 are 2 each.
    rig = make_crig(timeout=60.0)
    first, second = rig.dealer(protocol=2), rig.dealer(protocol=2)
    rig.register(first, 10)
    rig.register(second, 10)
    client = rig.fbclient2()
    queue_jobs(rig, client, [[b"%d" % n] for n in range(4)])
    a, b = tasks_of(rig.next_message(first)), tasks_of(rig.next_message(second))
    assert sorted(p[0] for _, p in a + b) == [b"0", b"1", b"2", b"3"]
    assert (len(a), len(b)) == (2, 2)
    assert_stats(rig.stats(), running=4, queued=0, idle_workers=2)


def test_an_answer_message_with_a_bad_record_delivers_the_others(make_crig):
    rig, client, ids, worker = queued_for_a_worker(make_crig, [[b"ok"], [b"odd"], [b"fails"]], 3, tries=1)
    (t0, _), (t1, _), (t2, _) = tasks_of(rig.next_message(worker))
    answers(
        worker,
        (t0, R_OK, [b"fine"]),
        (t1, b"\x99", [b"unknown outcome"]),  # dropped alone
        (t2, R_FAILED, [b"ValueError", b"bad input"]),
        (t0, R_OK, [b"again"]),  # the same job twice in one message: the second is unknown
    )
    got = outcomes(rig, client, 2)
    assert got == {ids[0]: (R_OK, [b"fine"]), ids[2]: (R_FAILED, [b"ValueError", b"bad input"])}
    rig.pump(lambda: rig.stats()["drops"].get(BAD_FRAMES) == 1 and rig.stats()["drops"].get(UNKNOWN) == 1)
    assert_stats(rig.stats(), answered=1, failed=1, aborted=1, running=1)
    answers(worker, (t1, R_OK, [b"late but fine"]))
    assert outcomes(rig, client, 1) == {ids[1]: (R_OK, [b"late but fine"])}


@pytest.mark.parametrize(
    "body_of",
    [
        pytest.param(lambda t: [], id="no-header"),
        pytest.param(lambda t: [b"", b"a"], id="empty-header"),
        pytest.param(lambda t: [t + R_OK + b"\x00", b"a"], id="header-not-a-multiple"),
        pytest.param(lambda t: [t + R_OK + b"\x00\x01", b"a", b"b"], id="more-frames-than-counted"),
        pytest.param(lambda t: [t + R_OK + b"\x00\x03", b"a", b"b"], id="fewer-frames-than-counted"),
        pytest.param(lambda t: [(t + R_OK + b"\x00\x00") * (MAX_BATCH + 1)], id="too-many-records"),
    ],
)
def test_an_answer_whose_header_does_not_match_is_dropped_whole(make_crig, body_of):
    rig, client, (rid,), worker = queued_for_a_worker(make_crig, [[b"job"]], 1)
    ((task_id, _),) = tasks_of(rig.next_message(worker))
    worker.command(CMD_ANSWER, *body_of(task_id))
    rig.pump(lambda: rig.stats()["drops"].get(BAD_BATCH) == 1)
    rig.quiet(client, worker)
    assert_stats(rig.stats(), answered=0, running=1)
    answers(worker, (task_id, R_OK, [b"proper"]))
    assert outcomes(rig, client, 1) == {rid: (R_OK, [b"proper"])}


def test_an_answer_from_an_unknown_worker_is_delivered_and_it_is_told_in_fbw02(make_crig):
    rig, client, (rid,), worker = queued_for_a_worker(make_crig, [[b"job"]], 1)
    ((task_id, _),) = tasks_of(rig.next_message(worker))
    stranger = rig.dealer(protocol=2, live=False)
    answers(stranger, (task_id, R_OK, [b"from a stranger"]))
    assert outcomes(rig, client, 1) == {rid: (R_OK, [b"from a stranger"])}
    # Its collect() checks the signature of whatever comes: FBW02.
    assert rig.next_message(stranger) == [b"", SIG2, CMD_DISCONNECT]


def test_heartbeats_and_cancel_come_in_the_workers_protocol(make_crig):
    rig = make_crig(timeout=60.0)
    worker = rig.dealer(protocol=2)
    rig.register(worker, 1)
    rig.pump(lambda: len(worker.heartbeat_times) >= 2)  # collect() checked they are FBW02
    client = rig.fbclient2()
    (rid,) = queue_jobs(rig, client, [[b"long"]])
    ((task_id, _),) = tasks_of(rig.next_message(worker))
    client.command(C_CANCEL, rid)
    assert rig.next_message(worker) == [b"", SIG2, CMD_CANCEL, task_id]


def test_a_worker_speaks_the_protocol_of_its_last_ready(make_crig):
    rig, client, ids, worker = queued_for_a_worker(make_crig, [[b"a"], [b"b"], [b"c"]], 2)
    jobs = tasks_of(rig.next_message(worker))
    assert len(jobs) == 2
    # READY in FBW01 from the same socket: one job per TASK from now on.
    worker.sig = SIG
    worker.command(CMD_READY, credit_frame(3))
    message = rig.next_message(worker)
    assert message[:3] == [b"", SIG, CMD_TASK] and message[4:] == [b"c"]
    # An FBW01 ANSWER for a job sent in FBW02 is taken all the same.
    worker.command(CMD_ANSWER, jobs[0][0], b"re:a")
    worker.command(CMD_ANSWER, jobs[1][0], b"re:b")
    worker.command(CMD_ANSWER, message[3], b"re:c")
    got = outcomes(rig, client, 3)
    assert [got[rid] for rid in ids] == [(R_OK, [b"re:a"]), (R_OK, [b"re:b"]), (R_OK, [b"re:c"])]


def test_an_answer_batch_at_the_frame_limit_reaches_the_broker(make_crig):
    """The worker's AnswerBatch (the pure session's; the compiled one packs the same)
    keeps each ANSWER within MAX_FRAMES as the broker counts it, its ROUTER's identity
    frame included: 1023 answers of 4 frames made one message of 4096 frames at the
    worker, 4097 at the broker, which dropped all 1023 outcomes at once."""
    from fastbroker.worker.wire import AnswerBatch

    n = 1023
    rig, _client, _ids, worker = queued_for_a_worker(make_crig, [[b"x"]] * n, n)
    rig.pump(lambda: sum(len(tasks_of(m)) for m in worker.inbox) >= n)
    jobs = [job for m in worker.inbox for job in tasks_of(m)]
    worker.inbox.clear()
    batch = AnswerBatch()
    for task_id, _ in jobs:
        batch.add(task_id, protocol.R_OK, [b"a", b"b", b"c", b"d"])
    messages = batch.close()
    assert all(len(m) + 1 <= protocol.MAX_FRAMES for m in messages), [len(m) for m in messages]
    for m in messages:
        worker.send(*m)
    rig.pump(lambda: rig.stats()["answered"] == n or rig.stats()["dropped"] > 0)
    assert rig.stats()["answered"] == n and rig.stats()["dropped"] == 0
