"""Large payloads and answers through a ``fastbroker.Worker`` subclass (issue 15 part 4):
the worker process's CPU per job with and without the copies the compiled session saves.

    pytest bench/test_zero_copy.py --benchmark-only --benchmark-group-by=group

``Client.map`` in this process sends FASTBROKER_ZC_N [300] jobs per round
(FASTBROKER_BENCH_ROUNDS [5]) through a broker process (compiled core) to one worker
process (``--credit 4``), over ipc. Rows, each in its own worker process:

- ``payload-in``: 1 MiB payloads, 8-byte answers (the job reads its payload: a checksum of
  every 4096th byte). ``-views`` sets ``Worker.zero_copy_min`` (64 KiB): the payload reaches
  the job as a memoryview of the received message instead of a ``bytes`` copy.
- ``answer-out``: 16-byte payloads, 1 MiB answers (one ``bytes`` object, returned by every
  job). The compiled session sends it without a copy; the pure session (pyzmq) copies it.

extra_info: jobs/s, and the CPU per job of the worker and broker processes over every
round (warm-up included). Ratios between rows of one run are the figures to read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Dict, Iterator, List, Optional

import pytest

from fastbroker import Client, Worker

from bench import e2e
from bench.conftest import SIZES, WAIT_LIMIT, _env_int

ZC_N = _env_int("FASTBROKER_ZC_N", 300)
MIB = 1 << 20
BIG_ANSWER = b"a" * MIB


class ReadsPayload(Worker):
    """Reads its payload (one byte in 4096, as a checksum) and answers 8 bytes."""

    def process(self, data: bytes) -> bytes:
        return sum(data[::4096]).to_bytes(8, "big")


class ReadsPayloadViews(ReadsPayload):
    zero_copy_min = 65536


class AnswersBig(Worker):
    """Answers every job with the same 1 MiB object."""

    def process(self, data: bytes) -> bytes:
        return BIG_ANSWER


class Processes:
    """A broker process and, for each row, a worker process of its own."""

    def __init__(self, run: e2e.Run) -> None:
        self.run = run
        self.address, self.work, self.answers = (f"ipc://{run.dir}/{name}" for name in ("req", "wrk", "ans"))
        deadline = time.monotonic() + WAIT_LIMIT
        argv = ["-m", "fastbroker", "-v", "broker", "--core", "compiled", self.address, self.work, self.answers]
        self.broker = run.start(argv, "broker")
        run.wait_for_broker(self.broker, "zero-copy", "compiled", deadline)
        self.worker: Optional[subprocess.Popen] = None

    def use(self, cls: str, session: str) -> int:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(WAIT_LIMIT)
        argv = ["-m", "fastbroker", "worker", f"bench.test_zero_copy:{cls}", self.work, "--credit", "4"]
        self.worker = self.run.start(
            argv, f"worker-{cls}-{session}", env={"FASTBROKER_PURE": "1" if session == "pure" else ""}
        )
        return self.worker.pid


@pytest.fixture(scope="module")
def processes() -> Iterator[Processes]:
    with e2e.temporary_run(argparse.Namespace(transport="ipc"), prefix="fb-zc-") as run:
        yield Processes(run)


# (name, worker class, session, payload size, answer expected)
ROWS = [
    ("payload-in-compiled", "ReadsPayload", "compiled", MIB),
    ("payload-in-compiled-views", "ReadsPayloadViews", "compiled", MIB),
    ("payload-in-pure", "ReadsPayload", "pure", MIB),
    ("payload-in-pure-views", "ReadsPayloadViews", "pure", MIB),
    ("answer-out-compiled", "AnswersBig", "compiled", 16),
    ("answer-out-pure", "AnswersBig", "pure", 16),
]


@pytest.mark.parametrize("name, cls, session, size", ROWS, ids=[row[0] for row in ROWS])
def test_large_frames(benchmark, processes: Processes, name: str, cls: str, session: str, size: int) -> None:
    benchmark.group = "zero-copy"
    payloads = [os.urandom(16) * (size // 16) for _ in range(ZC_N)]
    expected = [sum(p[::4096]).to_bytes(8, "big") for p in payloads] if size == MIB else [BIG_ANSWER] * ZC_N
    worker_pid = processes.use(cls, session)
    walls: List[float] = []
    with Client(processes.address) as client:
        assert client.call(payloads[0], wait=WAIT_LIMIT) == expected[0]  # the worker is up
        pids = {"worker": worker_pid, "broker": processes.broker.pid}
        start_cpu: Dict[str, float] = {key: e2e.cpu_seconds(pid) for key, pid in pids.items()}

        def one_round() -> None:
            start = time.perf_counter()
            answers = list(client.map(payloads))
            walls.append(time.perf_counter() - start)
            assert answers == expected

        benchmark.pedantic(one_round, rounds=SIZES.socket_rounds, iterations=1, warmup_rounds=1)
        jobs = ZC_N * (SIZES.socket_rounds + 1)
        cpu = {key: round((e2e.cpu_seconds(pid) - start_cpu[key]) / jobs * 1e6, 1) for key, pid in pids.items()}
    rate = ZC_N / sorted(walls)[len(walls) // 2]
    benchmark.extra_info.update(jobs=ZC_N, jobs_per_s=round(rate), cpu_us_per_job=cpu)
