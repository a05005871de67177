"""The crash test of issue 5: a broker process with a store is SIGKILLed three times
under load and restarted on the same endpoints with the same store, and nothing is
lost or done twice.

A ``fastbroker.Client`` (lazy pirate every 0.3 s of broker silence, ACCEPTED on)
submits 5,000 requests; two ``fastbroker worker`` DEALER processes (credit 8) echo
them and outlive the brokers. The broker is killed (1) while it is accepting the
submissions (no worker yet), (2) just after the workers have started taking jobs
(jobs in flight, few answers yet), (3) while answers are flowing. After every kill,
every id the client had seen ACCEPTED or answered must be in the store: that is the
store's promise (nothing is acknowledged before it is stored).

At the end: every future resolved with the right answer, each exactly once (future
callbacks), no outcome reached the client's socket twice for one id, and no job ran
more than its 3 tries (the workers' run log)."""

from __future__ import annotations

import collections
import concurrent.futures
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, List, Set

import pytest

from fastbroker import Client
from fastbroker.client.protocol import replies_of
from fastbroker.log_records import read_log as read_store_log
from fastbroker.protocol import LOG_MAGIC, R_ACCEPTED
from rigs import Processes, read_log, wait_until

from workers_for_tests import LOG_ENV

N = 5000
TRIES = 3
WORKERS = 2
CREDIT = 8
WAIT = 20.0
"""Bound of each wait for one step (a broker up, a threshold reached)."""
FINISH_WAIT = 40.0
"""Bound of the wait for every outcome after the last restart."""


class Wire:
    """What reached the client's socket, per id: ACCEPTED and outcome replies.

    Recorded by wrapping the client's RequestBook.on_message (its I/O thread calls it
    for every message received) and decoding each message here as well, each reply of
    an FBC02 REPLIES message too, since futures only ever see one outcome."""

    def __init__(self, client: Client) -> None:
        self.accepted: Set[bytes] = set()
        self.outcomes: Dict[bytes, int] = collections.Counter()
        self.lock = threading.Lock()
        book = client._book
        original = book.on_message

        def on_message(frames):
            with self.lock:
                for reply in replies_of(frames):
                    if reply.kind == R_ACCEPTED:
                        self.accepted.add(reply.request_id)
                    elif reply.is_outcome:
                        self.outcomes[reply.request_id] += 1
            return original(frames)

        book.on_message = on_message  # type: ignore[method-assign]

    def snapshot(self):
        with self.lock:
            return set(self.accepted), set(self.outcomes)


def stored_ids(path: Path) -> Set[bytes]:
    if path.read_bytes().startswith(LOG_MAGIC):
        contents = read_store_log(path.read_bytes())
        return set(contents.requests) | set(contents.outcomes)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {bytes(r[0]) for r in db.execute("SELECT id FROM requests UNION ALL SELECT id FROM outcomes")}
    finally:
        db.close()


@pytest.mark.parametrize("store_format", ["log", "sqlite"])
def test_three_broker_kills_lose_nothing_and_repeat_nothing(procs: Processes, tmp_path, core_name, store_format):
    addrs = [f"ipc://{tmp_path}/{name}" for name in ("req", "wrk", "ans")]
    store = tmp_path / "broker.db"
    log_path = tmp_path / "runs.log"
    brokers: List = []

    def start_broker():
        n = len(brokers) + 1
        proc = procs.start(
            [
                "-v",
                "broker",
                "--core",
                core_name,
                "--store",
                str(store),
                "--store-format",
                store_format,
                "--sync",
                "normal",
                "-T",
                "2",
                "-t",
                str(TRIES),
                "--heartbeat",
                "0.2",
                *addrs,
            ],
            f"broker-{n}",
        )
        wait_until(
            lambda: "broker on " in proc.stderr_path.read_text() or proc.poll() is not None,
            timeout=WAIT,
            message=f"broker {n} to bind",
        )
        assert proc.poll() is None, procs.output()
        brokers.append(proc)
        return proc

    def kill_broker(what: str) -> None:
        proc = brokers[-1]
        proc.kill()
        proc.wait(WAIT)
        accepted, answered = wire.snapshot()
        stored = stored_ids(store)
        missing = (accepted | answered) - stored
        print(
            f"kill {len(brokers)} ({what}): client had {len(accepted)} ACCEPTED, {len(answered)} outcomes; "
            f"store holds {len(stored)} ids"
        )
        assert not missing, f"{len(missing)} acknowledged id(s) not in the store after kill {len(brokers)}"

    start_broker()
    # The whole run in flight at once (no window): the kills must find thousands of
    # requests ACCEPTED and unanswered at the broker, as with many clients.
    client = Client(addrs[0], check_interval=0.3, tries=TRIES, window=N)
    wire = Wire(client)
    futures: List = []
    deliveries: Dict[bytes, int] = collections.Counter()
    count_lock = threading.Lock()

    def delivered(future) -> None:
        with count_lock:
            deliveries[future.request_id] += 1

    def submit_all() -> None:
        # Paced (50 every 5 ms, ~0.5 s at least), so that the first kill lands mid-way.
        for i in range(N):
            future = client.submit(b"c%05d" % i)
            future.add_done_callback(delivered)
            futures.append(future)
            if i % 50 == 49:
                time.sleep(0.005)  # the pacing is the point (see above): no condition to wait for

    submitter = threading.Thread(target=submit_all, name="submitter")
    started_at = time.monotonic()
    try:
        submitter.start()
        # 1. While accepting: no worker yet, submissions still going.
        wait_until(lambda: len(wire.snapshot()[0]) >= 1000, timeout=WAIT, interval=0.002, message="1000 ACCEPTED")
        submitted_at_kill = len(futures)
        kill_broker("accepting")
        assert submitted_at_kill < N, "the submissions were over before the first kill: pace them more"
        start_broker()
        submitter.join(WAIT)
        assert not submitter.is_alive()

        # 2. Jobs in flight: kill as soon as the workers have started a few dozen.
        workers = [
            procs.start(
                [
                    "worker",
                    "workers_for_tests:DealerEcho",
                    addrs[1],
                    "--credit",
                    str(CREDIT),
                    "--heartbeat",
                    "0.2",
                    "--liveness",
                    "3",
                ],
                f"worker-{w}",
                env={LOG_ENV: str(log_path)},
            )
            for w in range(WORKERS)
        ]
        wait_until(
            lambda: sum(1 for e in read_log(log_path) if e.event == "start") >= 40,
            timeout=WAIT,
            message=f"the workers to start jobs\n{procs.output()}",
        )
        kill_broker("jobs in flight")
        start_broker()

        # 3. While answers are flowing.
        wait_until(
            lambda: len(wire.snapshot()[1]) >= N * 6 // 10,
            timeout=WAIT * 2,
            interval=0.005,
            message=f"60% of the outcomes\n{procs.output()}",
        )
        kill_broker("answers flowing")
        start_broker()

        done, not_done = concurrent.futures.wait(futures, timeout=FINISH_WAIT)
        assert not not_done, f"{len(not_done)} request(s) without an outcome\n{procs.output()}"
        elapsed = time.monotonic() - started_at
        for worker in workers:
            assert worker.poll() is None, "a worker died across the broker restarts"
    finally:
        client.close()

    wrong = [i for i, f in enumerate(futures) if f.exception() is not None or f.result() != b"-c%05d" % i]
    runs = collections.Counter(e.payload for e in read_log(log_path) if e.event == "start")
    histogram = collections.Counter(runs[f"c{i:05d}"] for i in range(N))
    duplicates = sum(1 for n in deliveries.values() if n > 1)
    wire_duplicates = sum(1 for n in wire.outcomes.values() if n > 1)
    print(
        f"\n{core_name}: submitted {len(futures)}, answered {sum(1 for f in futures if f.exception() is None)}, "
        f"duplicates {duplicates} (outcomes twice on the wire: {wire_duplicates}), "
        f"runs per job {dict(sorted(histogram.items()))}, {elapsed:.1f} s, "
        f"lazy-pirate re-submits {client._book.resubmitted}"
    )
    assert len(futures) == N
    assert not wrong, (
        f"{len(wrong)} wrong outcome(s), e.g. {[futures[i].exception() or futures[i].result() for i in wrong[:3]]}"
    )
    assert len(deliveries) == N and duplicates == 0
    assert wire_duplicates == 0
    assert max(histogram) <= TRIES, f"a job ran more than {TRIES} times: {histogram}"
    assert histogram[0] == 0, "an answered job never ran"
