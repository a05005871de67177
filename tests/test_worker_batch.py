"""``Worker.process_batch`` (issue 14): a worker whose class defines it runs the jobs it
holds when a thread is free in one call. The test plays the broker (rigs.FakeBroker)
for a real ``Worker`` in a thread, as in test_worker_cancel.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import List

from fastbroker import Worker
from fastbroker.protocol import CMD_ANSWER, CMD_FAILED, CMD_TASK
from rigs import FAKE_WAIT, FakeBroker, tid, wait_until

from workers_for_tests import GATE_DIR_ENV, JOB_LIMIT


class BatchEcho(Worker):
    """process_batch: b"-" + each item; b"boom" fails alone; a batch with b"crash" raises;
    an item b"gate:TAG" waits for the gate file TAG first. Records each batch's items."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: List[List[bytes]] = []

    def process_batch(self, items):
        self.batches.append(list(items))
        for item in items:
            if item.startswith(b"gate:"):
                gate = Path(os.environ[GATE_DIR_ENV]) / item[5:].decode()
                deadline = time.monotonic() + JOB_LIMIT
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.005)  # the pace of a bounded wait for a file the test creates
        if b"crash" in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError("bad item") if item == b"boom" else b"-" + item for item in items]


def test_process_batch_gets_the_jobs_waiting_and_reports_each_one(ctx, job_env):
    _, open_gate = job_env
    broker = FakeBroker(ctx)
    worker = BatchEcho(ctx, broker.address, credit=1, prefetch=3, heartbeat=1.0, liveness=20)
    worker.stop_grace = 0.01
    plain = Worker(ctx, broker.address)
    assert worker.batched and not plain.batched
    plain.close()
    thread = threading.Thread(target=worker.run, name="batch-worker", daemon=True)
    thread.start()
    try:
        broker.expect_ready(4)
        broker.send(CMD_TASK, tid(0), b"gate:first")
        wait_until(lambda: worker.batches == [[b"gate:first"]], timeout=FAKE_WAIT, message="the first batch")
        for n, item in ((1, b"a"), (2, b"boom"), (3, b"b")):
            broker.send(CMD_TASK, tid(n), item)
        wait_until(lambda: worker.stats.received == 4, timeout=FAKE_WAIT, message="three jobs held")
        open_gate("first")
        # Sorted by task id: an FBW02 worker sends the answers of one turn in one ANSWER
        # and each FAILED on its own, so their order on the wire may differ.
        replies = sorted((broker.recv() for _ in range(4)), key=lambda reply: reply[1])
        assert replies == [
            [CMD_ANSWER, tid(0), b"-gate:first"],
            [CMD_ANSWER, tid(1), b"-a"],
            [CMD_FAILED, tid(2), b"ValueError", b"bad item"],
            [CMD_ANSWER, tid(3), b"-b"],
        ]
        assert worker.batches == [[b"gate:first"], [b"a", b"boom", b"b"]]  # the three held ones, in one call
        broker.send(CMD_TASK, tid(4), b"crash")
        assert broker.recv() == [CMD_FAILED, tid(4), b"RuntimeError", b"the whole batch failed"]
        assert (worker.stats.answered, worker.stats.failed) == (3, 2)
    finally:
        open_gate("first")
        worker.stop()
        thread.join(FAKE_WAIT)
        worker.close()
