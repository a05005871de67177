"""FBC02, the batched client protocol (docs/PROTOCOL.md section 12), on the live core,
driven in-process as in test_client_protocol.py: raw DEALER clients write every frame
(rigs.FBClient2), raw FBW01 workers (rigs.FBWorker) answer."""

from __future__ import annotations

import random

import pytest

from fastbroker import protocol
from fastbroker.protocol import (
    C_RESULT,
    C_SUBMIT,
    CLIENT_SIGNATURE_V2 as CSIG2,
    DROP_REASONS,
    MAX_BATCH,
    OPT_NO_ACK,
    R_ACCEPTED,
    R_FAILED,
    R_OK,
    R_REJECTED,
    R_TIMED_OUT,
    STATE_RUNNING,
)
from rigs import assert_stats, new_id, peer_gone, reply, status, submit_record

BAD_BATCH = DROP_REASONS[protocol.DROP_CLIENT_BAD_BATCH]
BAD_COMMAND = DROP_REASONS[protocol.DROP_CLIENT_BAD_COMMAND]


def test_one_message_carries_many_requests_and_their_replies_come_batched(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 8)
    client = rig.fbclient2()
    ids = [new_id() for _ in range(3)]
    client.submit((ids[0], [b"a"]), (ids[1], [b"b1", b"b2"]), (ids[2], [b""]))
    # The three ACCEPTED in one REPLIES message (one turn, one client).
    assert rig.records(client, 3) == [(rid, R_ACCEPTED, []) for rid in ids]
    assert client.messages == 1
    tasks = rig.tasks_in(worker, 3)
    assert [payload for _, payload in tasks] == [[b"a"], [b"b1", b"b2"], [b""]]  # in order, frames kept
    for task_id, payload in tasks:
        worker.answer(task_id, b"re:", *payload)
    records = rig.records(client, 3)
    assert sorted(records) == sorted(
        [(ids[0], R_OK, [b"re:", b"a"]), (ids[1], R_OK, [b"re:", b"b1", b"b2"]), (ids[2], R_OK, [b"re:", b""])]
    )
    assert_stats(rig.stats(), requests=3, answered=3, dropped=0, duplicates=0)


def test_each_request_keeps_its_own_options_and_outcome(make_crig):
    rig = make_crig(timeout=60.0)
    worker = rig.dealer()
    rig.register(worker, 8)
    client = rig.fbclient2()
    quiet, short, failing, bad = (new_id() for _ in range(4))
    client.submit(
        (quiet, [b"q"], OPT_NO_ACK),
        (short, [b"s"], 0, 50, 1),  # 50 ms, one try
        (failing, [b"f"], 0, 0, 1),
        (bad, [b"x"], 0x80),  # an unknown flag: REJECTED alone
    )
    records = rig.records(client, 3)
    assert records[:2] == [(short, R_ACCEPTED, []), (failing, R_ACCEPTED, [])]
    assert records[2][:2] == (bad, R_REJECTED) and records[2][2][0] == bytes([protocol.REJECT_BAD_OPTIONS])
    by_payload = {payload[0]: task_id for task_id, payload in rig.tasks_in(worker, 3)}
    worker.failed(by_payload[b"f"])
    worker.answer(by_payload[b"q"], b"done")
    outcomes = {rid: (code, body) for rid, code, body in rig.records(client, 3)}
    assert outcomes[quiet] == (R_OK, [b"done"])
    assert outcomes[failing] == (R_FAILED, [b"ValueError", b"boom"])
    assert outcomes[short] == (R_TIMED_OUT, [])
    assert_stats(rig.stats(), requests=3, rejected=1, answered=1, aborted=2)


@pytest.mark.parametrize(
    "frames",
    [
        [C_SUBMIT, b""],  # no record
        [C_SUBMIT, b"\0" * 26, b"p"],  # not a whole record
        [C_SUBMIT, submit_record(b"i" * 16, 2), b"only one"],  # fewer frames than said
        [C_SUBMIT, submit_record(b"i" * 16, 1), b"one", b"two"],  # more frames than said
        [C_SUBMIT, submit_record(b"i" * 16, 0) + submit_record(b"j" * 16, 1), b"p"],  # a request without payload
        [C_SUBMIT, submit_record(b"i" * 16, 1) * (MAX_BATCH + 1), *[b"p"] * (MAX_BATCH + 1)],  # too many
    ],
)
def test_a_header_that_does_not_match_its_frames_drops_the_whole_message(make_crig, frames):
    rig = make_crig()
    client = rig.fbclient2()
    client.send(CSIG2, *frames)
    rig.pump(lambda: rig.stats()["dropped"] == 1)
    assert rig.stats()["drops"] == {BAD_BATCH: 1}
    assert_stats(rig.stats(), requests=0, queued=0)
    rig.quiet(client)
    assert client.records == [] and client.inbox == []


@pytest.mark.parametrize("frames", [[], [b"\x02", b"x"], [b"\x01\x01", submit_record(b"i" * 16, 1), b"p"]])
def test_an_unknown_command_or_a_bare_signature_is_dropped(make_crig, frames):
    rig = make_crig()
    client = rig.fbclient2()
    client.send(CSIG2, *frames)
    rig.pump(lambda: rig.stats()["dropped"] == 1)
    assert rig.stats()["drops"] == {BAD_COMMAND: 1}


def test_the_good_requests_of_a_batch_run_beside_a_rejected_one_and_a_duplicate_runs_once(make_crig):
    rig = make_crig(max_queue=2)
    worker = rig.dealer()
    client = rig.fbclient2()
    first, second, third = new_id(), new_id(), new_id()
    # The same id twice in one batch: a duplicate, as two SUBMITs would be.
    client.submit((first, [b"1"]), (first, [b"1 again"]), (second, [b"2"]), (third, [b"3"]))
    records = rig.records(client, 4)
    assert [r[:2] for r in records] == [
        (first, R_ACCEPTED),
        (first, R_ACCEPTED),
        (second, R_ACCEPTED),
        (third, R_REJECTED),  # the queue holds 2
    ]
    assert records[3][2][0] == bytes([protocol.REJECT_QUEUE_FULL])
    assert_stats(rig.stats(), requests=2, duplicates=1, rejected=1, queued=2)
    rig.register(worker, 2)
    tasks = rig.tasks_in(worker, 2)
    assert [payload for _, payload in tasks] == [[b"1"], [b"2"]]
    for task_id, _ in tasks:
        worker.answer(task_id, b"ok")
    assert sorted(rig.records(client, 2)) == sorted([(first, R_OK, [b"ok"]), (second, R_OK, [b"ok"])])
    rig.quiet(client)  # one outcome per id for one waiter


def test_fbc01_and_fbc02_waiters_of_one_request_each_get_their_own_protocol(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 1)
    v2 = rig.fbclient2()
    v1 = rig.fbclient()
    rid = new_id()
    v2.submit((rid, [b"job"]))
    assert rig.records(v2, 1) == [(rid, R_ACCEPTED, [])]
    task_id, _ = rig.task(worker)
    v1.command(C_RESULT, rid)  # FBC01 RESULT: a waiter speaking FBC01
    assert rig.reply(v1) == status(rid, STATE_RUNNING, 1, 0)
    v2.command(C_RESULT, rid)  # already a waiter: keeps FBC02; the STATUS is FBC01
    rig.pump(lambda: v2.inbox)
    assert v2.inbox.pop(0) == status(rid, STATE_RUNNING, 1, 0)
    worker.answer(task_id, b"answer")
    assert rig.reply(v1) == reply(R_OK, rid, b"answer")
    assert rig.records(v2, 1) == [(rid, R_OK, [b"answer"])]
    # A kept outcome asked again over FBC02: ACCEPTED and the outcome, in one message.
    messages = v2.messages
    v2.submit((rid, [b"job"]))
    assert rig.records(v2, 2) == [(rid, R_ACCEPTED, []), (rid, R_OK, [b"answer"])]
    assert v2.messages == messages + 1
    assert_stats(rig.stats(), requests=1, answered=1, duplicates=1)


def test_a_reply_batch_never_exceeds_max_batch_records(make_crig):
    rig = make_crig()
    client = rig.fbclient2()
    ids = [new_id() for _ in range(MAX_BATCH + 5)]
    client.submit(*((rid, [b"p"]) for rid in ids[:MAX_BATCH]))
    client.submit(*((rid, [b"p"]) for rid in ids[MAX_BATCH:]))
    records = rig.records(client, len(ids))
    assert [r[0] for r in records] == ids and {r[1] for r in records} == {R_ACCEPTED}
    # MAX_BATCH + 5 ACCEPTEDs cannot fit one message, whether the two SUBMITs are read
    # in one turn or two.
    assert client.messages == 2


def test_replies_to_a_gone_fbc02_client_are_counted(make_crig):
    rig = make_crig()
    worker = rig.dealer()
    rig.register(worker, 2)
    client = rig.fbclient2(identity=b"v2-gone")
    client.submit((new_id(), [b"a"], OPT_NO_ACK), (new_id(), [b"b"], OPT_NO_ACK))
    tasks = rig.tasks_in(worker, 2)
    client.close()
    rig.pump(peer_gone(rig, b"v2-gone", "requests"))
    for task_id, _ in tasks:
        worker.answer(task_id, b"x")
    rig.pump_stat("answered", 2)
    # One REPLIES message per turn: both outcomes in one (counted once) or in two.
    rig.pump(lambda: rig.stats()["replies_unroutable"] >= 1)
    assert rig.stats()["replies_unroutable"] in (1, 2)


def test_the_compiled_books_batches_are_byte_for_byte_the_pure_ones():
    # client/_book.pyx writes the FBC02 SUBMIT header in place; client/protocol.py's
    # submit_batch_messages is the reference: same messages, same splits at MAX_BATCH
    # records and MAX_FRAMES frames.
    from fastbroker.client import _book  # type: ignore[attr-defined]
    from fastbroker.client.protocol import encode_options, submit_batch_messages, submit_message
    from fastbroker.protocol import MAX_BATCH, MAX_FRAMES

    rng = random.Random(7)
    for count, most_frames in ((1, 1), (2, 3), (MAX_BATCH + 5, 1), (1500, 7), (3, MAX_FRAMES - 10)):
        submits = []
        for i in range(count):
            options = rng.choice([b"", encode_options(1.5, 3), encode_options(None, None, ack=False)])
            frames = [b"f%d" % k for k in range(rng.randint(1, most_frames))]
            submits.append(submit_message(i.to_bytes(16, "big"), options, frames))
        expected = submit_batch_messages([(m[2], m[3], m[4:]) for m in submits])
        assert _book.submit_batches(submits) == expected, (count, most_frames)
        # Within the broker's limit, which counts the identity its ROUTER adds.
        assert all(len(m) + 1 <= MAX_FRAMES for m in expected), (count, most_frames)
        if count == MAX_BATCH + 5:
            assert len(expected) == 2  # the split at MAX_BATCH records was compared too
