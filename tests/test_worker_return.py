"""A worker connected to several brokers keeps one credit for all (issue 17 part 4,
docs/PROTOCOL.md 4.14): RETURN gives back a job that came beyond the credit, which the
broker queues again without counting a try and stops sending until the next READY.
Part 1 plays the worker with raw sockets on each core (make_crig); part 2 runs a real
fastbroker.Worker against two brokers and checks from its jobs' log that it never ran
more jobs at once than its credit."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from fastbroker import Broker, Client, Worker
from fastbroker.protocol import (
    C_STATUS,
    CMD_ANSWER,
    CMD_DISCONNECT,
    CMD_RETURN,
    CMD_TASK,
    MAX_BATCH,
    MAX_FRAMES,
    OPT_NO_ACK,
    R_OK,
    STATE_QUEUED,
    STATE_RUNNING,
    WORKER_SIGNATURE_V2 as SIG2,
)
from rigs import LONG_TIMEOUT, FakeBroker, assert_stats, new_id, opts, reply, status, tid, wait_until

WAIT = 20.0
"""Bound of every wait for something that should take well under a second."""


# -- 1. the broker's side ----------------------------------------------------------------


def test_a_returned_job_is_queued_again_without_counting_a_try(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 2)
    client = rig.fbclient()
    first, second = new_id(), new_id()
    client.submit(first, b"one", options=opts(OPT_NO_ACK, 0, 1))  # a single try
    client.submit(second, b"two", options=opts(OPT_NO_ACK, 0, 1))
    (t1, p1), (t2, p2) = rig.task(worker), rig.task(worker)
    assert (p1, p2) == ([b"one"], [b"two"])
    worker.command(CMD_RETURN, t2)
    rig.pump(lambda: rig.stats()["returned"] == 1)
    # Queued again, its try not counted: STATUS says no attempt made, 1 try.
    assert rig.ask(client, C_STATUS, second) == status(second, STATE_QUEUED, 0, 1)
    # The worker gets nothing more until READY, though it holds 1 job of credit 2,
    # and not even once that job is answered.
    rig.quiet(worker)
    worker.answer(t1, b"-one")
    assert rig.reply(client) == reply(R_OK, first, b"-one")
    rig.quiet(worker)
    assert_stats(rig.stats(), queued=1, idle_workers=0, returned=1, retried=0, timeouts=0)
    # READY again: the returned job comes back, still with its one try.
    worker.ready(2)
    task_id, payload = rig.task(worker)
    assert payload == [b"two"]
    assert rig.ask(client, C_STATUS, second) == status(second, STATE_RUNNING, 1, 1)
    worker.answer(task_id, b"-two")
    assert rig.reply(client) == reply(R_OK, second, b"-two")
    assert_stats(rig.stats(), dispatched=3, answered=2, aborted=0)


def test_several_jobs_returned_in_one_message(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 3)
    client = rig.fbclient()
    ids = [new_id() for _ in range(3)]
    for i, rid in enumerate(ids):
        client.submit(rid, b"%d" % i, options=opts(OPT_NO_ACK))
    tasks = [rig.task(worker) for _ in ids]
    worker.command(CMD_RETURN, tasks[1][0], tasks[2][0])
    rig.pump(lambda: rig.stats()["returned"] == 2)
    other = rig.dealer()
    rig.register(other, 5)
    # In the order they had: job 1, then job 2 (ahead of anything new).
    assert [rig.task(other)[1] for _ in range(2)] == [[b"1"], [b"2"]]


def test_bad_returns_are_dropped_and_counted(make_crig):
    rig = make_crig(timeout=LONG_TIMEOUT)
    worker = rig.dealer()
    rig.register(worker, 1)
    client = rig.fbclient()
    rid = new_id()
    client.submit(rid, b"x", options=opts(OPT_NO_ACK))
    task_id, _ = rig.task(worker)
    before = rig.stats()["dropped"]
    worker.command(CMD_RETURN)  # no task id
    worker.command(CMD_RETURN, b"short")  # not a task id
    worker.command(CMD_RETURN, task_id[:8] + b"\xff" * 8)  # not a job of this worker
    rig.pump(lambda: rig.stats()["dropped"] == before + 3)
    assert rig.stats()["drops"] == {
        "worker command with the wrong frames": 1,
        "answer whose task id is malformed": 1,
        "answer for an unknown or already answered task": 1,
    }
    # The job in hand is not affected; RETURN from a worker it does not know: DISCONNECT.
    stranger = rig.dealer(live=False)
    stranger.command(CMD_RETURN, task_id)
    rig.pump(lambda: stranger.inbox)
    assert stranger.inbox[0][2] == CMD_DISCONNECT
    worker.answer(task_id, b"fine")
    assert rig.reply(client) == reply(R_OK, rid, b"fine")
    assert rig.stats()["returned"] == 0


# -- 2. fastbroker.Worker with two brokers -----------------------------------------------------


class Timed(Worker):
    """Sleeps 5 ms per job and notes (start, end) of each in `spans`, and the thread
    that ran it in `threads`."""

    spans: list = []
    threads: set = set()
    lock = threading.Lock()

    def process(self, data: bytes) -> bytes:
        start = time.monotonic()
        time.sleep(0.005)  # a job long enough for two brokers' TASKs to cross
        with Timed.lock:
            Timed.spans.append((start, time.monotonic()))
            Timed.threads.add(threading.get_ident())
        return b"-" + data


def most_at_once(spans: list) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def brokers_and_worker(tmp_path, worker_class, count: int = 2, credit: int = 1):
    """`count` Brokers in threads (ipc) and a `worker_class` Worker with all of them in
    its list, in a thread: yields (brokers, worker); all stopped and closed after."""
    brokers = [
        Broker(None, None, None, *(f"ipc://{tmp_path}/{name}{k}" for name in ("req", "wrk", "ans")), heartbeat=0.2)
        for k in range(count)
    ]
    threads = [threading.Thread(target=b.run, name=f"broker{k}") for k, b in enumerate(brokers)]
    for t in threads:
        t.start()
    worker = worker_class(None, [b.endpoints[1] for b in brokers], credit=credit, heartbeat=0.2)
    wthread = threading.Thread(target=worker.run, name="worker")
    wthread.start()
    try:
        yield brokers, worker
    finally:
        worker.stop()
        wthread.join(WAIT)
        worker.close()
        for b in brokers:
            b.stop()
        for t in threads:
            t.join(WAIT)
        for b in brokers:
            b.close()
    wait_until(lambda: not wthread.is_alive(), WAIT)


@pytest.mark.parametrize("credit", [1, 2])
def test_one_credit_for_two_brokers(tmp_path, credit):
    Timed.spans = []
    Timed.threads = set()
    with brokers_and_worker(tmp_path, Timed, credit=credit) as (brokers, worker):
        with Client([b.endpoints[0] for b in brokers]) as client:
            futures = client.submit_many([b"%d" % i for i in range(200)])
            assert [f.result(WAIT) for f in futures] == [b"-%d" % i for i in range(200)]
        # Both brokers were served, and the worker never held more than its credit.
        answered = [b.stats()["answered"] for b in brokers]
        assert sum(answered) == 200 and min(answered) > 0, answered
        assert most_at_once(Timed.spans) <= credit
        # One pool of job threads for every broker (one loop, one job table): with
        # credit 1, process() is only ever called from one thread.
        assert len(Timed.threads) <= credit, Timed.threads
        stats = worker.stats
        assert stats.received == 200 + 0 and stats.answered == 200
        returned = sum(b.stats()["returned"] for b in brokers)
        assert returned == stats.returned
        print(f"credit {credit}: {stats.returned} job(s) returned, answered per broker {answered}")


class Quick(Worker):
    """Answers at once, noting (start, end) of each job in `spans`."""

    spans: list = []
    lock = threading.Lock()

    def process(self, data: bytes) -> bytes:
        start = time.monotonic()
        with Quick.lock:
            Quick.spans.append((start, time.monotonic()))
        return data


def test_brokers_that_all_have_jobs_queued_get_almost_none_given_back(tmp_path):
    """Each broker of the list is told a share of the credit, the shares together no
    more than it (Session._share_credit): with both brokers' queues full, jobs given
    back are the exception (at most one per job, with every broker told the whole
    credit: 1.2 per job in bench.shards before)."""
    jobs = 3000
    Quick.spans = []
    with brokers_and_worker(tmp_path, Quick, credit=8) as (brokers, worker):
        with Client([b.endpoints[0] for b in brokers]) as client:
            assert list(client.map([b"%d" % i for i in range(jobs)], window=1024)) == [b"%d" % i for i in range(jobs)]
        answered = [b.stats()["answered"] for b in brokers]
        assert sum(answered) == jobs and min(answered) > 0, answered
        returned = sum(b.stats()["returned"] for b in brokers)
        assert returned == worker.stats.returned
        print(f"{returned} job(s) given back of {jobs}, answered per broker {answered}")
        assert returned <= jobs // 20, returned
        assert most_at_once(Quick.spans) <= 8


class Noted(Worker):
    """Answers at once, noting each payload in `seen`, in the order the jobs ran."""

    seen: list = []

    def process(self, data: bytes) -> bytes:
        Noted.seen.append(bytes(data[:1]))
        return data


def test_brokers_with_jobs_queued_are_served_in_turn(tmp_path):
    """The holder of most of the credit changes every SLICE: two brokers whose queues
    stay full are both served all along, not one after the other."""
    jobs = 4000
    Noted.seen = []
    with brokers_and_worker(tmp_path, Noted, credit=8) as (brokers, _):
        clients = [Client(b.endpoints[0]) for b in brokers]
        try:
            futures = [c.submit_many([name + b"%d" % i for i in range(jobs)]) for c, name in zip(clients, (b"a", b"b"))]
            for each in futures:
                for f in each:
                    f.result(WAIT)
        finally:
            for c in clients:
                c.close()
    first_half = Noted.seen[:jobs]
    shares = {name: first_half.count(name) for name in (b"a", b"b")}
    print(f"of the first {jobs} jobs run: {shares}")
    assert min(shares.values()) >= jobs // 5, shares


class Slow(Worker):
    """Each job takes 200 ms, one heartbeat of the test's workers."""

    def process(self, data: bytes) -> bytes:
        time.sleep(0.2)
        return data


def test_a_broker_with_a_job_is_served_while_another_keeps_the_worker_busy(tmp_path):
    """Credit 1, jobs of 200 ms, broker A always has jobs queued, broker B gets one at a
    time: B's job waits for A's job in hand and at most a turn of A's, never for good.
    (Room appears only as jobs end: when turns passed by time alone, the worker's turn
    after its heartbeat, one heartbeat after its last ANSWER, gave A's turn back just
    before A's job ended, and B's job waited 3 to 30 s and more.)"""
    with brokers_and_worker(tmp_path, Slow, credit=1) as (brokers, worker):
        with Client(brokers[0].endpoints[0]) as a, Client(brokers[1].endpoints[0]) as b:
            load = a.submit_many([b"a%d" % i for i in range(60)])
            wait_until(lambda: worker.stats.answered >= 2, WAIT, message="A's jobs to run")
            for i in range(6):
                time.sleep(0.05)
                assert b.submit(b"b%d" % i).result(5.0) == b"b%d" % i
                assert not all(f.done() for f in load), "A ran out of jobs: the test proves nothing"
            for f in load:
                f.cancel()


def test_a_broker_alone_with_jobs_gets_the_whole_credit(tmp_path):
    """A broker whose jobs fill its share gets what another broker, with nothing queued,
    leaves unused: all of the credit (the idle one's probe of one job is not counted
    against it)."""
    Timed.spans = []
    with brokers_and_worker(tmp_path, Timed, credit=8) as (brokers, _):
        with Client(brokers[0].endpoints[0]) as client:
            payloads = [b"%d" % i for i in range(400)]
            assert list(client.map(payloads)) == [b"-" + p for p in payloads]
        assert most_at_once(Timed.spans) == 8, most_at_once(Timed.spans)


# -- 3. fastbroker.Worker against brokers played by the test -------------------------------


class Held(Worker):
    """Holds each job until the test sets its payload's event in `release`."""

    release: dict = {}

    def process(self, data: bytes) -> bytes:
        assert Held.release.setdefault(bytes(data), threading.Event()).wait(WAIT)
        return b"-" + data


def _held_worker(ctx, brokers, credit: int = 1):
    Held.release = {}
    # The test plays brokers that send no heartbeats: a long liveness keeps the worker on.
    worker = Held(ctx, [b.address for b in brokers], credit=credit, heartbeat=1.0, liveness=30)
    thread = threading.Thread(target=worker.run, name="worker")
    thread.start()
    for b in brokers:
        b.expect_ready(credit)
    return worker, thread


def _stop(worker, thread) -> None:
    for event in Held.release.values():
        event.set()
    worker.stop()
    thread.join(WAIT)
    worker.close()
    assert not thread.is_alive()


def test_an_idle_worker_offers_its_credit_again_to_every_broker_that_got_jobs_back(ctx):
    """Three brokers, credit 1: B and C each got a job back while A's ran, so each may
    have more (hungry, share 0): B's turn comes (A is told 0, before its answer), and
    when A's job ends B is told 1; B sends nothing (it has nothing queued any more), so
    after DRY_AFTER C's turn comes: C is told 1 too (once, C stayed at credit 0 until
    another job came through A or B)."""
    a, b, c = (FakeBroker(ctx) for _ in range(3))
    worker, thread = _held_worker(ctx, [a, b, c])
    try:
        a.send(CMD_TASK, tid(1), b"one")
        wait_until(lambda: b"one" in Held.release, WAIT, message="job one to start")
        b.send(CMD_TASK, tid(2), b"two")
        c.send(CMD_TASK, tid(3), b"three")
        assert b.recv() == [CMD_RETURN, tid(2)]
        assert c.recv() == [CMD_RETURN, tid(3)]
        Held.release[b"one"].set()
        a.expect_ready(0)
        assert a.recv() == [CMD_ANSWER, tid(1), b"-one"]
        b.expect_ready(1)
        c.expect_ready(1)
        assert worker.stats.returned == 2
    finally:
        _stop(worker, thread)


def test_a_broker_keeps_its_turn_until_a_job_of_it_comes(ctx):
    """Credit 1: S got its job back while A's ran, so its turn comes next (A is told 0)
    and lasts until S has had a job in it, however long A's job takes: when A's job
    ends, the room goes to S, not back to A. (When turns passed by time alone, the turn
    of that job's end went back to A, and S could wait for ever behind long jobs.)"""
    a, s = FakeBroker(ctx), FakeBroker(ctx)
    worker, thread = _held_worker(ctx, [a, s])
    try:
        a.send(CMD_TASK, tid(1), b"one")
        wait_until(lambda: b"one" in Held.release, WAIT, message="job one to start")
        s.send(CMD_TASK, tid(2), b"two")
        assert s.recv() == [CMD_RETURN, tid(2)]
        a.expect_ready(0)  # S's turn: it has jobs queued
        time.sleep(0.1)  # ten turns' worth of time: still S's
        Held.release[b"one"].set()
        assert a.recv() == [CMD_ANSWER, tid(1), b"-one"], a.got
        s.expect_ready(1)
        s.send(CMD_TASK, tid(2), b"two")
        wait_until(lambda: b"two" in Held.release, WAIT, message="S's job to start")
        assert worker.stats.returned == 1
    finally:
        _stop(worker, thread)


def test_jobs_given_back_in_returns_within_the_frame_limit(ctx):
    """More jobs than a message may carry frames (MAX_FRAMES) come while the credit is
    full: they are given back in as many RETURNs as needed, each within the limit (a
    longer one the broker drops whole, and the jobs would stay taken until they time
    out)."""
    a, b = FakeBroker(ctx), FakeBroker(ctx)
    worker, thread = _held_worker(ctx, [a, b])
    try:
        a.send(CMD_TASK, tid(0), b"held")
        wait_until(lambda: b"held" in Held.release, WAIT, message="the first job to start")
        total = 3 * MAX_BATCH + 2 * (MAX_FRAMES - MAX_BATCH)  # > MAX_FRAMES ids, in TASKs of MAX_BATCH
        ids = [tid(1 + n) for n in range(total)]
        for at in range(0, total, MAX_BATCH):  # sent at once: they arrive before the worker's turn
            chunk = ids[at : at + MAX_BATCH]
            frames = [f for task_id in chunk for f in (b"p",)]
            header = b"".join(task_id + (1).to_bytes(2, "big") for task_id in chunk)
            b.sock.send_multipart([b.identity, b"", SIG2, CMD_TASK, *frames, header])
        returned: list = []
        while len(returned) < total:
            message = b.recv()
            assert message[0] == CMD_RETURN, message[:2]
            # At the broker: its identity frame, b"", the signature and this.
            assert len(message) + 3 <= MAX_FRAMES, f"a RETURN of {len(message) - 1} ids"
            returned.extend(message[1:])
        assert sorted(returned) == sorted(ids)
    finally:
        _stop(worker, thread)
