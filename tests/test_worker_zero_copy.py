"""Payloads and answers without a copy (issue 15 part 4), on the session under test
(compiled, or pure under FASTBROKER_PURE=1), in both worker protocols: the test plays
the broker (rigs.FakeBroker) for a real Worker in a thread.

- ``Worker.zero_copy_min``: payload frames of at least that many bytes reach the job as
  read-only memoryviews of the received message, smaller ones as bytes; unset, bytes
  always; ``process()`` gets a lone frame as it came.
- Answers of ``ANSWER_ZERO_COPY_MIN`` bytes or more are sent from the job's own object
  (compiled session): every answer arrives whole, and once the worker has stopped the
  object's reference count is back where it was (none kept, none dropped twice).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import pytest

from fastbroker import Worker, _select
from fastbroker.protocol import CMD_ANSWER, CMD_TASK
from fastbroker.worker.running import ANSWER_ZERO_COPY_MIN
from rigs import FAKE_WAIT, FakeBroker, tid, wait_until

BIG_ANSWER = b"A" * (4 * ANSWER_ZERO_COPY_MIN)
"""One object, answered many times."""


class Recorder(Worker):
    """Records the type and size of every payload frame; answers a payload starting with
    b"big!" with BIG_ANSWER, any other with a copy of its frames."""

    seen: List[List[Tuple[str, int]]]

    def process_multipart(self, frames):
        self.seen.append([(type(frame).__name__, len(frame)) for frame in frames])
        if bytes(frames[0][:4]) == b"big!":
            return [BIG_ANSWER]
        return [bytes(frame) for frame in frames]


class SingleFrame(Worker):
    """process() only: records what type its payload has."""

    seen: List[str]

    def process(self, data):
        self.seen.append(type(data).__name__)
        return bytes(data)


@contextmanager
def _serve(ctx, cls, protocol, views) -> Iterator[Tuple[FakeBroker, Worker]]:
    broker = FakeBroker(ctx, protocol)
    worker = cls(ctx, broker.address, credit=1, heartbeat=1.0, liveness=20, protocol=protocol)
    worker.zero_copy_min = views
    worker.seen = []
    thread = threading.Thread(target=worker.run, name="zero-copy-worker", daemon=True)
    thread.start()
    try:
        broker.expect_ready(1)
        yield broker, worker
    finally:
        worker.stop()
        thread.join(FAKE_WAIT)
        assert not thread.is_alive(), "the worker did not stop"
        worker.close()


@pytest.fixture(params=[2, 1], ids=["fbw02", "fbw01"])
def protocol(request):
    return request.param


def test_large_payload_frames_arrive_as_views(ctx, protocol):
    small, large = b"s" * 100, bytes(range(256)) * 32  # 8 KiB
    with _serve(ctx, Recorder, protocol, 4096) as (broker, worker):
        broker.send(CMD_TASK, tid(1), small, large)
        assert broker.recv() == [CMD_ANSWER, tid(1), small, large]
        broker.send(CMD_TASK, tid(2), large)
        assert broker.recv() == [CMD_ANSWER, tid(2), large]
        assert worker.seen == [[("bytes", 100), ("memoryview", 8192)], [("memoryview", 8192)]]


def test_payloads_are_bytes_by_default(ctx, protocol):
    large = b"L" * 100_000
    with _serve(ctx, Recorder, protocol, None) as (broker, worker):
        broker.send(CMD_TASK, tid(1), large, b"x")
        assert broker.recv() == [CMD_ANSWER, tid(1), large, b"x"]
        assert worker.seen == [[("bytes", 100_000), ("bytes", 1)]]


def test_process_gets_a_lone_frame_as_it_came(ctx, protocol):
    large = b"P" * 10_000
    with _serve(ctx, SingleFrame, protocol, 1000) as (broker, worker):
        broker.send(CMD_TASK, tid(1), large)
        assert broker.recv() == [CMD_ANSWER, tid(1), large]
        broker.send(CMD_TASK, tid(2), b"small", b"parts")  # joined: bytes
        assert broker.recv() == [CMD_ANSWER, tid(2), b"smallparts"]
        assert worker.seen == ["memoryview", "bytes"]


def test_large_answers_sent_whole_and_released(ctx, protocol):
    sessions, _ = _select.worker_session()
    before = sys.getrefcount(BIG_ANSWER)
    with _serve(ctx, Recorder, protocol, None) as (broker, _worker):
        for n in range(20):
            broker.send(CMD_TASK, tid(n), b"big!%d" % n)
            assert broker.recv() == [CMD_ANSWER, tid(n), BIG_ANSWER]

    def settled() -> bool:
        sessions.drop_released_answers()
        return sys.getrefcount(BIG_ANSWER) == before

    wait_until(settled, timeout=FAKE_WAIT, message=f"BIG_ANSWER's references back to {before}")
