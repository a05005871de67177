"""Unit tests of the core's structures (IdleWorkers, DeadlineHeap, RequestTable, RequestIds),
on the live core, with seeded randomized model tests against plain Python models."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import pytest

from fastbroker.protocol import HEAP_KEY_LIMIT, TASK_ID_SIZE

# ---------------------------------------------------------------------------
# IdleWorkers
# ---------------------------------------------------------------------------


def test_idle_empty(core):
    idle = core.IdleWorkers()
    assert len(idle) == 0
    assert idle.pop() is None
    assert idle.pop() is None
    assert idle.remove(b"nobody") is False
    assert b"nobody" not in idle


def test_idle_fifo_order(core):
    idle = core.IdleWorkers()
    addresses = [b"w%d" % i for i in range(5)]
    for n, address in enumerate(addresses, 1):
        idle.push(address)
        assert len(idle) == n
        assert address in idle
    assert [idle.pop() for _ in addresses] == addresses
    assert len(idle) == 0
    assert idle.pop() is None


def test_idle_repush_replaces_and_moves_to_back(core):
    idle = core.IdleWorkers()
    for address in (b"a", b"b", b"c"):
        idle.push(address)
    idle.push(b"a")  # a second "ready": the first entry is replaced
    assert len(idle) == 3
    assert [idle.pop(), idle.pop(), idle.pop()] == [b"b", b"c", b"a"]
    assert idle.pop() is None  # the stale first entry of b"a" is never popped


def test_idle_repush_last_keeps_single_entry(core):
    idle = core.IdleWorkers()
    for _ in range(10):
        idle.push(b"only")
    assert len(idle) == 1
    assert idle.pop() == b"only"
    assert idle.pop() is None
    assert len(idle) == 0


def test_idle_remove(core):
    idle = core.IdleWorkers()
    for address in (b"a", b"b", b"c", b"d"):
        idle.push(address)
    assert idle.remove(b"b") is True
    assert idle.remove(b"b") is False
    assert b"b" not in idle
    assert len(idle) == 3
    assert idle.remove(b"d") is True  # the newest
    assert idle.remove(b"a") is True  # the oldest
    assert len(idle) == 1
    assert idle.pop() == b"c"
    assert idle.pop() is None
    assert len(idle) == 0


def test_idle_removed_then_pushed_again_goes_to_back(core):
    idle = core.IdleWorkers()
    for address in (b"a", b"b", b"c"):
        idle.push(address)
    assert idle.remove(b"a")
    idle.push(b"a")
    assert [idle.pop() for _ in range(3)] == [b"b", b"c", b"a"]
    assert idle.pop() is None


def test_idle_popped_address_not_contained(core):
    idle = core.IdleWorkers()
    idle.push(b"a")
    idle.push(b"b")
    assert idle.pop() == b"a"
    assert b"a" not in idle
    assert idle.remove(b"a") is False
    assert b"b" in idle


def test_idle_binary_and_edge_addresses(core):
    idle = core.IdleWorkers()
    addresses = [
        b"\x00",
        b"\x00\x00",
        b"\x00\x01\x02\xff",
        bytes(range(256))[:255],  # the longest allowed
        b"\xff" * 255,
        b"x",
    ]
    for address in addresses:
        idle.push(address)
    assert len(idle) == len(addresses)
    for address in addresses:
        assert address in idle
    # Prefixes of a stored address are other addresses.
    assert b"\x00\x01" not in idle
    assert b"\xff" * 254 not in idle
    assert [idle.pop() for _ in addresses] == addresses


def test_idle_address_too_long_is_rejected(core):
    idle = core.IdleWorkers()
    idle.push(b"ok")
    with pytest.raises(ValueError):
        idle.push(b"x" * 256)
    with pytest.raises(ValueError):
        idle.push(b"x" * 10_000)
    assert len(idle) == 1
    assert idle.pop() == b"ok"
    assert idle.pop() is None


def test_idle_address_too_long_is_never_idle(core):
    # A 256-byte address can never be idle: `in` says no and remove() finds nothing,
    # as for any other address that was not pushed.
    idle = core.IdleWorkers()
    idle.push(b"x" * 255)
    assert (b"x" * 256 in idle) is False
    assert idle.remove(b"x" * 256) is False
    assert len(idle) == 1


def test_idle_many_distinct_with_removals(core):
    rng = random.Random(1234)
    idle = core.IdleWorkers()
    addresses = [b"worker-%05d" % i for i in range(10_000)]
    for address in addresses:
        idle.push(address)
    assert len(idle) == 10_000
    removed = set(rng.sample(addresses, 4_000))
    for address in removed:
        assert idle.remove(address) is True
    assert len(idle) == 6_000
    for address in rng.sample(addresses, 500):
        assert (address in idle) == (address not in removed)
    expected = [a for a in addresses if a not in removed]
    popped = [idle.pop() for _ in range(len(expected))]
    assert popped == expected
    assert idle.pop() is None
    assert len(idle) == 0


def test_idle_randomized_model(core):
    """10,000 seeded random operations compared with an OrderedDict model."""
    rng = random.Random(20100101)
    idle = core.IdleWorkers()
    model: OrderedDict[bytes, None] = OrderedDict()
    pool = [b"w%d" % i for i in range(300)] + [rng.randbytes(rng.randint(1, 255)) for _ in range(50)]
    for step in range(10_000):
        op = rng.random()
        address = rng.choice(pool)
        if op < 0.45:
            idle.push(address)
            model.pop(address, None)
            model[address] = None
        elif op < 0.7:
            expected = model.popitem(last=False)[0] if model else None
            assert idle.pop() == expected, f"step {step}"
        elif op < 0.9:
            expected = model.pop(address, "absent") is None
            assert idle.remove(address) is expected, f"step {step}"
        else:
            assert (address in idle) == (address in model), f"step {step}"
        assert len(idle) == len(model), f"step {step}"
    while model:
        assert idle.pop() == model.popitem(last=False)[0]
    assert idle.pop() is None


# ---------------------------------------------------------------------------
# DeadlineHeap
# ---------------------------------------------------------------------------


def test_heap_empty(core):
    heap = core.DeadlineHeap()
    assert len(heap) == 0
    assert heap.peek() is None
    with pytest.raises(IndexError):
        heap.pop()
    assert heap.remove(0) is False
    assert heap.peek() is None


def test_heap_order(core):
    heap = core.DeadlineHeap()
    deadlines = {7: 3.5, 1: 1.25, 9: 9.0, 3: 0.5, 0: 2.0, 4: -1.0}
    for key, deadline in deadlines.items():
        heap.push(key, deadline)
    assert len(heap) == len(deadlines)
    assert heap.peek() == (-1.0, 4)
    assert len(heap) == len(deadlines)  # peek does not remove
    popped = [heap.pop() for _ in range(len(deadlines))]
    assert popped == sorted((d, k) for k, d in deadlines.items())
    assert len(heap) == 0
    assert heap.peek() is None
    with pytest.raises(IndexError):
        heap.pop()


def test_heap_deadline_is_float(core):
    heap = core.DeadlineHeap()
    heap.push(3, 5)
    deadline, key = heap.peek()
    assert (deadline, key) == (5.0, 3)
    assert type(deadline) is float
    assert type(key) is int
    deadline, key = heap.pop()
    assert type(deadline) is float and type(key) is int


def test_heap_push_replaces_deadline(core):
    heap = core.DeadlineHeap()
    for key in range(100):
        heap.push(key, 10.0 + key)
    heap.push(50, 0.5)  # middle key moved to the front
    assert len(heap) == 100
    assert heap.peek() == (0.5, 50)
    heap.push(50, 1000.0)  # and to the back
    assert len(heap) == 100
    assert heap.peek() == (10.0, 0)
    popped = [heap.pop() for _ in range(100)]
    assert popped[-1] == (1000.0, 50)
    assert [k for _, k in popped].count(50) == 1
    assert [k for _, k in popped[:-1]] == [k for k in range(100) if k != 50]


def test_heap_remove_middle(core):
    heap = core.DeadlineHeap()
    for key in range(20):
        heap.push(key, float(key))
    for key in (10, 3, 19, 0):
        assert heap.remove(key) is True
        assert heap.remove(key) is False
    assert len(heap) == 16
    assert heap.peek() == (1.0, 1)
    popped = [heap.pop() for _ in range(16)]
    assert [k for _, k in popped] == [k for k in range(20) if k not in (10, 3, 19, 0)]
    assert heap.peek() is None


def test_heap_removed_key_can_be_pushed_again(core):
    heap = core.DeadlineHeap()
    heap.push(5, 1.0)
    heap.push(6, 2.0)
    assert heap.remove(5)
    heap.push(5, 3.0)
    assert [heap.pop(), heap.pop()] == [(2.0, 6), (3.0, 5)]
    assert len(heap) == 0


def test_heap_equal_deadlines(core):
    heap = core.DeadlineHeap()
    for key in range(10):
        heap.push(key, 1.0)
    heap.push(99, 0.0)
    assert heap.pop() == (0.0, 99)
    popped = [heap.pop() for _ in range(10)]
    assert all(d == 1.0 for d, _ in popped)
    assert sorted(k for _, k in popped) == list(range(10))


def test_heap_key_range(core):
    heap = core.DeadlineHeap()
    for bad in (-1, HEAP_KEY_LIMIT, 2**32 - 1, 2**32, 2**64):
        with pytest.raises(ValueError):
            heap.push(bad, 1.0)
    assert len(heap) == 0
    heap.push(0, 2.0)
    heap.push(70_000, 1.0)  # keys need not be dense
    assert heap.pop() == (1.0, 70_000)
    assert heap.pop() == (2.0, 0)
    assert heap.remove(-1) is False
    assert heap.remove(2**32 + 5) is False


def test_heap_largest_key_with_bounded_memory(core, subprocess_env):
    """Keys below HEAP_KEY_LIMIT are valid; the largest must fit the key index in
    a child whose address space is capped at 1 GiB."""
    code = textwrap.dedent(
        """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from fastbroker import _select
        heap = _select.core.DeadlineHeap()
        from fastbroker.protocol import HEAP_KEY_LIMIT
        heap.push(HEAP_KEY_LIMIT - 1, 1.5)
        heap.push(HEAP_KEY_LIMIT // 2, 0.5)
        assert heap.pop() == (0.5, HEAP_KEY_LIMIT // 2), "order"
        assert heap.pop() == (1.5, HEAP_KEY_LIMIT - 1), "order"
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_heap_randomized_model(core):
    """Seeded random push/replace/remove/pop/peek compared with a dict model."""
    rng = random.Random(4242)
    heap = core.DeadlineHeap()
    model: dict = {}
    used_deadlines: set = set()

    def fresh_deadline() -> float:
        # Distinct deadlines, so the expected pop order is unambiguous.
        while True:
            d = rng.uniform(-1000.0, 1000.0)
            if d not in used_deadlines:
                used_deadlines.add(d)
                return d

    for step in range(10_000):
        op = rng.random()
        key = rng.randrange(2_000)
        if op < 0.5:
            d = fresh_deadline()
            heap.push(key, d)
            model[key] = d
        elif op < 0.7:
            assert heap.remove(key) is (model.pop(key, None) is not None), f"step {step}"
        elif op < 0.85:
            if model:
                k = min(model, key=model.__getitem__)
                assert heap.pop() == (model.pop(k), k), f"step {step}"
            else:
                with pytest.raises(IndexError):
                    heap.pop()
        else:
            expected = None
            if model:
                k = min(model, key=model.__getitem__)
                expected = (model[k], k)
            assert heap.peek() == expected, f"step {step}"
        assert len(heap) == len(model), f"step {step}"
    expected = sorted((d, k) for k, d in model.items())
    assert [heap.pop() for _ in range(len(expected))] == expected
    assert heap.peek() is None


def test_heap_many_with_removals_sorted(core):
    rng = random.Random(99)
    heap = core.DeadlineHeap()
    deadlines = rng.sample(range(1_000_000), 10_000)
    for key, d in enumerate(deadlines):
        heap.push(key, d / 1000.0)
    removed = set(rng.sample(range(10_000), 5_000))
    for key in removed:
        assert heap.remove(key)
    assert len(heap) == 5_000
    expected = sorted((deadlines[k] / 1000.0, k) for k in range(10_000) if k not in removed)
    assert [heap.pop() for _ in range(5_000)] == expected
    assert len(heap) == 0


# ---------------------------------------------------------------------------
# RequestTable
# ---------------------------------------------------------------------------

EPOCH = b"EPOCH\x00\x01\xff"


def test_table_ids_shape(core):
    table = core.RequestTable(EPOCH)
    ids = [table.add() for _ in range(100)]
    for task_id in ids:
        assert isinstance(task_id, bytes)
        assert len(task_id) == TASK_ID_SIZE == 16
        assert task_id[:8] == EPOCH
        assert task_id in table
    assert len(set(ids)) == 100
    assert len(table) == 100


def test_table_epoch_keyword(core):
    table = core.RequestTable(epoch=EPOCH)
    assert table.add()[:8] == EPOCH


def test_table_default_epoch_random_and_shared(core):
    a = core.RequestTable()
    b = core.RequestTable()
    ids_a = [a.add() for _ in range(5)]
    ids_b = [b.add() for _ in range(5)]
    assert len({i[:8] for i in ids_a}) == 1
    assert len({i[:8] for i in ids_b}) == 1
    # Two tables (two brokers) have different epochs: 2**-64 odds of a clash.
    assert ids_a[0][:8] != ids_b[0][:8]
    for task_id in ids_a:
        assert task_id not in b
        assert b.discard(task_id) is False
    assert len(b) == 5


@pytest.mark.parametrize("epoch", [b"", b"1234567", b"123456789"])
def test_table_bad_epoch(core, epoch):
    with pytest.raises(ValueError):
        core.RequestTable(epoch)


def test_table_discard(core):
    table = core.RequestTable(EPOCH)
    a, b = table.add(), table.add()
    assert len(table) == 2
    assert table.discard(a) is True
    assert a not in table
    assert b in table
    assert len(table) == 1
    assert table.discard(a) is False
    assert len(table) == 1
    assert table.discard(b) is True
    assert len(table) == 0


def test_table_discarded_id_stays_invalid_after_reuse(core):
    table = core.RequestTable(EPOCH)
    keep = table.add()
    seen = {keep}
    dead: list = []
    current = table.add()
    for _ in range(1_000):
        assert table.discard(current)
        dead.append(current)
        current = table.add()  # an implementation may reuse the freed slot
        assert current not in seen
        seen.add(current)
        assert current in table
        assert len(table) == 2
    for task_id in dead:
        assert task_id not in table
        assert table.discard(task_id) is False
    assert keep in table and current in table
    assert len(table) == 2


def test_table_malformed_ids_not_contained(core):
    table = core.RequestTable(EPOCH)
    task_id = table.add()
    foreign = b"OTHEREPO" + task_id[8:]
    candidates = [
        b"",
        task_id[:15],
        task_id + b"\x00",
        task_id[:8],
        task_id[8:],
        foreign,
        bytes(16),
        b"\xff" * 16,
        EPOCH + b"\xff" * 8,
    ]
    for bad in candidates:
        assert bad not in table, bad
        assert table.discard(bad) is False, bad
    assert task_id in table
    assert len(table) == 1


def test_table_randomized_model(core):
    rng = random.Random(777)
    table = core.RequestTable(EPOCH)
    live: list = []  # model: live ids (swap-remove keeps it O(1))
    dead: list = []
    seen: set = set()
    for step in range(10_000):
        op = rng.random()
        if op < 0.5 or not live:
            task_id = table.add()
            assert len(task_id) == 16 and task_id[:8] == EPOCH
            assert task_id not in seen, f"step {step}: id reused"
            seen.add(task_id)
            live.append(task_id)
        elif op < 0.85:
            if dead and rng.random() < 0.1:
                assert table.discard(rng.choice(dead)) is False, f"step {step}"
            else:
                i = rng.randrange(len(live))
                task_id = live[i]
                live[i] = live[-1]
                live.pop()
                assert table.discard(task_id) is True, f"step {step}"
                dead.append(task_id)
        else:
            if dead and rng.random() < 0.5:
                assert rng.choice(dead) not in table, f"step {step}"
            else:
                assert rng.choice(live) in table, f"step {step}"
        assert len(table) == len(live), f"step {step}"
    for task_id in dead:
        assert task_id not in table
    for task_id in live:
        assert task_id in table


# ---------------------------------------------------------------------------
# RequestIds (the FBC01 request-id index)
# ---------------------------------------------------------------------------


def test_ids_basic(core):
    ids = core.RequestIds()
    key = bytes(range(16))
    assert ids.get(key) is None and len(ids) == 0
    ids.insert(key, 7)
    assert ids.get(key) == 7 and len(ids) == 1
    with pytest.raises(KeyError):
        ids.insert(key, 8)
    assert ids.delete(key) is True
    assert ids.delete(key) is False
    assert ids.get(key) is None and len(ids) == 0
    for bad in (b"", b"x" * 15, b"x" * 17):
        with pytest.raises(ValueError):
            ids.get(bad)


def test_ids_randomized_model_through_growth(core):
    """30,000 seeded operations against a dict: ids that differ in one byte, sequential
    counters and random ids, with deletes and lookups while the table grows."""
    rng = random.Random(20261128)
    ids = core.RequestIds(seed=12345)
    model: dict = {}
    pool = (
        [i.to_bytes(16, "big") for i in range(3000)]
        + [bytes(15) + bytes([b]) for b in range(256)]
        + [rng.randbytes(16) for _ in range(3000)]
    )
    saw_growing = False
    for step in range(30_000):
        key = rng.choice(pool)
        op = rng.random()
        if op < 0.55:
            if key in model:
                with pytest.raises(KeyError):
                    ids.insert(key, 1)
            else:
                value = rng.randrange(2**32)
                ids.insert(key, value)
                model[key] = value
        elif op < 0.75:
            assert ids.delete(key) is (model.pop(key, None) is not None), f"step {step}"
        else:
            assert ids.get(key) == model.get(key), f"step {step}"
        assert len(ids) == len(model), f"step {step}"
        saw_growing = saw_growing or ids.growing
    for key in pool:
        assert ids.get(key) == model.get(key)
    if core.__name__.endswith("_core"):
        assert saw_growing, "the compiled index never grew in steps"


def test_ids_growth_is_spread_over_inserts(core):
    """While a grown table takes over, every id stays findable; the move ends within
    a bounded number of inserts."""
    ids = core.RequestIds()
    keys = [i.to_bytes(16, "little") for i in range(20_000)]
    longest = 0
    run = 0
    for n, key in enumerate(keys):
        ids.insert(key, n)
        run = run + 1 if ids.growing else 0
        longest = max(longest, run)
        if n % 997 == 0:
            assert all(ids.get(k) == i for i, k in enumerate(keys[: n + 1]))
    assert all(ids.get(k) == i for i, k in enumerate(keys))
    # 8 old buckets move per insert: a table of c buckets is emptied in c / 8 inserts.
    assert longest <= 32_768 // 8 + 1
    for i, key in enumerate(keys):
        if i % 3:
            assert ids.delete(key)
    assert len(ids) == len(keys[::3])
    assert all(ids.get(k) == (i if i % 3 == 0 else None) for i, k in enumerate(keys))


# ---------------------------------------------------------------------------
# The queues' FIFO (the compiled core's Ring: a list of fixed-size blocks) across
# growth: order kept exactly with 100,000+ entries, while the front moves on too
# ---------------------------------------------------------------------------


def test_idle_fifo_order_across_growth(core):
    """IdleWorkers' FIFO through many ring blocks, with tombstones (removed and
    re-pushed workers) and pops interleaved with pushes."""
    rng = random.Random(77)
    idle = core.IdleWorkers()
    model: OrderedDict[bytes, None] = OrderedDict()
    serial = 0
    for round_size in (60_000, 1, 255, 256, 50_000, 3):
        for _ in range(round_size):
            address = b"w%07d" % serial
            serial += 1
            idle.push(address)
            model[address] = None
        for address in rng.sample(list(model), min(len(model), round_size // 10)):
            assert idle.remove(address) is True
            del model[address]
            if rng.random() < 0.5:  # back in, at the back
                idle.push(address)
                model[address] = None
        for _ in range(len(model) // 3):
            assert idle.pop() == model.popitem(last=False)[0]
        assert len(idle) == len(model)
    assert serial > 100_000
    while model:
        assert idle.pop() == model.popitem(last=False)[0]
    assert idle.pop() is None
    assert len(idle) == 0


def test_queued_jobs_keep_fifo_order_across_growth(core, ctx):
    """More than 100,000 queued REQ requests are dispatched in exactly the order they
    came, while the queue grows behind a front that has moved on."""
    import zmq

    from fastbroker.protocol import DROP_REASONS

    sockets = []

    def sock(kind):
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        sockets.append(s)
        return s

    requests, workers, answers = sock(zmq.ROUTER), sock(zmq.ROUTER), sock(zmq.PULL)
    requests.setsockopt(zmq.ROUTER_MANDATORY, 1)
    workers.setsockopt(zmq.ROUTER_MANDATORY, 1)
    requests.bind("inproc://fifo-requests")
    workers.bind("inproc://fifo-workers")
    answers.bind("inproc://fifo-answers")
    broker = core.BrokerCore(requests, workers, answers)
    client, worker = sock(zmq.DEALER), sock(zmq.DEALER)
    client.connect("inproc://fifo-requests")
    worker.connect("inproc://fifo-workers")
    sent = [0]
    received = [0]

    def run_until(key, target):
        deadline = time.monotonic() + 60.0
        while broker.stats()[key] < target:
            broker.run(-1, 0)
            assert time.monotonic() < deadline, broker.stats()

    def enqueue(n):
        for _ in range(n):
            client.send_multipart([b"", b"%d" % sent[0]], zmq.DONTWAIT)
            sent[0] += 1
        run_until("requests", sent[0])

    def dispatch(n):
        # One worker socket, n distinct idle workers behind it (a hop frame each, as
        # behind a proxy): a second "ready" from one address would replace the first.
        base = broker.stats()["dispatched"]
        for j in range(base, base + n):
            worker.send_multipart([b"hop-%d" % j, b"", b"ready"], zmq.DONTWAIT)
        run_until("dispatched", base + n)
        for _ in range(n):
            frames = worker.recv_multipart()
            assert len(frames) == 4 and frames[1] == b"", frames
            assert frames[3] == b"%d" % received[0], (frames[3], received[0])
            received[0] += 1

    try:
        enqueue(100_000)
        assert broker.stats()["queued"] == 100_000
        dispatch(40_000)
        enqueue(60_000)  # the queue grows while its front is 40,000 entries in
        assert broker.stats()["queued"] == 120_000
        dispatch(120_000)
        stats = broker.stats()
        assert received[0] == sent[0] == 160_000
        assert stats["queued"] == 0 and stats["running"] == 160_000, stats
        assert stats["dropped"] == 0, {r: n for r, n in stats["drops"].items() if r in DROP_REASONS}
    finally:
        broker.close()
        for s in sockets:
            s.close(linger=0)
