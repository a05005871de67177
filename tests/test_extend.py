"""EXTEND (docs/PROTOCOL.md 4.13, issue 18 part 5): a worker tells the broker that a
running job is alive and the attempt's deadline moves; bounded by the broker's
max_extend; a job that stops extending times out as before. On the live core with raw
FBW01 workers (rigs.WRig), then a real ``Worker`` whose job calls ``self.extend``."""

from __future__ import annotations

import time

import pytest

from fastbroker import Worker, protocol
from fastbroker.protocol import CMD_DISCONNECT, CMD_EXTEND, DROP_REASONS
from rigs import BrokerRig, assert_stats

TIMEOUT = 0.2  # the broker's attempt timeout in these tests
UNKNOWN_TASK = DROP_REASONS[protocol.DROP_ANSWER_UNKNOWN]
BAD_FRAMES = DROP_REASONS[protocol.DROP_WORKER_BAD_FRAMES]


def ms(seconds: float) -> bytes:
    return round(seconds * 1000).to_bytes(4, "big")


def test_extend_moves_the_deadline_and_a_job_that_stops_extending_times_out(make_wrig):
    rig = make_wrig(TIMEOUT, 1)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"long job")
    task_id, _ = rig.task(worker)
    worker.command(CMD_EXTEND, task_id, ms(30))
    rig.pump_stat("extended", 1)
    # Well past the attempt's own timeout: still running, its deadline is 30 s away.
    rig.pump_for(3 * TIMEOUT)
    assert_stats(rig.stats(), timeouts=0, running=1)
    # An EXTEND of 1 ms: the deadline is now, and the attempt times out as any other.
    worker.command(CMD_EXTEND, task_id, ms(0.001))
    rig.pump_stat("timeouts", 1)
    assert rig.receive(client) == [b""]  # one try: the client gets the empty answer
    assert_stats(rig.stats(), extended=2, aborted=1)


def test_extend_is_capped_by_max_extend(make_wrig):
    rig = make_wrig(TIMEOUT, 1, max_extend=0.3)
    assert rig.core.max_extend == 0.3
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.client()
    client.send(b"job")
    task_id, _ = rig.task(worker)
    worker.command(CMD_EXTEND, task_id, ms(3600))
    rig.pump_stat("timeouts", 1)  # within 0.3 s, not an hour
    assert_stats(rig.stats(), extended=1)


def test_extend_of_a_job_not_running_here_or_malformed_is_dropped(make_wrig):
    rig = make_wrig(TIMEOUT, 1)
    worker, other = rig.dealer(), rig.dealer()
    rig.register(worker, 1)
    rig.register(other, 1)
    rig.client().send(b"job")
    rig.pump(lambda: worker.inbox or other.inbox)
    holder, idle = (worker, other) if worker.inbox else (other, worker)
    task_id, _ = rig.task(holder)
    idle.command(CMD_EXTEND, task_id, ms(10))  # another worker's job
    idle.command(CMD_EXTEND, b"\0" * 16, ms(10))  # no such task
    idle.command(CMD_EXTEND, task_id)  # no milliseconds
    idle.command(CMD_EXTEND, task_id, b"\0\0\1")  # 3 bytes
    rig.pump(lambda: rig.stats()["dropped"] == 4)
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 2, BAD_FRAMES: 2}
    assert_stats(rig.stats(), extended=0)


def test_extend_from_an_unknown_worker_gets_disconnect(make_wrig):
    rig = make_wrig(TIMEOUT, 1)
    stranger = rig.dealer(live=False)  # never registered
    stranger.command(CMD_EXTEND, b"\0" * 16, ms(10))
    rig.pump(lambda: stranger.inbox)
    assert stranger.inbox.pop(0)[2] == CMD_DISCONNECT
    assert rig.stats()["drops"] == {UNKNOWN_TASK: 1}


class Extending(Worker):
    """A job of STEPS steps of STEP seconds each, calling extend() before each."""

    STEPS, STEP = 6, 0.1

    def process(self, data: bytes) -> bytes:
        for _ in range(self.STEPS):
            self.extend(1.0)
            time.sleep(self.STEP)  # the job's work (the broker's timeout is shorter than it all)
        return b"done:" + data


def test_a_worker_job_that_extends_outlives_the_timeout(tmp_path, gate):
    rig = BrokerRig(tmp_path)
    try:
        rig.start_broker(timeout=0.3, tries=1)
        rig.worker(Extending)
        client = rig.client()
        # 0.6 s of work against a 0.3 s timeout and one try: only EXTEND lets it finish.
        assert client.call(b"job", wait=10) == b"done:job"
        outside = Extending(None, rig.addrs[1])
        with pytest.raises(Worker.Error, match="extend"):
            outside.extend(1.0)  # not in a job's thread
        outside.close()
    finally:
        gate.touch()
        rig.close()
