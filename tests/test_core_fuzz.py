"""Hostile input, bounded: random multipart messages at every endpoint of the live
core, among them valid and broken FBW01 and FBC01 commands, request ids that repeat
and task ids that look real. The
core must survive each batch, serve a well-behaved client and worker afterwards,
and account for every message it took in."""

from __future__ import annotations

import zmq
from hypothesis import HealthCheck, example, given, settings, strategies as st

from fastbroker import protocol
from rigs import EPOCH, Rig

SIGNATURE = protocol.WORKER_SIGNATURE
COMMANDS = [bytes([c]) for c in range(0, 9)] + [bytes([c]) for c in range(0x11, 0x19)]
# A few request ids, so that duplicate SUBMITs, STATUS, RESULT and CANCEL hit live ones.
REQUEST_IDS = [bytes([i]) * protocol.REQUEST_ID_SIZE for i in range(4)]
options = st.one_of(
    st.just(b""),
    st.tuples(st.integers(0, 3), st.integers(0, 200), st.integers(0, 3)).map(
        lambda o: bytes([o[0]]) + o[1].to_bytes(4, "big") + o[2].to_bytes(4, "big")
    ),
    st.binary(max_size=12),
)

frame = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.just(SIGNATURE),
    st.sampled_from(COMMANDS),
    # Task ids of the right size, with the broker's epoch: the slots and
    # generations are random, so some name live requests.
    st.tuples(st.integers(0, 64), st.integers(0, 4)).map(
        lambda sg: EPOCH + sg[0].to_bytes(4, "little") + sg[1].to_bytes(4, "little")
    ),
    st.integers(0, 2**32 - 1).map(lambda c: c.to_bytes(4, "big")),
    st.just(protocol.CLIENT_SIGNATURE),
    st.sampled_from(REQUEST_IDS),
    options,
)
# FBC01 messages as a client's DEALER sends them, well formed or nearly so.
client_message = st.tuples(
    st.sampled_from(
        [
            protocol.C_SUBMIT,
            protocol.C_STATUS,
            protocol.C_RESULT,
            protocol.C_CANCEL,
            protocol.C_DEAD,
            protocol.C_REQUEUE,
            protocol.C_REQUEUE_ALL,
            b"\x09",
        ]
    ),
    st.sampled_from(REQUEST_IDS + [b"short"]),
    st.lists(st.one_of(options, frame), max_size=3),
).map(lambda m: [protocol.CLIENT_SIGNATURE, m[0], m[1]] + m[2])
message = st.one_of(st.lists(frame, min_size=0, max_size=8), client_message)
endpoint = st.sampled_from(["requests", "workers", "answers"])
batch = st.lists(st.tuples(endpoint, message), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batch)
# Found by the fuzz: two fake "ready"s that never answer use up the valid request's tries.
@example(batch=[("workers", [b"", b""]), ("workers", [b"\x00", b"", b""])])
def test_random_messages_never_break_the_core(core, batch):
    ctx = zmq.Context()
    # A short heartbeat, so sessions the fuzz opens also expire; short retention and a
    # small memory bound, so kept outcomes are also forgotten.
    rig = Rig(core, ctx, timeout=0.05, tries=2, heartbeat=0.02, liveness=2, retention=0.02, retention_bytes=600)
    try:
        senders = {
            "requests": rig.client(zmq.DEALER),
            "workers": rig.worker(zmq.DEALER),
            "answers": rig.pusher,
        }
        for where, frames in batch:
            if frames:  # ZeroMQ cannot send an empty multipart message
                senders[where].send_multipart(frames)
        for _ in range(8):
            rig.core.run(-1, 0.005)
        stats = rig.core.stats()
        assert stats["dropped"] == sum(stats["drops"].values())
        assert stats["queued"] + stats["running"] >= 0
        assert 0 <= stats["retained_bytes"] <= 600
        assert stats["retained_bytes"] >= stats["retained"] * protocol.RESULT_OVERHEAD

        # A well-behaved pair is still served; the worker first works off whatever
        # valid requests the batch queued (FIFO), answering each.
        client = rig.client()
        worker = rig.worker()
        client.send(b"valid")
        worker.send(b"ready")
        # Fake "ready"s from the batch may take the valid request's tries (they never
        # answer): its client then gets the empty answer and sends it again. Each
        # fake is used once, so this ends within the batch's size.
        for _ in range(2 * len(batch) + 2):
            rig.pump(lambda: worker.poll(0) or client.poll(0), timeout=10)
            if client.poll(0):
                assert client.recv_multipart() == [b""], "only an abort may come before the answer"
                client.send(b"valid")
                continue
            task = worker.recv_multipart()
            rig.answer(task[0], b"done")
            if task[1:] == [b"valid"]:
                break
            worker.send(b"ready")
        else:
            raise AssertionError("the valid request never reached the worker")
        assert rig.receive(client) == [b"done"]
    finally:
        rig.close()
        ctx.destroy(linger=0)
