"""fastbroker.Worker told DISCONNECT registers again on the same socket.

The test plays the broker with a raw ROUTER (rigs.FakeBroker, the `fake` fixture),
which fails a test if the worker ever shows up with another identity (a new socket).
The race this guards against was seen after a broker restart: a worker still
finishing the old broker's jobs sent ANSWERs (the new broker, not knowing it, said
DISCONNECT to each), then READY (which registered it and got it a TASK); a worker
that then dropped its socket for the DISCONNECT lost that TASK.
"""

from __future__ import annotations

from fastbroker.protocol import CMD_ANSWER, CMD_DISCONNECT, CMD_READY, CMD_TASK
from rigs import FAKE_WAIT as WAIT, count_events, tid, wait_until


def test_a_task_right_behind_a_disconnect_is_served_on_the_same_socket(fake):
    broker, worker = fake
    broker.send(CMD_DISCONNECT)
    broker.send(CMD_TASK, tid(1), b"echo:behind")
    got = [broker.recv(), broker.recv()]
    assert sorted(got) == sorted([[CMD_READY, (1).to_bytes(4, "big")], [CMD_ANSWER, tid(1), b"-echo:behind"]])
    assert (worker.stats.disconnects, worker.stats.reconnects) == (1, 0)


def test_a_job_in_hand_at_a_disconnect_is_an_orphan_for_the_credit(fake, job_env):
    broker, worker = fake
    log, open_gate = job_env
    broker.send(CMD_TASK, tid(1), b"gate:held")
    wait_until(lambda: count_events(log, "start", "gate:held"), WAIT, message="the gated job to start")
    broker.send(CMD_DISCONNECT)
    # The broker forgot the registration and so this job: the credit it still takes
    # is not offered again until it is done.
    assert broker.recv() == [CMD_READY, (0).to_bytes(4, "big")]
    open_gate("held")
    # Its answer is still sent (the broker takes an answer from anyone for a live job).
    assert broker.recv() == [CMD_ANSWER, tid(1), b"-gate:held"]
    assert broker.recv() == [CMD_READY, (1).to_bytes(4, "big")]
    broker.send(CMD_TASK, tid(2), b"echo:next")
    assert broker.recv() == [CMD_ANSWER, tid(2), b"-echo:next"]
    assert worker.stats.reconnects == 0
