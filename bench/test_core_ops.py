"""Benchmarks of the broker core's operations, on the compiled and the pure core.

Socket benchmarks drive a BrokerCore directly over inproc sockets, calling
``core.run(-1, 0)`` (handle what is pending, return) until a counter reaches N.
Each round gets a fresh context, sockets and core from its set-up (not timed), so
every round measures the same work; the teardown checks that the work was really
done (counters, and what the peers received) before the rig is closed.

See bench/README.md for what each benchmark measures and how to compare the cores.
"""

from __future__ import annotations

import random

import pytest
import zmq

LONG_TIMEOUT = 3600.0  # a deadline that never passes during a benchmark: heap work, no expiry
TRIES = 3
ROUND_TRIP_WORKERS = 8


def _pedantic(benchmark, sizes, target, setup, teardown, rounds=None):
    if benchmark.disabled:
        # --benchmark-disable: pedantic runs the target once but skips the teardown,
        # hence its checks; run the teardown here (a quick functional smoke test).
        made = []

        def recording_setup():
            made.append(setup())
            return made[-1]

        result = benchmark.pedantic(target, setup=recording_setup)
        args, kwargs = made[-1]
        teardown(*args, **kwargs)
        return result
    return benchmark.pedantic(
        target,
        setup=setup,
        teardown=teardown,
        rounds=rounds or sizes.socket_rounds,
        warmup_rounds=sizes.warmup_rounds,
        iterations=1,
    )


def _clean(stats: dict) -> None:
    """No message was dropped and no worker was found gone."""
    assert stats["dropped"] == 0, stats
    assert stats["drops"] == {}, stats
    assert stats["unreachable_workers"] == 0, stats


def _queue_requests(rig, n: int):
    """A client that has sent n requests, all taken into the core's queue."""
    client = rig.client()
    rig.send_requests(client, n)
    s = rig.run_until("requests", n)
    assert s["queued"] == n and s["dispatched"] == 0, s
    return client


def _running_jobs(rig, n: int):
    """n requests queued, then dispatched to n distinct idle workers (hop workers:
    see Rig.add_hop_workers). Returns (client, workers, stats); the jobs wait unread
    in the worker sockets. With a short attempt timeout some may already have
    expired: see stats["timeouts"]."""
    client = _queue_requests(rig, n)
    workers = rig.add_hop_workers(n)
    s = rig.run_until("dispatched", n)
    assert s["idle_workers"] == 0 and s["ready"] == n, s
    return client, workers, s


def _check_job(rig, frames: list, envelope: list) -> bytes:
    """frames == envelope + [task_id, payload]; returns the task id."""
    k = len(envelope)
    assert len(frames) == k + 2 and frames[:k] == envelope and frames[-1] == rig.PAYLOAD, frames
    assert len(frames[k]) == 16, frames
    return frames[k]


def _receive_jobs(rig, workers, n: int) -> list:
    """The task ids of the n jobs sent to hop workers: every hop worker got exactly
    one job, and the ids are distinct."""
    ids = []
    for i, w in enumerate(workers):
        expected_hops = {b"hop-%06d" % j for j in range(i, n, len(workers))}
        jobs = rig.recv_exactly(w, len(expected_hops))
        assert {frames[0] for frames in jobs} == expected_hops
        ids.extend(_check_job(rig, frames, [frames[0], b""]) for frames in jobs)
    assert len(ids) == n and len(set(ids)) == n
    return ids


def _check_client_got(rig, client, n: int, body: bytes) -> None:
    for frames in rig.recv_exactly(client, n):
        assert frames == [b"", body], frames


# -- requests entering the queue ---------------------------------------------------


@pytest.mark.benchmark(group="enqueue")
def test_enqueue(benchmark, core, rigs, sizes):
    """N requests [b"", payload] waiting on the requests ROUTER -> queued in the core."""
    n = sizes.n

    def setup():
        rig = rigs(core, timeout=LONG_TIMEOUT, tries=TRIES)
        client = rig.client()
        rig.send_requests(client, n)
        return (rig,), {}

    def target(rig):
        rig.run_until("requests", n)

    def teardown(rig):
        s = rig.core.stats()
        assert s["requests"] == n and s["queued"] == n and s["running"] == 0, s
        assert s["dispatched"] == 0, s
        _clean(s)
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown)


# -- dispatch ------------------------------------------------------------------------


@pytest.mark.benchmark(group="dispatch")
def test_dispatch(benchmark, core, rigs, sizes):
    """N queued requests; N distinct DEALER workers' ready messages waiting on the
    workers ROUTER -> every job sent to a worker (ready handling + dispatch)."""
    n = sizes.n

    def setup():
        rig = rigs(core, timeout=LONG_TIMEOUT, tries=TRIES, max_sockets=n + 16)
        _queue_requests(rig, n)
        workers = rig.add_workers(n)
        return (rig, workers), {}

    def target(rig, workers):
        rig.run_until("dispatched", n)

    def teardown(rig, workers):
        s = rig.core.stats()
        assert s["dispatched"] == n and s["ready"] == n, s
        assert s["running"] == n and s["queued"] == 0 and s["idle_workers"] == 0, s
        _clean(s)
        # Each worker got exactly one job, and the task ids are distinct.
        ids = {_check_job(rig, rig.recv_exactly(w, 1)[0], [b""]) for w in workers}
        assert len(ids) == n
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown)


# -- answers -------------------------------------------------------------------------


@pytest.mark.benchmark(group="answer")
def test_answer(benchmark, core, rigs, sizes):
    """N running jobs; N answers [task_id, b"ok"] waiting on the answers PULL ->
    each matched to its job, sent back to the client, its deadline removed."""
    n = sizes.n

    def setup():
        rig = rigs(core, timeout=LONG_TIMEOUT, tries=TRIES)
        client, workers, s = _running_jobs(rig, n)
        assert s["running"] == n and s["queued"] == 0 and s["timeouts"] == 0, s
        ids = _receive_jobs(rig, workers, n)
        push = rig.pusher()
        for task_id in ids:
            push.send_multipart([task_id, rig.ANSWER], zmq.DONTWAIT)
        return (rig, client), {}

    def target(rig, client):
        rig.run_until("answered", n)

    def teardown(rig, client):
        s = rig.core.stats()
        assert s["answered"] == n and s["late_answers"] == 0, s
        assert s["running"] == 0 and s["queued"] == 0 and s["timeouts"] == 0, s
        _clean(s)
        _check_client_got(rig, client, n, rig.ANSWER)
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown)


# -- expiry --------------------------------------------------------------------------


def _expire_bench(benchmark, core, rigs, sizes, expire_timeouts, tries: int):
    """N running jobs whose deadlines have all passed -> timed until the core has
    handled every expiry (abort + empty answer with tries=1, requeue with tries=2).

    A timeout of 0 cannot give N *running* jobs: each would expire at the loop turn
    after its dispatch, inside the set-up. So the per-attempt timeout must outlast
    the set-up's dispatch phase: it starts at 0.2 s per core and, when a set-up saw
    a timeout, is doubled (or set to twice that dispatch phase, if longer) for the
    rest of the session and the set-up retried. The set-up then sleeps until every
    deadline has passed, so the timed part only handles expiries."""
    n = sizes.n
    key = "aborted" if tries == 1 else "retried"
    name = "compiled" if core.__name__.endswith("._core") else "pure"

    def setup():
        for _ in range(6):
            timeout = expire_timeouts.setdefault(name, 0.2)
            rig = rigs(core, timeout=timeout, tries=tries)
            client = _queue_requests(rig, n)
            rig.add_hop_workers(n)
            start = core.monotonic()  # the dispatch phase: from here to `done`
            s = rig.run_until("dispatched", n)
            done = core.monotonic()
            if s["timeouts"] == 0:
                assert s["running"] == n and s["queued"] == 0 and s["idle_workers"] == 0, s
                # Deadlines are at most done + timeout on the core's clock.
                rig.sleep_past(done + timeout)
                return (rig, client), {}
            rig.close()
            expire_timeouts[name] = max(2 * timeout, 2 * (done - start))
        raise AssertionError(f"set-up kept outlasting the attempt timeout (last {timeout} s)")

    def target(rig, client):
        rig.run_until(key, n)

    def teardown(rig, client):
        s = rig.core.stats()
        assert s["timeouts"] == n and s["running"] == 0 and s["answered"] == 0, s
        _clean(s)
        if tries == 1:
            assert s["aborted"] == n and s["retried"] == 0 and s["queued"] == 0, s
            _check_client_got(rig, client, n, b"")  # the empty answer of an abort
        else:
            assert s["retried"] == n and s["aborted"] == 0 and s["queued"] == n, s
            assert not client.poll(0, zmq.POLLIN)
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown)
    benchmark.extra_info["attempt_timeout_s"] = expire_timeouts[name]


@pytest.mark.benchmark(group="expire-abort")
def test_expire_abort(benchmark, core, rigs, sizes, expire_timeouts):
    """tries=1: N deadlines passed -> N jobs aborted, N empty answers to the client."""
    _expire_bench(benchmark, core, rigs, sizes, expire_timeouts, tries=1)


@pytest.mark.benchmark(group="expire-retry")
def test_expire_retry(benchmark, core, rigs, sizes, expire_timeouts):
    """tries=2: N deadlines passed -> N jobs back at the front of the queue."""
    _expire_bench(benchmark, core, rigs, sizes, expire_timeouts, tries=2)


# -- full round trip ---------------------------------------------------------------


@pytest.mark.benchmark(group="round-trip")
def test_round_trip(benchmark, core, rigs, sizes):
    """N requests waiting -> each dispatched to one of 8 DEALER workers driven in the
    same thread (answer pushed and ready re-sent at once: pipelined), answered, and
    the answer received by the client. Includes the Python cost of the driver."""
    n = sizes.n

    def setup():
        rig = rigs(core, timeout=60.0, tries=TRIES)
        client = rig.client()
        rig.send_requests(client, n)
        workers = rig.add_workers(ROUND_TRIP_WORKERS)
        push = rig.pusher()
        poller = zmq.Poller()
        for sock in workers + [client]:
            poller.register(sock, zmq.POLLIN)
        return (rig, client, workers, push, {"poller": poller}), {}

    def target(rig, client, workers, push, result):
        run = rig.core.run
        clock = rig.core_module.monotonic
        poll = result.pop("poller").poll
        events, pollin, nowait = zmq.EVENTS, zmq.POLLIN, zmq.DONTWAIT
        ready = [b"", rig.READY]
        answer = rig.ANSWER
        received = jobs = turns = 0
        bad = []
        # A turn dispatches the jobs for the ready messages the previous turn took
        # in, so about 2 * n / ROUND_TRIP_WORKERS turns are needed: 2 * n + 100
        # bound the loop in count, the deadline in time.
        deadline = clock() + 60.0
        while received < n and turns < 2 * n + 100 and clock() < deadline:
            turns += 1
            run(-1, 0)
            for sock, _ in poll(0):
                if sock is client:
                    while client.get(events) & pollin:
                        frames = client.recv_multipart(nowait)
                        received += 1
                        if frames != [b"", answer]:
                            bad.append(frames)
                else:
                    # One job at most: the worker has one ready message outstanding.
                    # (DONTWAIT throughout: poll said readable, queues are unlimited.)
                    frames = sock.recv_multipart(nowait)
                    jobs += 1
                    push.send_multipart([frames[1], answer], nowait)
                    sock.send_multipart(ready, nowait)
        result.update(received=received, jobs=jobs, turns=turns, bad=bad)

    def teardown(rig, client, workers, push, result):
        assert result["received"] == n and result["jobs"] == n and not result["bad"], result
        s = rig.core.stats()
        assert s["requests"] == n and s["dispatched"] == n and s["answered"] == n, s
        assert s["queued"] == 0 and s["running"] == 0 and s["timeouts"] == 0, s
        _clean(s)
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown)


# -- data structures through their Python API ------------------------------------------


def _struct_pedantic(benchmark, sizes, target, setup, teardown):
    return _pedantic(benchmark, sizes, target, setup, teardown, rounds=sizes.struct_rounds)


@pytest.mark.benchmark(group="IdleWorkers push+pop")
def test_idle_workers_push_pop(benchmark, core, sizes):
    """K push(address) of distinct addresses, then K pop() (FIFO)."""
    addresses = [b"worker-%06d" % i for i in range(sizes.k)]

    def setup():
        return (core.IdleWorkers(), {}), {}

    def target(idle, result):
        push = idle.push
        pop = idle.pop
        for address in addresses:
            push(address)
        result["popped"] = [pop() for _ in addresses]

    def teardown(idle, result):
        assert result["popped"] == addresses
        assert len(idle) == 0 and idle.pop() is None

    _struct_pedantic(benchmark, sizes, target, setup, teardown)


@pytest.mark.benchmark(group="DeadlineHeap push+pop")
def test_deadline_heap_push_pop(benchmark, core, sizes):
    """K push(key, deadline) with shuffled deadlines, then K pop() (soonest first)."""
    rng = random.Random(20100)
    entries = [(key, rng.uniform(0.0, 1000.0)) for key in range(sizes.k)]
    expected = sorted((deadline, key) for key, deadline in entries)

    def setup():
        return (core.DeadlineHeap(), {}), {}

    def target(heap, result):
        push = heap.push
        pop = heap.pop
        for key, deadline in entries:
            push(key, deadline)
        result["popped"] = [pop() for _ in entries]

    def teardown(heap, result):
        assert result["popped"] == expected
        assert len(heap) == 0 and heap.peek() is None

    _struct_pedantic(benchmark, sizes, target, setup, teardown)


@pytest.mark.benchmark(group="RequestTable add+discard")
def test_request_table_add_discard(benchmark, core, sizes):
    """K add() (new task ids), then K discard(task_id) in the same order."""
    k = sizes.k
    epoch = b"benchepo"

    def setup():
        return (core.RequestTable(epoch), {}), {}

    def target(table, result):
        add = table.add
        discard = table.discard
        ids = [add() for _ in range(k)]
        result["ids"] = ids
        result["discarded"] = [discard(task_id) for task_id in ids]

    def teardown(table, result):
        ids = result["ids"]
        assert len(set(ids)) == k and all(len(i) == 16 and i[:8] == epoch for i in ids)
        assert result["discarded"] == [True] * k
        assert len(table) == 0 and not any(i in table for i in ids[:100])

    _struct_pedantic(benchmark, sizes, target, setup, teardown)
