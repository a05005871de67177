"""The two cores side by side: the compiled BrokerCore (fastbroker._core) and the pure
one (fastbroker._core_py) get the same random sequences of operations, each on its own
real inproc sockets (rigs.CRig), and must answer each peer the same, in the same
order, with the same counters, events and journal.

A hypothesis state machine plays every peer on both sides at once: REQ clients,
FBC01 clients (SUBMIT with options and repeated ids, STATUS, RESULT, CANCEL, STATS,
the dead-letter's DEAD, REQUEUE and REQUEUE_ALL,
and FBC02 batches of SUBMITs from the same sockets),
FBW01 workers (READY with credit, ANSWER, FAILED, EXTEND, RETURN, HEARTBEAT, DISCONNECT, answers for
task ids they do not hold, unknown or malformed) that may turn FBW02 (READY in FBW02, then
TASKs of several jobs, answered by FBW02 ANSWERs of several records, some of them wrong,
and malformed headers), a worker of the original protocol,
and raw sockets sending malformed or random messages. After each step it runs each
core until it is quiet, and compares what every peer got during the step.

Task ids differ by design (compiled: epoch + slot and generation; pure: epoch + a
counter), so each side names them by the order in which it first sent them: the n-th
distinct task id that core A sent corresponds to the n-th one of core B. Nothing
generated depends on the clock: no per-request or broker timeout, heartbeats an hour
apart and a liveness of 1000 intervals, kept outcomes for 600 s (the memory bound on
them, which is deterministic, is small so that it is reached).

It imports both cores directly (as test_core_api.py does), so it runs once: in the
compiled run; the pure run (FASTBROKER_PURE=1) skips it (the compiled_only marker).
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import pytest
import zmq
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from fastbroker import _core_py, protocol
from fastbroker.client.protocol import decode_dead
from fastbroker.log_records import decode_entries, encode_entries
from fastbroker.protocol import (
    C_CANCEL,
    C_RESULT,
    C_STATS,
    C_STATUS,
    CLIENT_SIGNATURE as CSIG,
    CLIENT_SIGNATURE_V2 as CSIG2,
    CMD_CANCEL,
    CMD_EXTEND,
    CMD_HEARTBEAT,
    CMD_TASK,
    OPT_NO_ACK,
    R_STATS,
    WORKER_SIGNATURE as WSIG,
    WORKER_SIGNATURE_V2 as WSIG2,
    decode_stats,
)
from rigs import EPOCH, CRig, credit_frame, opts, submit_record

pytestmark = pytest.mark.compiled_only(reason="differential test of both cores runs in the compiled run")

HEARTBEAT = 3600.0  # the longest allowed: no worker is ever taken for dead during a test
LIVENESS = 1000
BROKER_TRIES = 3  # so REQ-protocol requests can use up their tries (by FAILED or lost workers)
MAX_QUEUE = 5  # small, so both kinds of requests meet a full queue
RETENTION_BYTES = 400  # two or three kept outcomes (128 bytes each plus the answer), then the oldest go

N_REQ, N_FBC, N_FBW = 2, 3, 3
REQUEST_IDS = [b"rid-%02d----------" % i for i in range(6)]  # 16 bytes, not EPOCH-prefixed
UNKNOWN_TASK = EPOCH + b"\xff" * 8  # the right size and epoch, no such task in either core
FOREIGN_TASK = b"OTHEREPO" + b"\x00" * 8  # another broker's epoch
QUIET_TURNS = 3
"""Turns of the core (run with max_wait 0) that change nothing, after which a step is over."""
MAX_TURNS = 200
"""Bound of the turns of one step (a step that never goes quiet fails)."""
FINISHED_AT = 1234.5
"""The time the log records of a finish are stamped with (journal_encode)."""
SHRINK_SECONDS = 60
"""Bound of the shrinking of a difference found (monkeypatched into hypothesis, which
documents MAX_SHRINKING_SECONDS as meant for that)."""
LATENCY_FIELDS = tuple(f for f in protocol.stats_fields() if f.startswith("latency_"))

payload = st.lists(st.sampled_from([b"a", b"bb", b"", b"payload", b"\x00\xff"]), min_size=1, max_size=3)
answer_frames = st.lists(st.sampled_from([b"ok", b"", b"answer", b"x" * 100]), min_size=1, max_size=2)
options = st.one_of(
    st.just(b""),
    st.tuples(st.sampled_from([0, OPT_NO_ACK]), st.integers(0, 3)).map(lambda ft: opts(ft[0], 0, ft[1])),
    # Rejected: a wrong length, an unknown flag.
    st.sampled_from([b"\x00" * 5, opts(0x80, 0, 0)]),
)
# Malformed or random messages at each endpoint. Nothing here may start with the FBC01
# signature (a random SUBMIT could ask for a timeout, which would make the outcome
# depend on the clock); the known-bad forms are those of test_core_loop's and the
# protocol tests' lists.
junk_frame = st.one_of(
    st.binary(max_size=6),
    st.sampled_from(
        [
            b"",
            WSIG,
            b"ready",
            b"\x01",
            b"\x02",
            b"\x03",
            b"\x04",
            b"\x05",
            b"\x06",
            b"\x09",
            (1).to_bytes(4, "big"),
            UNKNOWN_TASK,
            FOREIGN_TASK,
            b"short",
        ]
    ),
)
junk = st.lists(junk_frame, min_size=1, max_size=5).filter(lambda frames: frames[0] != CSIG)
client_junk = st.sampled_from(
    [
        [CSIG],  # no command
        [CSIG, b"\x09", REQUEST_IDS[0]],  # unknown command
        [CSIG, C_STATUS, b"short"],  # bad id
        [CSIG, C_STATUS, REQUEST_IDS[0], b"extra"],  # wrong frames
        [CSIG, C_STATS, REQUEST_IDS[0], b"extra"],
        [CSIG, protocol.C_SUBMIT, REQUEST_IDS[1]],  # no options, no payload
        [CSIG, protocol.C_SUBMIT, REQUEST_IDS[1], b""],  # no payload
        [CSIG2],  # FBC02 without a command
        [CSIG2, b"\x02", submit_record(REQUEST_IDS[1], 1), b"p"],  # unknown command
        [CSIG2, protocol.C_SUBMIT, submit_record(REQUEST_IDS[1], 2), b"p"],  # header and frames disagree
        [CSIG2, protocol.C_SUBMIT, b"\x00" * 20, b"p"],  # not a whole record
    ]
)
# FBC02 records: (id, flags, tries, payload); flags 0x80 is unknown (REJECTED alone).
batch_job = st.tuples(st.sampled_from(REQUEST_IDS), st.sampled_from([0, OPT_NO_ACK, 0x80]), st.integers(0, 3), payload)
# What a durable store gives back at start: restore_request(id, payload, timeout, tries,
# attempts) and restore_outcome(id, code, body, attempts, tries, age), with ids that
# may repeat (refused: ValueError) and outcomes too big to keep.
restore = st.one_of(
    st.tuples(
        st.just("restore_request"),
        st.tuples(st.sampled_from(REQUEST_IDS), payload, st.none(), st.sampled_from([-1, 1, 2, 3]), st.integers(0, 2)),
    ),
    st.tuples(
        st.just("restore_outcome"),
        st.tuples(
            st.sampled_from(REQUEST_IDS),
            st.sampled_from([protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED]),
            st.sampled_from([[b"ok"], [b"E", b"m"], [], [b"y" * 300]]),
            st.integers(0, 3),
            st.sampled_from([-1, 1, 3]),
            st.sampled_from([0.0, 5.0]),
        ),
    ),
)
worker_junk = st.sampled_from(
    [
        [b"", WSIG],  # no command
        [b"", WSIG, b"\x7f"],  # unknown command
        [b"", WSIG, protocol.CMD_READY],  # no credit
        [b"", WSIG, protocol.CMD_READY, b"\x00\x00\x01"],  # short credit
        [b"", WSIG, protocol.CMD_READY, (protocol.MAX_CREDIT + 1).to_bytes(4, "big")],
        [b"", WSIG, protocol.CMD_ANSWER, UNKNOWN_TASK],  # no answer frame
        [b"", WSIG, protocol.CMD_FAILED, UNKNOWN_TASK, b"only a type"],
        [b"", WSIG, CMD_HEARTBEAT, b"extra"],
        [b"", WSIG, CMD_CANCEL, UNKNOWN_TASK],  # a broker-to-worker command
    ]
)


class Side:
    """One core under test: a CRig on its own inproc endpoints (with the settings above)
    and the same named peers, made in the same order on both sides."""

    def __init__(self, name: str, core_module, ctx: zmq.Context, journal: bool) -> None:
        self.name = name
        self.rig = CRig(
            core_module,
            ctx,
            None,
            BROKER_TRIES,
            heartbeat=HEARTBEAT,
            liveness=LIVENESS,
            retention_bytes=RETENTION_BYTES,
            max_queue=MAX_QUEUE,
        )
        self.core = self.rig.core
        self.core.record_events(True)
        self.journal = journal
        self.core.journal(journal)
        rig = self.rig
        # Explicit identities: the ROUTERs would otherwise number their peers from a random start.
        self.req = [rig.client(zmq.REQ, b"req-%d" % i) for i in range(N_REQ)]
        self.fbc = [rig.fbclient(b"fbc-%d" % i) for i in range(N_FBC)]
        self.fbw = [rig.dealer(b"fbw-%d" % i, live=False) for i in range(N_FBW)]
        self.old = rig.worker(zmq.DEALER, b"old-0")  # a worker of the original protocol on a DEALER
        self.junk_client = rig.client(zmq.DEALER, b"junk-c")
        self.junk_worker = rig.worker(zmq.DEALER, b"junk-w")
        self.pusher = rig.pusher
        self.task_ids: List[bytes] = []  # raw task ids, in the order this core first sent them
        self._index: Dict[bytes, int] = {}

    # -- task ids --------------------------------------------------------------------

    def name_frame(self, frame: bytes):
        """A task id (16 bytes, this broker's epoch) as ("task", n); other frames as they are."""
        if len(frame) == protocol.TASK_ID_SIZE and frame[:8] == EPOCH:
            if frame == UNKNOWN_TASK:
                return ("task", "unknown")
            if frame not in self._index:
                self._index[frame] = len(self.task_ids)
                self.task_ids.append(frame)
            return ("task", self._index[frame])
        return frame

    def raw_task(self, which) -> bytes:
        """The raw id of a task named ("task", n) or one of the special ids."""
        if which == "unknown":
            return UNKNOWN_TASK
        if which == "foreign":
            return FOREIGN_TASK
        return self.task_ids[which]

    # -- one step ----------------------------------------------------------------------

    def peers(self) -> List[Tuple[str, zmq.Socket]]:
        return (
            [(f"req-{i}", s) for i, s in enumerate(self.req)]
            + [(f"fbc-{i}", c.sock) for i, c in enumerate(self.fbc)]
            + [(f"fbw-{i}", w.sock) for i, w in enumerate(self.fbw)]
            + [("old-0", self.old), ("junk-c", self.junk_client), ("junk-w", self.junk_worker)]
        )

    def _collect(self, got: Dict[str, list]) -> int:
        n = 0
        for name, sock in self.peers():
            for _ in range(10_000):
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # poll(0), cheaper
                    break
                frames = sock.recv_multipart(zmq.NOBLOCK)
                # Broker heartbeats follow the clock, not the operations: left out.
                if frames == [b"", WSIG, CMD_HEARTBEAT] or frames == [b"", WSIG2, CMD_HEARTBEAT]:
                    continue
                named = [self.name_frame(f) for f in self._dead_reply(self._stats_reply(frames))]
                if frames[1:3] == [WSIG2, CMD_TASK]:
                    named[-1] = self._task_header(frames[-1])
                got.setdefault(name, []).append(named)
                n += 1
        return n

    def _task_header(self, header: bytes) -> tuple:
        """An FBW02 TASK's header as ((("task", n), payload frames), ...)."""
        return tuple(
            (self.name_frame(header[at : at + 16]), int.from_bytes(header[at + 16 : at + 18], "big"))
            for at in range(0, len(header), 18)
        )

    @staticmethod
    def _dead_reply(frames: list) -> list:
        """A DEAD reply decoded, each record's age left out (a matter of the clock)."""
        if len(frames) >= 3 and frames[0] == CSIG and frames[1] == protocol.R_DEAD:
            dead = decode_dead(frames[3:])
            assert dead is not None, frames
            return frames[:3] + [(dead.total, tuple(d._replace(age=None) for d in dead.requests))]
        return frames

    @staticmethod
    def _stats_reply(frames: list) -> list:
        """A STATS reply with its values decoded, less the latency histogram (the
        latency of each answer is a matter of the clock)."""
        if len(frames) == 5 and frames[0] == CSIG and frames[1] == R_STATS:
            figures = decode_stats(frames[3], frames[4])
            return frames[:3] + [{k: v for k, v in figures.items() if k not in LATENCY_FIELDS}]
        return frames

    def stats(self) -> dict:
        """stats() less "latency" (times of answers: the clock's, not the operations')."""
        stats = self.core.stats()
        del stats["latency"]
        return stats

    def run_until_quiet(self) -> dict:
        """Run the core until QUIET_TURNS turns change nothing; what the step did:
        every peer's messages, the events, the journal, the counters and gauges."""
        got: Dict[str, list] = {}
        events: list = []
        journal: list = []
        quiet = 0
        before = self.stats()
        for turn in range(MAX_TURNS):
            self.core.run(-1, 0.0)
            changed = 0
            if self.journal:
                if turn % 2:
                    entries = self.core.journal_take()
                else:
                    # The log store's records of the turn: they must read back as the
                    # entries and be the bytes log_records writes for them.
                    blob = self.core.journal_encode(FINISHED_AT)
                    entries = decode_entries(blob)
                    assert encode_entries(entries, FINISHED_AT) == blob, f"{self.name} core's records"
                journal += [self._journal_entry(e) for e in entries]
                changed += len(entries) + self.core.release_held()
            changed += self._collect(got)
            new_events = self.core.events()
            events += [(kind, self.name_frame(data), n) for kind, data, n in new_events]
            changed += len(new_events)
            after = self.stats()
            changed += after != before
            before = after
            quiet = 0 if changed else quiet + 1
            if quiet >= QUIET_TURNS:
                break
        else:
            pytest.fail(f"{self.name} core: not quiet after {MAX_TURNS} turns")
        return {"replies": got, "events": events, "journal": journal, "stats": before}

    def _journal_entry(self, entry: tuple) -> tuple:
        return tuple([self.name_frame(f) for f in x] if isinstance(x, list) else x for x in entry)

    def close(self) -> None:
        self.rig.close()


def _flat(step: dict) -> dict:
    """One dict of what a step did, for a readable diff: "to PEER", "events",
    "journal", "stats.NAME"."""
    flat = {f"to {peer}": messages for peer, messages in sorted(step["replies"].items())}
    flat["events"] = step["events"]
    flat["journal"] = step["journal"]
    flat.update({f"stats.{k}": v for k, v in step["stats"].items()})
    return flat


class TwoCores(RuleBasedStateMachine):
    """Every rule does the same thing on both sides, then `step_done` runs both cores
    until quiet and asserts that they did the same. The model (which REQ client waits,
    which tasks each worker holds) is read from what both sides did, once they agree."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = zmq.Context()
        self.sides: List[Side] = []
        self.req_waiting = [False] * N_REQ
        self.held: Dict[str, List[int]] = {f"fbw-{i}": [] for i in range(N_FBW)}
        self.held["old-0"] = []
        self.steps = 0

    @initialize(
        journal=st.booleans(),
        restored=st.lists(restore, max_size=4),
        credits=st.lists(st.none() | st.integers(0, 3), min_size=N_FBW, max_size=N_FBW),
    )
    def start(self, journal: bool, restored: list, credits: List[Optional[int]]) -> None:
        """Both cores (with the durable store's journal on or off), what a store would
        give back at start (requests and outcomes, some refused), and the FBW01 workers
        that have a credit registered with it (so that jobs run from the first steps)."""
        compiled = importlib.import_module("fastbroker._core")
        self.sides = [Side("compiled", compiled, self.ctx, journal), Side("pure", _core_py, self.ctx, journal)]
        for method, args in restored:
            results = []
            for side in self.sides:
                try:
                    results.append(getattr(side.core, method)(*args))
                except ValueError as exc:
                    results.append(f"ValueError: {exc}")
            assert results[0] == results[1], (method, args, results)
        self.step_done()
        for w, credit in enumerate(credits):
            if credit is not None:
                self.fbw_ready(w, credit)

    def teardown(self) -> None:
        for side in self.sides:
            side.close()
        self.ctx.destroy(linger=0)

    # -- after every rule --------------------------------------------------------------

    def step_done(self) -> None:
        compiled, pure = (side.run_until_quiet() for side in self.sides)
        assert _flat(compiled) == _flat(pure), "the compiled core (left) and the pure core (right) differ"
        self.steps += 1
        for peer, messages in compiled["replies"].items():
            if peer.startswith("req-"):
                self.req_waiting[int(peer[4:])] = False
            for m in messages:
                if peer.startswith("fbw-") and m[1:3] == [WSIG2, CMD_TASK]:
                    self.held[peer] += [task[1] for task, _ in m[-1]]
                elif peer.startswith("fbw-") and m[2] == CMD_TASK:
                    self.held[peer].append(m[3][1])
                elif peer == "old-0" and len(m) >= 2 and isinstance(m[1], tuple):
                    self.held[peer].append(m[1][1])

    def _task(self, data, holder: str):
        """A task id to answer with: one `holder` holds, any the broker sent, or a
        special one (no such task, another epoch)."""
        seen = len(self.sides[0].task_ids)
        # Mostly a task it holds, when it holds one: that is what moves requests on.
        choices = ["held"] * 6 if self.held[holder] else []
        choices += ["seen"] * 2 if seen else []
        kind = data.draw(st.sampled_from(choices + ["unknown", "foreign"]))
        if kind == "held":
            return self.held[holder].pop(data.draw(st.integers(0, len(self.held[holder]) - 1)))
        if kind == "seen":
            return data.draw(st.integers(0, seen - 1))
        return kind

    # -- clients -------------------------------------------------------------------------

    @rule(data=st.data(), frames=payload)
    def req_request(self, data, frames) -> None:
        idle = [i for i, waiting in enumerate(self.req_waiting) if not waiting]
        if not idle:  # each REQ client is waiting for its answer
            return
        c = data.draw(st.sampled_from(idle))
        for side in self.sides:
            side.req[c].send_multipart(frames)
        self.req_waiting[c] = True
        self.step_done()

    @rule(
        c=st.integers(0, N_FBC - 1),
        submits=st.lists(st.tuples(st.sampled_from(REQUEST_IDS), options, payload), min_size=1, max_size=3),
    )
    def fbc_submit(self, c, submits) -> None:
        # Several from one socket arrive in the order sent (one pipe), as one message would.
        for side in self.sides:
            for rid, options, frames in submits:
                side.fbc[c].submit(rid, *frames, options=options)
        self.step_done()

    @rule(c=st.integers(0, N_FBC - 1), jobs=st.lists(batch_job, min_size=1, max_size=4))
    def fbc2_submit(self, c, jobs) -> None:
        # FBC02 from the same sockets as FBC01: a socket may speak both.
        header = b"".join(submit_record(rid, len(frames), flags, 0, tries) for rid, flags, tries, frames in jobs)
        for side in self.sides:
            side.fbc[c].send(CSIG2, protocol.C_SUBMIT, header, *(f for job in jobs for f in job[3]))
        self.step_done()

    @rule(
        c=st.integers(0, N_FBC - 1),
        cmd=st.sampled_from([C_STATUS, C_RESULT, C_CANCEL, C_STATS, protocol.C_REQUEUE, protocol.C_REQUEUE_ALL]),
        rid=st.sampled_from(REQUEST_IDS),
    )
    def fbc_ask(self, c, cmd, rid) -> None:
        for side in self.sides:
            side.fbc[c].command(cmd, rid)
        self.step_done()

    @rule(c=st.integers(0, N_FBC - 1), limit=st.integers(0, 3))
    def fbc_dead(self, c, limit) -> None:
        for side in self.sides:
            side.fbc[c].command(protocol.C_DEAD, REQUEST_IDS[0], limit.to_bytes(4, "big"))
        self.step_done()

    # -- FBW01 workers ----------------------------------------------------------------------

    @rule(w=st.integers(0, N_FBW - 1), credit=st.integers(0, 3))
    def fbw_ready(self, w, credit) -> None:
        for side in self.sides:
            side.fbw[w].ready(credit)
        self.step_done()

    @rule(w=st.integers(0, N_FBW - 1), credit=st.integers(0, 3))
    def fbw_ready_v2(self, w, credit) -> None:
        # The same socket turns FBW02 (a later FBW01 READY turns it back).
        for side in self.sides:
            side.fbw[w].send(b"", WSIG2, protocol.CMD_READY, credit_frame(credit))
        self.step_done()

    @rule(
        data=st.data(),
        w=st.integers(0, N_FBW - 1),
        outcomes=st.lists(
            st.tuples(
                st.sampled_from([protocol.R_OK, protocol.R_OK, protocol.R_FAILED, b"\x99"]),
                st.sampled_from([[b"ok"], [b"a", b"b"], [], [b"E", b"m"]]),
            ),
            min_size=1,
            max_size=3,
        ),
        garble=st.sampled_from([None, None, None, "extra", "short"]),
    )
    def fbw_answers_v2(self, data, w, outcomes, garble) -> None:
        # One FBW02 ANSWER of several records; a record of an unknown outcome or the
        # wrong frames is dropped alone; with `garble` the header and frames disagree.
        tasks = [self._task(data, f"fbw-{w}") for _ in outcomes]
        for side in self.sides:
            header = b"".join(
                side.raw_task(t) + code + len(frames).to_bytes(2, "big") for t, (code, frames) in zip(tasks, outcomes)
            )
            frames = [f for _, fs in outcomes for f in fs]
            if garble == "extra":
                frames.append(b"one more")
            elif garble == "short":
                header = header[:-1]
            side.fbw[w].send(b"", WSIG2, protocol.CMD_ANSWER, header, *frames)
        self.step_done()

    @rule(data=st.data(), w=st.integers(0, N_FBW - 1), frames=answer_frames)
    def fbw_answer(self, data, w, frames) -> None:
        which = self._task(data, f"fbw-{w}")
        for side in self.sides:
            side.fbw[w].answer(side.raw_task(which), *frames)
        self.step_done()

    @rule(
        data=st.data(),
        w=st.integers(0, N_FBW - 1),
        kind=st.sampled_from([b"ValueError", b"E" * 40]),
        message=st.sampled_from([b"boom", b"", "\u00e9t\u00e9".encode()]),
    )
    def fbw_failed(self, data, w, kind, message) -> None:
        which = self._task(data, f"fbw-{w}")
        for side in self.sides:
            side.fbw[w].failed(side.raw_task(which), kind, message)
        self.step_done()

    @rule(data=st.data(), w=st.integers(0, N_FBW - 1), count=st.integers(0, 2))
    def fbw_return(self, data, w, count) -> None:
        # RETURN of held tasks (or others, or none: malformed), then the worker is blocked
        # until its next READY.
        which = [self._task(data, f"fbw-{w}") for _ in range(count)]
        for side in self.sides:
            side.fbw[w].command(protocol.CMD_RETURN, *(side.raw_task(t) for t in which))
        self.step_done()

    @rule(data=st.data(), w=st.integers(0, N_FBW - 1), millis=st.sampled_from([b"\0\0\0\1", b"\xff" * 4, b"\0"]))
    def fbw_extend(self, data, w, millis) -> None:
        # No request has a timeout here: an EXTEND counts, or is dropped, and moves nothing.
        which = self._task(data, f"fbw-{w}")
        for side in self.sides:
            side.fbw[w].command(CMD_EXTEND, side.raw_task(which), millis)
        self.step_done()

    @rule(w=st.integers(0, N_FBW - 1))
    def fbw_disconnect(self, w) -> None:
        # The broker forgets the worker and puts its jobs back; the test still lets it
        # answer them (the broker takes an answer for a live job from anyone).
        for side in self.sides:
            side.fbw[w].disconnect()
        self.step_done()

    # -- the original protocol's worker --------------------------------------------------------

    @rule()
    def old_ready(self) -> None:
        for side in self.sides:
            side.old.send_multipart([b"", b"ready"])
        self.step_done()

    @rule(data=st.data(), frames=answer_frames)
    def old_answer(self, data, frames) -> None:
        which = self._task(data, "old-0")
        for side in self.sides:
            side.pusher.send_multipart([side.raw_task(which), *frames])
        self.step_done()

    # -- malformed and random messages ------------------------------------------------------------

    @rule(w=st.integers(0, N_FBW - 1), frames=st.one_of(st.just([b"", WSIG, CMD_HEARTBEAT]), worker_junk))
    def fbw_heartbeat_or_malformed(self, w, frames) -> None:
        for side in self.sides:
            side.fbw[w].send(*frames)
        self.step_done()

    @rule(
        where_frames=st.one_of(
            st.tuples(st.sampled_from(["requests", "workers", "answers"]), junk),
            st.tuples(st.just("requests"), client_junk),
        )
    )
    def junk_message(self, where_frames) -> None:
        where, frames = where_frames
        for side in self.sides:
            sock = {"requests": side.junk_client, "workers": side.junk_worker, "answers": side.pusher}[where]
            sock.send_multipart(frames)
        self.step_done()

    @rule()
    def disconnect_all_workers(self) -> None:
        counts = [side.core.disconnect_workers() for side in self.sides]
        assert counts[0] == counts[1], counts
        self.step_done()

    @invariant()
    def same_number_of_tasks(self) -> None:
        if self.sides:
            assert len(self.sides[0].task_ids) == len(self.sides[1].task_ids)


def test_two_cores_do_the_same(monkeypatch):
    """The state machine, bounded: 100 sequences of at most 50 steps (about 5 s here).
    A difference is shrunk for SHRINK_SECONDS at most (hypothesis' own bound is 5
    minutes, past the suite's 120 s per test), then reported as it is by then."""
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
    run_state_machine_as_test(
        TwoCores,
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            report_multiple_bugs=False,
        ),
    )
