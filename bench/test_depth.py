"""Per-operation cost of the core at queue depths 10, 10,000 and 1,000,000 (issue 6).

A core is pre-filled with D queued REQ-protocol requests ("depth D"), then each
round times a batch of B operations *on top of* that depth and puts the core back
to exactly D queued, running 0, so every round (and the next operation) starts from
the same state. B = FASTBROKER_DEPTH_BATCH (default 1000); per-operation cost =
round time / B (``python -m bench.depth_table FILE.json`` prints that table).

| operation | set-up (not timed)                                         | timed                                    | after the round (not timed) |
|-----------|------------------------------------------------------------|------------------------------------------|-----------------------------|
| enqueue   | a DEALER client has sent B requests [b"", payload]         | core takes them in: D -> D+B queued      | B dispatched + answered     |
| dispatch  | B more requests queued (D+B); B hop workers sent ready     | ready handling + B jobs sent: D+B -> D   | the B jobs answered         |
| answer    | B more queued and dispatched; B answers [id, ok] waiting   | B answers matched, forwarded: B -> 0 running | client drained          |
| cancel    | B FBC01 SUBMITs (OPT_NO_ACK) queued behind D; B CANCELs waiting | B queued requests cancelled, CANCELLED sent | client drained     |
| expire    | B more queued, dispatched (tries=1), deadlines passed      | B expiries: abort + empty answer         | client drained              |

Dispatch takes the *oldest* queued requests, so the pre-filled ones rotate through;
only the counts matter. ``expire`` uses its own pre-filled core (a short attempt
timeout, tries=1); the others share one with a 3600 s timeout and retention 0 (a
cancelled request's outcome is not kept, so the broker's state does not grow).

One pre-filled core per (core, depth, kind) is kept alive across the operations
that use it and closed when the next one is built (at most one at a time: the pure
core at 10^6 holds ~1-2 GB). The pre-fill time is reported in ``extra_info``
(``prefill_s``). FASTBROKER_DEPTH_PURE_MAX (default 1,000,000) skips the pure core
above that depth; FASTBROKER_DEPTH_DEPTHS (comma-separated) changes the depths.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Dict, List, Optional, Tuple

import pytest
import zmq

from fastbroker import protocol

from bench.conftest import Rig, _core, _core_py, _env_int

BATCH = _env_int("FASTBROKER_DEPTH_BATCH", 1000)
ROUNDS = _env_int("FASTBROKER_DEPTH_ROUNDS", 10)
PURE_MAX = _env_int("FASTBROKER_DEPTH_PURE_MAX", 1_000_000)
DEPTHS = [int(d) for d in os.environ.get("FASTBROKER_DEPTH_DEPTHS", "10,10000,1000000").split(",") if d.strip()]
OPS = ["enqueue", "dispatch", "answer", "cancel", "expire"]
LONG_TIMEOUT = 3600.0
EXPIRE_TIMEOUT = {"compiled": 0.3, "pure": 2.0}  # must outlast a set-up's dispatch phase
HOP_SOCKETS = 16
FILL_CHUNK = 50_000
NO_ACK_OPTIONS = bytes([protocol.OPT_NO_ACK]) + bytes(protocol.OPTIONS_SIZE - 1)  # default timeout and tries


def _module(name: str):
    if name == "compiled":
        if _core is None:
            pytest.fail("the compiled core fastbroker._core did not import")
        return _core
    return _core_py


class DepthRig:
    """A Rig whose core holds `depth` queued requests, with the peers every
    operation needs: a REQ-protocol client (DEALER), an FBC01 client (DEALER),
    16 hop-worker DEALERs and an answer PUSH."""

    def __init__(self, core_name: str, depth: int, kind: str) -> None:
        self.core_name, self.depth, self.kind = core_name, depth, kind
        module = _module(core_name)
        if kind == "expire":
            timeout, tries = EXPIRE_TIMEOUT[core_name], 1
        else:
            timeout, tries = LONG_TIMEOUT, None
        self.timeout = timeout
        self.rig = rig = Rig(module, timeout=timeout, tries=tries)
        try:
            # The same core, but keeping no outcome (cancel must not grow the broker).
            rig.core.close()
            rig.core = module.BrokerCore(rig.requests, rig.workers, rig.answers, timeout, tries, retention=0.0)
            self.client = rig.client()
            self.fbc = rig._socket(zmq.DEALER)
            self.fbc.setsockopt(zmq.ROUTING_ID, b"fbc01-client")
            self.fbc.connect(rig.REQUESTS)
            self.workers = rig.add_workers(HOP_SOCKETS, ready=False)
            self.push = rig.pusher()
            self.serial = 0
            t0 = time.perf_counter()
            done = 0
            while done < depth:
                chunk = min(FILL_CHUNK, depth - done)
                self.fill(chunk)
                done += chunk
            self.prefill_s = time.perf_counter() - t0
            self.check_base()
        except BaseException:
            rig.close()
            raise

    # -- helpers (never timed) -----------------------------------------------------

    def stats(self) -> dict:
        return self.rig.core.stats()

    def check_base(self) -> dict:
        s = self.stats()
        assert s["queued"] == self.depth and s["running"] == 0 and s["idle_workers"] == 0, s
        assert s["dropped"] == 0 and s["unreachable_workers"] == 0, s
        return s

    def send_requests(self, n: int) -> None:
        self.rig.send_requests(self.client, n)

    def fill(self, n: int) -> None:
        base = self.stats()["requests"]
        self.send_requests(n)
        self.rig.run_until("requests", base + n)

    def send_ready(self, n: int) -> None:
        ws = self.workers
        for j in range(n):
            ws[j % HOP_SOCKETS].send_multipart([b"hop-%06d" % j, b"", Rig.READY], zmq.DONTWAIT)

    def take_jobs(self, n: int) -> List[bytes]:
        """The task ids of the n jobs just sent to hop workers 0..n-1."""
        ids = []
        for i, w in enumerate(self.workers[: min(n, HOP_SOCKETS)]):
            count = len(range(i, n, HOP_SOCKETS))
            for frames in self.rig.recv_exactly(w, count):
                assert len(frames) == 4 and frames[1] == b"", frames
                ids.append(frames[2])
        assert len(ids) == n and len(set(ids)) == n
        return ids

    def send_answers(self, ids: List[bytes]) -> None:
        for task_id in ids:
            self.push.send_multipart([task_id, Rig.ANSWER], zmq.DONTWAIT)

    def drain(self, sock: zmq.Socket, n: int) -> List[list]:
        return self.rig.recv_exactly(sock, n)

    def dispatch(self, n: int) -> List[bytes]:
        base = self.stats()["dispatched"]
        self.send_ready(n)
        self.rig.run_until("dispatched", base + n)
        return self.take_jobs(n)

    def answer_all(self, ids: List[bytes]) -> None:
        base = self.stats()["answered"]
        self.send_answers(ids)
        self.rig.run_until("answered", base + len(ids))
        for frames in self.drain(self.client, len(ids)):
            assert frames == [b"", Rig.ANSWER], frames

    def fbc_ids(self, n: int) -> List[bytes]:
        start = self.serial
        self.serial += n
        return [b"bench-id%08d" % i for i in range(start, start + n)]

    def close(self) -> None:
        self.rig.close()


_current: Dict[str, Optional[DepthRig]] = {"rig": None}


def _depth_rig(core_name: str, depth: int, kind: str) -> DepthRig:
    rig = _current["rig"]
    if rig is not None and (rig.core_name, rig.depth, rig.kind) == (core_name, depth, kind):
        return rig
    if rig is not None:
        rig.close()
        _current["rig"] = None
        gc.collect()
    rig = _current["rig"] = DepthRig(core_name, depth, kind)
    return rig


@pytest.fixture(scope="module", autouse=True)
def _close_last_rig():
    yield
    if _current["rig"] is not None:
        _current["rig"].close()
        _current["rig"] = None


def _cases() -> List[Tuple[str, int, str]]:
    cases = []
    for core_name in ("compiled", "pure"):
        for depth in DEPTHS:
            for op in OPS:  # the shared-rig operations first, expire (its own rig) last
                marks = ()
                if core_name == "pure" and depth > PURE_MAX:
                    marks = pytest.mark.skip(reason=f"pure core capped at depth {PURE_MAX} (FASTBROKER_DEPTH_PURE_MAX)")
                cases.append(pytest.param(core_name, depth, op, marks=marks, id=f"{core_name}-{depth}-{op}"))
    return cases


@pytest.mark.parametrize("core,depth,op", _cases())
def test_depth(benchmark, core, depth, op):
    """B operations `op` on top of `depth` queued requests (see the module docstring)."""
    b = BATCH
    benchmark.group = f"depth {op}"
    d = _depth_rig(core, depth, "expire" if op == "expire" else "main")
    run_until = d.rig.run_until

    if op == "enqueue":

        def setup():
            base = d.check_base()
            d.send_requests(b)
            return (base,), {}

        def target(base):
            run_until("requests", base["requests"] + b)

        def after(base):
            s = d.stats()
            assert s["queued"] == d.depth + b and s["requests"] == base["requests"] + b, s
            d.answer_all(d.dispatch(b))

    elif op == "dispatch":

        def setup():
            d.check_base()
            d.fill(b)
            base = d.stats()
            d.send_ready(b)
            return (base,), {}

        def target(base):
            run_until("dispatched", base["dispatched"] + b)

        def after(base):
            s = d.stats()
            assert s["running"] == b and s["queued"] == d.depth and s["ready"] == base["ready"] + b, s
            d.answer_all(d.take_jobs(b))

    elif op == "answer":

        def setup():
            d.check_base()
            d.fill(b)
            ids = d.dispatch(b)
            base = d.stats()
            d.send_answers(ids)
            return (base,), {}

        def target(base):
            run_until("answered", base["answered"] + b)

        def after(base):
            s = d.stats()
            assert s["running"] == 0 and s["late_answers"] == 0 and s["timeouts"] == 0, s
            for frames in d.drain(d.client, b):
                assert frames == [b"", Rig.ANSWER], frames

    elif op == "cancel":

        def setup():
            base = d.check_base()
            ids = d.fbc_ids(b)
            send = d.fbc.send_multipart
            for cid in ids:
                send([protocol.CLIENT_SIGNATURE, protocol.C_SUBMIT, cid, NO_ACK_OPTIONS, Rig.PAYLOAD], zmq.DONTWAIT)
            run_until("requests", base["requests"] + b)
            assert d.stats()["queued"] == d.depth + b
            for cid in ids:
                send([protocol.CLIENT_SIGNATURE, protocol.C_CANCEL, cid], zmq.DONTWAIT)
            return (d.stats(), ids), {}

        def target(base, ids):
            run_until("cancelled", base["cancelled"] + b)

        def after(base, ids):
            s = d.stats()
            assert s["queued"] == d.depth and s["retained"] == 0, s
            got = d.drain(d.fbc, b)
            assert [f[2] for f in got] == ids and all(
                f[:2] == [protocol.CLIENT_SIGNATURE, protocol.R_CANCELLED] for f in got
            ), got[:3]

    elif op == "expire":

        def setup():
            d.check_base()
            d.fill(b)
            base = d.stats()
            d.dispatch(b)  # the oldest b requests; their workers' jobs are read (discarded)
            done = d.rig.core_module.monotonic()
            s = d.stats()
            if s["timeouts"] != base["timeouts"]:
                raise AssertionError(f"set-up outlasted the {d.timeout} s attempt timeout: {s}")
            d.rig.sleep_past(done + d.timeout)
            return (d.stats(),), {}

        def target(base):
            run_until("aborted", base["aborted"] + b)

        def after(base):
            s = d.stats()
            assert s["running"] == 0 and s["queued"] == d.depth and s["timeouts"] == base["timeouts"] + b, s
            for frames in d.drain(d.client, b):
                assert frames == [b"", b""], frames

    else:  # pragma: no cover
        raise AssertionError(op)

    # pedantic calls setup before each round; the "after" step of a round runs at the
    # start of the next set-up (and once at the end), so the core is back at depth D.
    pending: List[tuple] = []

    def round_setup():
        if pending:
            after(*pending.pop())
        args, kwargs = setup()
        pending.append(args)
        return args, kwargs

    try:
        benchmark.pedantic(target, setup=round_setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        if pending:
            after(*pending.pop())
    except BaseException:
        # The shared core's state is unknown now: build a fresh one for the next case.
        if _current["rig"] is not None:
            _current["rig"].close()
            _current["rig"] = None
        raise
    d.check_base()
    benchmark.extra_info.update(depth=depth, batch=b, prefill_s=round(d.prefill_s, 3), core=core, op=op)
