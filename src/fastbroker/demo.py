"""``fastbroker demo``: a broker, workers that drop or fail jobs and clients, with a report.

Half the workers (rounded up) are ``ReqWorker``s, on the original REQ/PUSH
protocol, that drop a share of their jobs as the original article's test worker
did: those attempts time out and the jobs are re-sent. The others are DEALER
``Worker``s that raise on a share of their jobs: they report FAILED and the
broker retries the job at once. After the last try a client gets the empty
answer that tells it its request was aborted.

Then a ``Client`` (the FBC01 protocol) shows what the original lacked: its own
request ids, per-request timeout and tries, explicit outcomes (a worker's error
text, "timed out"), a status query and cancellation.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import random
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

from fastbroker.client.outcomes import TaskCancelled, TaskFailed, TaskTimedOut
from fastbroker.client.sync import Client, ReqClient, TaskAborted
from fastbroker.server.broker import Broker
from fastbroker.signals import install_stop_handlers
from fastbroker.worker.base import ReqWorker, Worker, WorkerBase

CLIENT_THREADS = 4
DEMO_HEARTBEAT = 0.5
"""Seconds between heartbeats, the same on both sides: a worker takes the broker
for gone after 3 silent intervals of its own."""


class _Flaky(WorkerBase):
    """Answers b"-" + data after a short pause, except for a share of its jobs (a mixin
    before ReqWorker or Worker)."""

    class Dropped(Exception):
        pass

    name = "worker"
    what = "dropped"

    def setup(self, drop_rate: float, seed: int, name: str) -> None:
        self.drop_rate = drop_rate
        self.name = name
        self._random = random.Random(seed)

    def process(self, data: bytes) -> bytes:
        if data.startswith(b"slow"):
            # Long enough to time out; a DEALER worker stops early when cancelled.
            for _ in range(40):
                if self.cancelled():
                    print(
                        f"  {self.name}: {data.decode(errors='replace')} cancelled by its client, stopping", flush=True
                    )
                    return b""
                time.sleep(0.025)
            return b"-" + data
        if data.startswith(b"broken"):
            print(f"  {self.name}: {self.what} {data.decode(errors='replace')}", flush=True)
            raise _Flaky.Dropped("this job always fails")
        time.sleep(self._random.uniform(0.005, 0.03))
        # Only the REQ clients' jobs are dropped at random; the Client part is scripted.
        if data.startswith(b"job-") and self._random.random() < self.drop_rate:
            print(f"  {self.name}: {self.what} {data.decode(errors='replace')}", flush=True)
            raise _Flaky.Dropped()
        return b"-" + data


class DroppingWorker(_Flaky, ReqWorker):
    """REQ/PUSH: a job that raises gets no answer; the broker re-sends it after its timeout."""

    what = "dropped (times out)"

    def __init__(
        self,
        context: Any,
        requests_addr: str,
        replies_addr: str,
        drop_rate: float = 0.0,
        seed: int = 0,
        name: str = "worker",
    ) -> None:
        ReqWorker.__init__(self, context, requests_addr, replies_addr)
        self.setup(drop_rate, seed, name)


class FailingWorker(_Flaky, Worker):
    """DEALER: a job that raises is reported FAILED; the broker retries it at once."""

    what = "failed (FAILED: retried at once)"

    def __init__(
        self,
        context: Any,
        requests_addr: str,
        replies_addr: Optional[str] = None,
        drop_rate: float = 0.0,
        seed: int = 0,
        name: str = "worker",
    ) -> None:
        Worker.__init__(self, context, requests_addr, replies_addr, heartbeat=DEMO_HEARTBEAT)
        self.setup(drop_rate, seed, name)


def _worker_main(dealer: bool, requests_addr: str, answers_addr: str, drop_rate: float, seed: int, name: str) -> None:
    # A dropped job is the point of the demo, not an error worth a traceback.
    logging.getLogger("fastbroker.worker").setLevel(logging.CRITICAL)
    cls = FailingWorker if dealer else DroppingWorker
    worker = cls(None, requests_addr, answers_addr, drop_rate, seed, name)
    install_stop_handlers(worker.stop)  # SIGTERM: finish the jobs in hand, then leave
    try:
        worker.run()
    finally:
        worker.close()


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run_demo(
    jobs: int = 24,
    workers: int = 3,
    drop_rate: float = 0.4,
    timeout: float = 0.3,
    tries: int = 3,
    core: Optional[str] = None,
    seed: int = 2010,
) -> int:
    """Run the demo, print what happened, return 0 if every request got one outcome."""
    with tempfile.TemporaryDirectory(prefix="fastbroker-demo-") as tmp:
        addrs = [f"ipc://{os.path.join(tmp, name)}" for name in ("requests", "workers", "answers")]
        broker = Broker(None, timeout, tries, *addrs, core=core, heartbeat=DEMO_HEARTBEAT)
        req_workers = (workers + 1) // 2
        print(
            f"fastbroker demo: {broker.core_name} core, {_n(req_workers, 'REQ worker')} dropping and "
            f"{_n(workers - req_workers, 'DEALER worker')} failing {drop_rate:.0%} of jobs, "
            f"attempt timeout {timeout} s, {tries} tries, {jobs} requests",
            flush=True,
        )
        broker_thread = threading.Thread(target=broker.run, name="broker")
        broker_thread.start()
        mp = multiprocessing.get_context("fork")
        procs = [
            mp.Process(
                target=_worker_main,
                args=(
                    i >= req_workers,
                    addrs[1],
                    addrs[2],
                    drop_rate,
                    seed + i,
                    f"worker {i + 1} ({'DEALER' if i >= req_workers else 'REQ'})",
                ),
            )
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        outcomes: Dict[str, str] = {}
        lock = threading.Lock()
        payloads = [f"job-{n:02d}" for n in range(jobs)]
        wait = timeout * tries + 10.0

        def client(share: List[str]) -> None:
            with ReqClient(addrs[0], timeout=wait) as c:
                for payload in share:
                    try:
                        answer = c.request(payload.encode())
                        line, outcome = f"client: {payload} -> {answer.decode()}", "answered"
                        if answer != b"-" + payload.encode():
                            outcome = "wrong"
                    except TaskAborted:
                        line, outcome = f"client: {payload} -> ABORTED after {tries} tries (empty answer)", "aborted"
                    except TimeoutError:
                        line, outcome = f"client: {payload} -> no answer within {wait} s", "lost"
                    with lock:
                        outcomes[payload] = outcome
                        print(line, flush=True)

        threads = [threading.Thread(target=client, args=(payloads[i::CLIENT_THREADS],)) for i in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client_ok = _client_phase(addrs[0], timeout)
        for p in procs:
            p.terminate()  # SIGTERM: each worker finishes its jobs in hand and exits
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        broker.stop()
        broker_thread.join()
        stats = broker.stats()
        broker.close()

    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("answered", "aborted", "wrong", "lost")}
    print(
        f"summary (REQ clients): {jobs} requests: {counts['answered']} answered, {counts['aborted']} aborted"
        + (f", {counts['wrong']} WRONG" if counts["wrong"] else "")
        + (f", {counts['lost']} LOST" if counts["lost"] else "")
    )
    print(
        f"broker: {stats['dispatched']} attempts sent, {stats['timeouts']} timed out, "
        f"{stats.get('failed', 0)} failed, {stats['retried']} put back in the queue for another try, "
        f"{stats['aborted']} aborted, {stats['late_answers']} answered late"
    )
    ok = counts["answered"] + counts["aborted"] == jobs and not counts["wrong"] and client_ok
    return 0 if ok else 1


def _client_phase(address: str, timeout: float) -> bool:
    """Requests through fastbroker.Client; True if each got exactly one outcome."""
    print("FBC01 client: its own request ids, per-request timeout and tries, explicit outcomes", flush=True)
    wait = 30.0
    with Client(address) as client:
        jobs = {
            "hello": client.submit(b"hello"),
            "broken (2 tries)": client.submit(b"broken", tries=2),
            # One try: with a retry, the first attempt's late answer could still win.
            "slow (0.2 s timeout, 1 try)": client.submit(b"slow", timeout=0.2, tries=1),
        }
        cancelled = client.submit(b"slow-cancel-me", timeout=5.0, tries=1)
        jobs["slow, cancelled"] = cancelled
        # Cancel it once it runs, so a DEALER worker running it sees cancelled().
        deadline = time.monotonic() + 5.0
        status = client.status(cancelled.request_id)
        while status.state == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
            status = client.status(cancelled.request_id)
        print(f"client: status of {cancelled.request_id.hex()}: {status.describe()}; cancelling it", flush=True)
        cancelled.cancel()
        outcomes = 0
        for name, future in jobs.items():
            try:
                answer = future.result(wait)
                line = f"OK {answer.decode(errors='replace')}"
            except TaskFailed as exc:
                line = f"FAILED: {exc.type_name}: {exc.message}"
            except TaskTimedOut:
                # "broken" too, when both tries went to REQ workers: they cannot report errors.
                line = "TIMED_OUT (no try answered in time)"
            except (TaskCancelled, concurrent.futures.CancelledError):
                line = "CANCELLED"
            except TimeoutError:
                line = f"no outcome within {wait} s"
                outcomes -= 1
            outcomes += 1
            print(f"client: {name} -> {line}", flush=True)
        answers = list(client.map((f"map-{n}".encode() for n in range(8)), window=4))
        print(
            f"client: map over 8 jobs, 4 in flight at most -> {len(answers)} answers in order: "
            f"{answers[0].decode()} ... {answers[-1].decode()}",
            flush=True,
        )
    return outcomes == len(jobs) and len(answers) == 8
