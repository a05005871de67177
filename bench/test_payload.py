"""Does the broker core copy payloads? Its own CPU per job at payload 16 B, 1 KiB,
64 KiB and 1 MiB, on the compiled and the pure core (issue 6: "a 1 MiB payload costs
the broker <= 2x the CPU of a 16 B payload (no copies)").

End to end over ipc/tcp every broker, even zmq.proxy, pays the kernel's copies of
each byte through its sockets, so that figure says nothing about the core. Over
**inproc** libzmq hands a message from socket to socket by pointer, so what is left
is the core's own work: a core that never copies a payload (it moves it with
zmq_msg_move, shares it with zmq_msg_copy) costs nearly the same per job whatever
the payload size.

One round, in one thread, on a fresh ``Rig`` (bench/conftest.py: the core's three
sockets on inproc, unlimited high-water marks):

* set-up (not timed): a DEALER client speaking **FBC01** (SUBMIT with OPT_NO_ACK, so
  the replies are exactly one OK per job), WORKERS DEALER workers speaking **FBW01**
  registered with READY(credit N);
* timed: the client keeps up to WINDOW SUBMITs in flight until N are answered; the
  loop alternates ``core.run(-1, 0)`` with the workers answering every TASK with an
  ANSWER that sends the received task-id and payload frames straight back, and the
  client taking its OK replies and topping the window up.

Nothing outside the core copies the payload either: the client sends one pre-made
``zmq.Frame`` (copy=False: libzmq's zmq_msg_init_data on the bytes, whatever the
size) every time, which pyzmq shares (zmq_msg_copy), and the workers receive with
copy=False and send the very same Frame back. So with a core that copies nothing,
every OK reply's answer frame *is* the client's buffer; the fraction of replies for
which that holds is reported ("replies sharing the client's buffer"): a direct
proof, independent of any timing, that no one in the chain copied the bytes. The
exception, by design: frames of 34 B to 8 KiB get a buffer of their own when their
request waits or their answer is kept (docs/ARCHITECTURE.md, "Zero-copy"), so at
1 KiB, where every request waits behind the window, none is shared.

Measured: the round's wall time (the benchmark figure; it includes the Python
driver, ~95 % of it with the compiled core) and, separately, the CPU time of this
thread spent inside ``core.run`` calls only (``time.thread_time_ns`` around each
call, summed): the core's own cost, per job in
``extra_info["core_cpu_us_per_job"]`` (median of the rounds).

The machine is shared: the CPU time of the same work moves by up to 2x for seconds
at a time (other processes on the other vCPU), so two benchmarks run seconds apart
can differ by that much for no reason of their own. Hence each round's set-up (not
timed) first runs a **16 B reference round** on a rig of its own, and the figure
to read is the **paired ratio**: core CPU of the measured round / core CPU of the
reference round just before it, median over the rounds (``paired_ratio_to_16b``;
at 16 B it shows how far two identical adjacent rounds differ). The table printed
at the end of the session (terminal summary) gives it with the plain ratios.

The window (not all N at once) bounds the memory a copying core would need to
WINDOW x payload. The core keeps its default retention, as a user would: FBC01
outcomes are kept (sharing the answer buffer), and from 64 KiB on, once the 64 MiB
retention bound is reached, each new outcome makes it forget the oldest one.

Every reply is checked as it arrives, so no reply is ever held (OK, every id once,
the answer's length and three sampled 64-byte slices equal to the payload's), and
the teardown asserts those results and the core's counters (the set-up does the
same for its reference round), so a broken core fails instead of looking fast.

Sizes: FASTBROKER_PAYLOAD_N [2000] jobs per round, FASTBROKER_PAYLOAD_ROUNDS [5]
measured rounds (plus one warm-up), FASTBROKER_PAYLOAD_WINDOW [500] requests in flight.
About 30 s for both cores and the four sizes with the defaults.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import time
from typing import Dict, List, Tuple

import pytest
import zmq

from fastbroker.protocol import (
    C_SUBMIT,
    CLIENT_SIGNATURE,
    CMD_ANSWER,
    CMD_HEARTBEAT,
    CMD_READY,
    CMD_TASK,
    MAX_CREDIT,
    OPT_NO_ACK,
    R_OK,
    REQUEST_ID_SIZE,
    WORKER_SIGNATURE,
)

from bench.conftest import _env_int
from bench.test_core_ops import _clean, _pedantic

N = _env_int("FASTBROKER_PAYLOAD_N", 2000)
ROUNDS = _env_int("FASTBROKER_PAYLOAD_ROUNDS", 5)
WINDOW = _env_int("FASTBROKER_PAYLOAD_WINDOW", 500)
WORKERS = 2
LONG_TIMEOUT = 3600.0  # no attempt expires during a round
TRIES = 3
ROUND_LIMIT = 60.0  # seconds a round may take before it fails
SAMPLE = 64  # bytes per sampled slice of an answer
NO_ACK_OPTIONS = bytes([OPT_NO_ACK]) + bytes(8)  # default timeout and tries
PAYLOADS = [(16, "16 B"), (1024, "1 KiB"), (64 * 1024, "64 KiB"), (1024 * 1024, "1 MiB")]
BASE_SIZE = PAYLOADS[0][0]


def _address(buffer) -> int:
    """The address of a (writable-exported, as zmq.Frame's is) buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _request_ids(n: int) -> List[bytes]:
    # The index in the last 4 bytes, so a reply's id gives its job back at once.
    return [b"payload-req-" + i.to_bytes(4, "big") for i in range(n)]


class _PayloadTable:
    """A pytest plugin registered by the first benchmark of this module: collects
    each (core, payload) result and prints the table in the terminal summary."""

    def __init__(self) -> None:
        self.rows: Dict[Tuple[str, int], dict] = {}

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        write = terminalreporter.write_line
        terminalreporter.section("core CPU per job vs payload size (bench/test_payload.py)")
        write(
            f"N={N} jobs per round, window {WINDOW}, {WORKERS} FBW01 workers, FBC01 client "
            f"(OPT_NO_ACK), inproc; {ROUNDS} rounds, each after a paired 16 B reference round"
        )
        write("")
        write(
            "| core | payload | core CPU µs/job (median) | min | paired 16 B round µs/job (median) "
            "| / 16 B, paired (median; range) | / 16 B, medians | wall µs/job (median) "
            "| core share of wall | run() calls/round | replies sharing the client's buffer |"
        )
        write("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (core, _size), r in sorted(self.rows.items()):
            base = self.rows.get((core, BASE_SIZE))
            medians = f"{r['cpu'] / base['cpu']:.2f}×" if base else "–"
            write(
                f"| {core} | {r['label']} | {r['cpu']:.2f} | {r['cpu_min']:.2f} | {r['ref']:.2f} "
                f"| {r['paired']:.2f}× ({r['paired_lo']:.2f}–{r['paired_hi']:.2f}) | {medians} "
                f"| {r['wall']:.2f} | {r['cpu'] / r['wall']:.0%} | {r['turns']:.0f} | {r['shared']:.0%} |"
            )
        write("")
        top_size, top_label = PAYLOADS[-1]
        for core in sorted({c for c, _ in self.rows}):
            big = self.rows.get((core, top_size))
            if big is None:
                continue
            verdict = "met" if big["paired"] <= 2.0 else "NOT met"
            line = (
                f"{core}: core CPU per job {top_label} / 16 B = {big['paired']:.2f}× paired "
                f"(rounds {big['paired_lo']:.2f}–{big['paired_hi']:.2f}; target <= 2×: {verdict})"
            )
            base = self.rows.get((core, BASE_SIZE))
            if base:
                line += (
                    f"; {big['cpu'] / base['cpu']:.2f}× medians, "
                    f"{big['cpu_min'] / base['cpu_min']:.2f}× minima of the two benchmarks"
                )
            write(line)


@pytest.fixture(scope="module")
def payload_table(request) -> _PayloadTable:
    # Module scope is set up again for each core's parameter; the table (one plugin,
    # printed once) collects the rows of every core.
    table = request.config.pluginmanager.get_plugin(_PAYLOAD_TABLE)
    if table is None:
        table = _PayloadTable()
        request.config.pluginmanager.register(table, _PAYLOAD_TABLE)
    return table


_PAYLOAD_TABLE = "fastbroker-payload-table"


def _setup_round(rig) -> tuple:
    """The client and the FBW01 workers of a round, the workers registered."""
    client = rig.client()
    workers = rig.add_workers(WORKERS, ready=False)
    credit = min(N, MAX_CREDIT).to_bytes(4, "big")
    for w in workers:
        w.send_multipart([b"", WORKER_SIGNATURE, CMD_READY, credit], zmq.DONTWAIT)
    s = rig.run_until("ready", WORKERS)
    assert s["workers"] == WORKERS and s["queued"] == 0, s
    return client, workers


class Payload:
    """One payload size: the bytes, the pre-made Frame every SUBMIT sends (shared,
    never copied), and where the sampled slices of an answer start."""

    def __init__(self, size: int, label: str) -> None:
        self.size, self.label = size, label
        self.data = random.Random(size).randbytes(size)
        self.frame = zmq.Frame(self.data, copy=False)
        self.address = _address(self.frame)
        self.span = max(1, size - SAMPLE)  # sampled: the head, the tail, one moving per job


def _round(rig, client, workers, payload: Payload, ids: List[bytes]) -> dict:
    """N jobs of `payload` through the core and back; what came back, checked as it
    arrives (so no reply is ever held), and the CPU time spent inside core.run."""
    n = len(ids)
    size, data, span, frame_address = payload.size, payload.data, payload.span, payload.address
    run = rig.core.run
    cpu_clock = time.thread_time_ns
    clock = time.monotonic
    events, pollin, nowait = zmq.EVENTS, zmq.POLLIN, zmq.DONTWAIT
    submit = [CLIENT_SIGNATURE, C_SUBMIT, None, NO_ACK_OPTIONS, payload.frame]
    answer_head = [b"", WORKER_SIGNATURE, CMD_ANSWER]
    seen = bytearray(n)
    bad: list = []
    sent = received = shared = turns = core_ns = 0
    deadline = clock() + ROUND_LIMIT
    # A turn moves up to a window of jobs one step (in, to a worker, back, out), so a
    # few turns per window are needed: 4 * n + 100 bounds the loop in count.
    while received < n and turns < 4 * n + 100 and clock() < deadline:
        while sent < n and sent - received < WINDOW:
            submit[2] = ids[sent]
            client.send_multipart(submit, nowait, copy=False)
            sent += 1
        turns += 1
        t0 = cpu_clock()
        run(-1, 0)
        core_ns += cpu_clock() - t0
        for w in workers:
            for _ in range(n + 1000):  # bounded: at most n TASKs, plus heartbeats
                if not w.get(events) & pollin:
                    break
                frames = w.recv_multipart(nowait, copy=False)
                command = frames[2].bytes if len(frames) >= 3 else b""
                if command == CMD_TASK and len(frames) == 5:
                    # The received task-id and payload Frames go back as they are.
                    w.send_multipart(answer_head + frames[3:], nowait, copy=False)
                elif command != CMD_HEARTBEAT:
                    bad.append(("worker got", [f.bytes[:32] for f in frames]))
        for _ in range(n + 1):
            if not client.get(events) & pollin:
                break
            frames = client.recv_multipart(nowait, copy=False)
            received += 1
            # [FBC01, OK, id, answer]
            if len(frames) != 4 or frames[1].bytes != R_OK or len(frames[2]) != REQUEST_ID_SIZE:
                bad.append(("reply", [f.bytes[:32] for f in frames]))
                continue
            rid = frames[2].bytes
            i = int.from_bytes(rid[-4:], "big")
            if i >= n or seen[i] or rid != ids[i]:
                bad.append(("unexpected id", rid))
                continue
            seen[i] = 1
            body = frames[3]
            if len(body) != size:
                bad.append(("length", i, len(body)))
                continue
            view = body.buffer
            for off in (0, span, (i * 7919) % span):
                if view[off : off + SAMPLE] != data[off : off + SAMPLE]:
                    bad.append(("content", i, off))
                    break
            if _address(body) == frame_address:
                shared += 1
    return dict(
        sent=sent,
        received=received,
        seen=sum(seen),
        shared=shared,
        turns=turns,
        core_ns=core_ns,
        bad=bad[:5],
        n_bad=len(bad),
    )


def _check_round(rig, client, result: dict, n: int) -> None:
    """Every job answered once with its exact payload, and the core agrees."""
    assert result["received"] == n and result["seen"] == n and not result["n_bad"], result
    s = rig.core.stats()
    assert s["requests"] == n and s["dispatched"] == n and s["answered"] == n, s
    assert s["queued"] == 0 and s["running"] == 0 and s["timeouts"] == 0, s
    assert s["rejected"] == 0 and s["duplicates"] == 0 and s["workers_dead"] == 0, s
    _clean(s)
    assert not client.poll(0, zmq.POLLIN), "a reply beyond the n expected"


@pytest.mark.parametrize("size,label", PAYLOADS, ids=[label.replace(" ", "") for _, label in PAYLOADS])
def test_payload_round_trip(benchmark, core, rigs, sizes, payload_table, size, label):
    """N FBC01 jobs of `size` bytes through the core and back (see the module
    docstring); each set-up first runs a 16 B reference round (not timed)."""
    name = "compiled" if core.__name__.endswith("._core") else "pure"
    benchmark.group = f"payload {label}"
    payload = Payload(size, label)
    reference = Payload(*PAYLOADS[0])
    ids = _request_ids(N)
    rounds: List[dict] = []

    def fresh_round() -> tuple:
        rig = rigs(core, timeout=LONG_TIMEOUT, tries=TRIES)
        client, workers = _setup_round(rig)
        return rig, client, workers

    def setup():
        # The paired reference: a 16 B round just before the measured one, so both
        # see (mostly) the same machine. Its rig is closed before the measured one.
        rig, client, workers = fresh_round()
        ref = _round(rig, client, workers, reference, ids)
        _check_round(rig, client, ref, N)
        rig.close()
        rig, client, workers = fresh_round()
        return (rig, client, workers, {"ref_ns": ref["core_ns"]}), {}

    def target(rig, client, workers, result):
        result.update(_round(rig, client, workers, payload, ids))

    def teardown(rig, client, workers, result):
        _check_round(rig, client, result, N)
        rounds.append(result)
        rig.close()

    _pedantic(benchmark, sizes, target, setup, teardown, rounds=ROUNDS)

    measured = rounds[-ROUNDS:] if len(rounds) > ROUNDS else rounds  # without the warm-up
    per_job = [r["core_ns"] / N / 1000.0 for r in measured]
    ref_per_job = [r["ref_ns"] / N / 1000.0 for r in measured]
    paired = [r["core_ns"] / r["ref_ns"] for r in measured]
    info = benchmark.extra_info
    info.update(
        core=name,
        payload=size,
        n=N,
        window=WINDOW,
        workers=WORKERS,
        core_cpu_us_per_job=statistics.median(per_job),
        core_cpu_us_per_job_min=min(per_job),
        core_cpu_us_per_job_rounds=per_job,
        reference_16b_core_cpu_us_per_job_rounds=ref_per_job,
        paired_ratio_to_16b=statistics.median(paired),
        paired_ratio_to_16b_rounds=paired,
        run_calls_per_round=statistics.median(r["turns"] for r in measured),
        shared_fraction=sum(r["shared"] for r in measured) / (N * len(measured)),
    )
    if benchmark.disabled or benchmark.stats is None:
        return
    wall = benchmark.stats.stats.median / N * 1e6
    info["wall_us_per_job"] = wall
    payload_table.rows[(name, size)] = dict(
        label=label,
        cpu=info["core_cpu_us_per_job"],
        cpu_min=info["core_cpu_us_per_job_min"],
        ref=statistics.median(ref_per_job),
        paired=info["paired_ratio_to_16b"],
        paired_lo=min(paired),
        paired_hi=max(paired),
        wall=wall,
        turns=info["run_calls_per_round"],
        shared=info["shared_fraction"],
    )
