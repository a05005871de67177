"""Hostile input, bounded: random multipart messages at every endpoint of the live
core, among them valid and broken FBW01 commands and task ids that look real. The
core must survive each batch, serve a well-behaved client and worker afterwards,
and account for every message it took in."""

from __future__ import annotations

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbroker import _common
from test_core_loop import EPOCH, Rig

SIGNATURE = _common.WORKER_SIGNATURE
COMMANDS = [bytes([c]) for c in range(0, 9)]

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
)
message = st.lists(frame, min_size=0, max_size=8)
endpoint = st.sampled_from(["requests", "workers", "answers"])
batch = st.lists(st.tuples(endpoint, message), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batch)
def test_random_messages_never_break_the_core(core, batch):
    ctx = zmq.Context()
    rig = Rig(core, ctx, timeout=0.05, tries=2)
    # Rebuilt with a short heartbeat so sessions the fuzz opens also expire.
    rig.core.close()
    rig.core = core.BrokerCore(rig.requests, rig.workers, rig.answers, 0.05, 2, heartbeat=0.02, liveness=2, epoch=EPOCH)
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

        # A well-behaved pair is still served; the worker first works off whatever
        # valid requests the batch queued (FIFO), answering each.
        client = rig.client()
        worker = rig.worker()
        client.send(b"valid")
        for _ in range(len(batch) + 2):
            worker.send(b"ready")
            rig.pump(lambda: worker.poll(0), timeout=10)
            task = worker.recv_multipart()
            rig.answer(task[0], b"done")
            if task[1:] == [b"valid"]:
                break
        else:
            raise AssertionError("the valid request never reached the worker")
        assert rig.receive(client) == [b"done"]
    finally:
        rig.close()
        ctx.destroy(linger=0)
