"""NATS JetStream as a work queue, with nats-py: the peer's client side (``NatsPeer``, in
this process) and its worker (``python -m bench.peers.nats_peer URL BATCH PARENT_PID``).

* Jobs: a stream ``PEERS`` on subjects ``peers.jobs.*`` with WorkQueue retention (a
  message is removed once acked) and JetStream's default file storage (in the server's
  ``-sd`` directory), and one durable pull consumer ``workers`` with explicit acks, which
  every worker process binds to: each job goes to one of them.
* The client publishes each job to ``peers.jobs.<client id>`` with ``js.publish`` (it
  waits for the stream's PubAck: the job is stored before the next one goes).
* A worker ``fetch``es, publishes the payload back on core NATS to
  ``peers.results.<client id>`` (the subject names the client), then acks the job.
* Results: core NATS, not a second stream: the client subscribes to its results
  subject before it publishes, as with request-reply; a result stream would add a
  stored write and an ack per job, and the client would need a consumer of its own.
  Results come back in any order: the client sorts them (the payloads are all different).

Tuned row: the client pipelines its publishes (``js.publish_async``, at most nats-py's
default 4000 awaiting their PubAck; default: one ``js.publish`` at a time, a round trip
to the server per job) and each worker fetches up to 64 jobs per pull request
(``fetch(64)``; default ``fetch()``: 1, a pull request per job).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from typing import List, Optional

from bench import e2e
from bench.peers import common

STREAM = "PEERS"
CONSUMER = "workers"
JOBS = "peers.jobs."
RESULTS = "peers.results."
TUNED_BATCH = 64
FETCH_WAIT = 1.0
"""Seconds one pull request waits on an empty stream before the worker asks again."""


# -- the worker (its own process) -----------------------------------------------------


async def work(url: str, batch: int, parent: int) -> None:
    import nats
    import nats.errors

    nc = await nats.connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(CONSUMER, stream=STREAM)
    print("ready", flush=True)
    end = time.monotonic() + e2e.CHILD_LIFETIME
    while time.monotonic() < end and os.getppid() == parent:
        try:
            msgs = await psub.fetch(batch, timeout=FETCH_WAIT)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await nc.publish(RESULTS + msg.subject.rsplit(".", 1)[1], msg.data)
            await msg.ack()
    await nc.close()


# -- the client side (this process) -----------------------------------------------------


class NatsPeer:
    """One row: `processes` worker processes, default or tuned (see the module's doc)."""

    modules = ("nats",)
    servers = ("nats-server",)
    expected = common.PAYLOADS

    def __init__(self, run: e2e.Run, url: str, tuned: bool) -> None:
        self.run, self.url, self.tuned = run, url, tuned
        self.procs: List[subprocess.Popen] = []
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.nc = None
        self.client_id = uuid.uuid4().hex
        self.got: List[bytes] = []
        self.want = 0
        self.done: Optional[asyncio.Event] = None

    def _run(self, coro, limit: float):
        assert self.loop is not None
        return self.loop.run_until_complete(asyncio.wait_for(coro, limit))

    async def _setup(self) -> None:
        import nats
        from nats.js.api import AckPolicy, RetentionPolicy
        from nats.js.errors import NotFoundError

        self.nc = nc = await nats.connect(self.url)
        self.js = js = nc.jetstream()
        try:
            await js.delete_stream(STREAM)  # a previous row's
        except NotFoundError:
            pass
        await js.add_stream(name=STREAM, subjects=[JOBS + "*"], retention=RetentionPolicy.WORK_QUEUE)
        await js.add_consumer(STREAM, durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT)
        await nc.subscribe(RESULTS + self.client_id, cb=self._on_result)

    async def _on_result(self, msg) -> None:
        self.got.append(msg.data)
        if len(self.got) >= self.want and self.done is not None:
            self.done.set()

    def start(self, processes: int) -> List[int]:
        self.loop = asyncio.new_event_loop()
        self._run(self._setup(), common.START_LIMIT)
        batch = TUNED_BATCH if self.tuned else 1
        for i in range(processes):
            argv = ["-m", "bench.peers.nats_peer", self.url, str(batch), str(os.getpid())]
            self.procs.append(common.start(self.run, argv, f"nats-worker-{processes}-{i}"))
        deadline = time.monotonic() + common.START_LIMIT
        for proc in self.procs:
            common.wait_for_log(proc, "ready", deadline)
        return [proc.pid for proc in self.procs]

    async def _jobs(self, payloads: List[bytes], pipelined: bool) -> List[bytes]:
        self.got, self.want, self.done = [], len(payloads), asyncio.Event()
        subject = JOBS + self.client_id
        if pipelined:
            acks = [await self.js.publish_async(subject, payload) for payload in payloads]
            await self.js.publish_async_completed()
            for ack in acks:
                ack.result()  # raises if the stream refused a job
        else:
            for payload in payloads:
                await self.js.publish(subject, payload)
        await self.done.wait()
        return sorted(self.got)

    def call(self, i: int) -> None:
        answer = self._run(self._jobs([common.PAYLOADS[i]], False), common.RTT_LIMIT)
        assert answer == [common.PAYLOADS[i]], answer

    def run_all(self) -> list:
        return self._run(self._jobs(common.PAYLOADS, self.tuned), common.round_limit(len(common.PAYLOADS)))

    def close(self) -> None:
        for proc in self.procs:
            common.stop(proc)
        if self.loop is not None:
            if self.nc is not None:
                self._run(self.nc.close(), common.STOP_LIMIT)
            self.loop.close()


if __name__ == "__main__":
    asyncio.run(work(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
