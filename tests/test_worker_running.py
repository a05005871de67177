"""worker/running.py: a job's outcome from what the user's code returns or raises. Both
sessions call ``process`` themselves when ``process_multipart`` is the default one
(``direct_process``); the outcome must be the one the default method gives, whatever
``process`` returns or raises."""

from __future__ import annotations

import functools
import logging
from typing import Any, List

import pytest

from fastbroker import Worker
from fastbroker.worker.running import direct_process, run_one

TASK = b"t" * 16


class _NotCancelled:
    """What run_one asks of a session when a job raised: whether it was cancelled."""

    def job_cancelled(self, number: int, task_id: bytes) -> bool:
        return False


class Returns(Worker):
    """process() returns what the payload names."""

    def process(self, data: Any) -> Any:
        kind = bytes(data)
        if kind == b"bytes":
            return b"answer"
        if kind == b"empty":
            return b""
        if kind == b"bytearray":
            return bytearray(b"ba")
        if kind == b"view":
            return memoryview(b"mv")
        if kind == b"text":
            return "text"
        if kind == b"none":
            return None
        if kind == b"raise":
            raise KeyError("boom")
        return kind  # the frames joined


class Multipart(Worker):
    def process_multipart(self, frames: List[bytes]) -> List[bytes]:
        return [b"multi", *frames]


_made: List[Worker] = []


def _worker(cls: type) -> Worker:
    worker = cls(None, "tcp://127.0.0.1:1")  # never run: only its job methods are called
    _made.append(worker)
    return worker


@pytest.fixture(autouse=True)
def _close_workers():
    yield
    while _made:
        _made.pop().close()


PAYLOADS = [[b"bytes"], [b"empty"], [b"bytearray"], [b"view"], [b"text"], [b"none"], [b"raise"], [b"by", b"tes"]]


@pytest.mark.parametrize("payload", PAYLOADS, ids=[b"+".join(p).decode() for p in PAYLOADS])
def test_calling_process_directly_gives_the_default_methods_outcome(payload, caplog):
    worker = _worker(Returns)
    process = direct_process(worker)
    assert process is not None
    with caplog.at_level(logging.INFO, logger="fastbroker.worker"):
        through_default = run_one(worker, TASK, payload, _NotCancelled(), 0)
        default_logs = [r.getMessage() for r in caplog.records]
        caplog.clear()
        direct = run_one(worker, TASK, payload, _NotCancelled(), 0, process)
        direct_logs = [r.getMessage() for r in caplog.records]
    assert direct == through_default
    assert direct_logs == default_logs
    answer, error = direct
    assert (answer is None) != (error is None)
    if answer is not None:
        assert all(type(frame) is bytes for frame in answer)


def test_a_worker_with_its_own_process_multipart_is_not_called_directly():
    assert direct_process(_worker(Multipart)) is None
    worker = _worker(Returns)
    worker.process_multipart = lambda frames: [b"mine"]  # type: ignore[method-assign]
    assert direct_process(worker) is None
    assert run_one(worker, TASK, [b"x"], _NotCancelled(), 0) == ([b"mine"], None)


def test_process_is_given_a_lone_frame_as_it_came():
    seen = []

    class Sees(Worker):
        def process(self, data: Any) -> bytes:
            seen.append(data)
            return b"ok"

    worker = _worker(Sees)
    view = memoryview(b"lent")
    assert run_one(worker, TASK, [view], _NotCancelled(), 0, direct_process(worker)) == ([b"ok"], None)
    assert seen == [view] and seen[0] is view


def test_a_wrapper_of_the_default_process_multipart_is_called():
    """functools.wraps copies a function's attributes: the default one is known by
    identity, so a wrapper (tracing, metrics) still runs."""
    calls = []

    def traced(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Any, frames: List[bytes]) -> Any:
            calls.append(frames)
            return method(self, frames)

        return wrapper

    class Traced(Returns):
        process_multipart = traced(Worker.process_multipart)

    worker = _worker(Traced)
    assert direct_process(worker) is None
    assert run_one(worker, TASK, [b"bytes"], _NotCancelled(), 0, direct_process(worker)) == ([b"answer"], None)
    assert calls == [[b"bytes"]]
