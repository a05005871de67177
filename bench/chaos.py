"""The crash soak (issue 18 part 3, ``make chaos``): a broker and a pool of worker
processes under churn, against the same pool and broker calm, in one run.

    python -m bench.chaos [--jobs N] [--workers W] [--credit C] [--store | --no-store]
                          [--kill-every MIN,MAX] [--broker-kills K] [--protocol 1|2]
                          [--shards S] [--max-seconds S]      (from the repository root)

One broker process (``python -m fastbroker broker --core compiled -T 3 -t 100``, or
``--core pure``,
heartbeat 0.2 s × liveness 3; with ``--store``, ``--store FILE --sync normal``) and one
pool (``python -m fastbroker worker bench.chaos:ChaosEcho --processes W --credit C``),
over ipc in a temporary directory. This process is the client (``fastbroker.Client``,
``check_interval`` 0.5 s).

1. **Calm**: N jobs through ``Client.map``; the rate is the reference.
2. **Chaos**: N new jobs, all submitted at once, while a thread SIGKILLs one of the
   pool's children every MIN–MAX seconds (the pool restarts it) and the broker is
   SIGKILLed K times, evenly through the run, and started again on the same endpoints
   (and store).

With ``--shards S``: S such brokers (shard k on the endpoints and store file that
``fastbroker broker --shards`` would give it), the pool and the client given the list;
the broker kills go to the shards in turn.

Reported: correct, wrong, lost (no outcome by the end), failed (an outcome other than
the answer: FAILED or TIMED_OUT after 100 tries), answered twice (two outcomes for one
id reached the client's socket), runs per job (from the workers' job log), kills, and
the chaos rate against the calm rate. Exit status 1 if any job is wrong, lost or
answered twice, or (with ``--min-ratio R``) if the chaos rate is below R × calm.
Every process started is SIGKILLed at the end; every wait is bounded.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fastbroker import Client, Worker
from fastbroker.addresses import shard_address, shard_path
from fastbroker.client.protocol import replies_of

from bench import e2e
from bench.proctree import descendants

LOG_ENV = "FB_CHAOS_LOG"


class ChaosEcho(Worker):
    """Answers b"ok:" + data; logs "PID PAYLOAD" for each run to $FB_CHAOS_LOG (one
    O_APPEND write a line, so lines of several processes never mix)."""

    def process(self, data: bytes) -> bytes:
        path = os.environ.get(LOG_ENV)
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"%d %s\n" % (os.getpid(), data))
            finally:
                os.close(fd)
        return b"ok:" + data


class Chaos:
    def __init__(self, run: e2e.Run, args: argparse.Namespace) -> None:
        self.run, self.args = run, args
        base = [f"ipc://{run.dir}/{name}" for name in ("req", "wrk", "ans")]
        # Shard k's endpoints and store, as `fastbroker broker --shards` numbers them.
        self.addrs = [[shard_address(a, k) for a in base] for k in range(args.shards)]
        self.stores = [shard_path(str(run.dir / "broker.db"), k) for k in range(args.shards)]
        self.log = run.dir / "jobs.log"
        run.env[LOG_ENV] = str(self.log)
        self.brokers = [self.start_broker(k) for k in range(args.shards)]
        hb = ["--heartbeat", "0.2", "--liveness", "3"]
        self.pool = run.start(
            ["-m", "fastbroker", "worker", "bench.chaos:ChaosEcho", ",".join(a[1] for a in self.addrs)]
            + ["--processes", str(args.workers), "--credit", str(args.credit), "--protocol", str(args.protocol), *hb],
            "pool",
        )
        self.worker_kills = 0
        self.broker_kills = 0

    @property
    def requests(self) -> str:
        """The requests endpoint, or the list of the shards'."""
        return ",".join(a[0] for a in self.addrs)

    def start_broker(self, shard: int):
        options = ["-T", "3", "-t", "100", "--heartbeat", "0.2", "--liveness", "3"]
        if self.args.store:
            options += ["--store", self.stores[shard], "--sync", "normal"]
        core = self.args.core
        proc = self.run.start(
            ["-m", "fastbroker", "-v", "broker", "--core", core, *options, *self.addrs[shard]], f"broker{shard}"
        )
        self.run.wait_for_broker(proc, "chaos", core, time.monotonic() + e2e.START_WAIT)
        return proc

    def children(self) -> List[int]:
        return descendants(self.pool.pid)

    def kill_workers(self, stop: threading.Event) -> None:
        low, high = self.args.kill_every
        rng = random.Random(self.args.seed)
        while not stop.wait(rng.uniform(low, high)):
            children = self.children()
            if children:
                try:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    self.worker_kills += 1
                except ProcessLookupError:
                    pass

    def kill_broker(self) -> None:
        shard = self.broker_kills % len(self.brokers)
        self.brokers[shard].kill()
        self.brokers[shard].wait(e2e.START_WAIT)
        self.broker_kills += 1
        self.brokers[shard] = self.start_broker(shard)


def outcomes_seen(client: Client) -> Dict[bytes, int]:
    """Counts the outcomes (any kind) that reach the client's socket, per id: a wrapper
    of its RequestBook.on_message, which its I/O thread calls for every message."""
    seen: Dict[bytes, int] = collections.Counter()
    for book in client._books:  # one per broker
        original = book.on_message

        def on_message(frames, original=original):
            for reply in replies_of(frames):
                if reply.is_outcome:
                    seen[reply.request_id] += 1
            return original(frames)

        book.on_message = on_message  # type: ignore[method-assign]
    return seen


def chaos_phase(chaos: Chaos, client: Client, payloads: List[bytes], deadline: float) -> Dict[str, object]:
    args = chaos.args
    futures = client.submit_many(payloads)
    stop = threading.Event()
    killer = threading.Thread(target=chaos.kill_workers, args=(stop,), name="worker-killer")
    killer.start()
    start = time.monotonic()
    marks = [len(payloads) * (k + 1) // (args.broker_kills + 1) for k in range(args.broker_kills)]
    try:
        for index, future in enumerate(futures):
            while marks and index >= marks[0]:
                marks.pop(0)
                chaos.kill_broker()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                future.exception(left)  # waits; the outcome is read below
            except Exception:  # TimeoutError or CancelledError: counted as lost below
                break
    finally:
        stop.set()
        killer.join(e2e.START_WAIT)
    wall = time.monotonic() - start
    correct = wrong = failed = lost = 0
    for payload, future in zip(payloads, futures):
        if not future.done():
            lost += 1
        elif future.exception() is not None:
            failed += 1
        elif future.result() == b"ok:" + payload:
            correct += 1
        else:
            wrong += 1
    return {"correct": correct, "wrong": wrong, "failed": failed, "lost": lost, "wall": wall}


def runs_per_job(log: Path, payloads: Sequence[bytes]) -> Dict[int, int]:
    counts: Dict[bytes, int] = collections.Counter()
    try:
        for line in log.read_bytes().splitlines():
            counts[line.split(b" ", 1)[1]] += 1
    except FileNotFoundError:
        pass
    return dict(sorted(collections.Counter(counts[p] for p in payloads).items()))


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=5000, help="jobs per phase (default 5000)")
    p.add_argument("--workers", type=int, default=3, help="pool processes (default 3)")
    p.add_argument("--credit", type=int, default=2, help="credit of each worker (default 2)")
    p.add_argument("--store", action=argparse.BooleanOptionalAction, default=True, help="a durable broker (default)")
    p.add_argument(
        "--kill-every",
        default="0.1,0.2",
        help="seconds between two worker kills, MIN,MAX (default 0.1,0.2)",
    )
    p.add_argument("--broker-kills", type=int, default=3, help="broker SIGKILLs and restarts (default 3)")
    p.add_argument("--shards", type=int, default=1, help="brokers, killed in turn (default 1)")
    p.add_argument(
        "--protocol",
        type=int,
        choices=(1, 2),
        default=2,
        help="the protocols of the client and the pool's workers: 2 (FBC02 + FBW02, the default) or 1 (FBC01 + FBW01)",
    )
    p.add_argument(
        "--core", choices=("compiled", "pure"), default="compiled", help="the broker's core (default compiled)"
    )
    p.add_argument("--min-ratio", type=float, default=None, help="fail if chaos rate < R x calm rate")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound of the chaos phase (default 300)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    try:
        low, high = (float(x) for x in args.kill_every.split(","))
    except ValueError:
        p.error(f"--kill-every: MIN,MAX in seconds, not {args.kill_every!r}")
    if not 0 < low <= high:
        p.error("--kill-every: 0 < MIN <= MAX")
    args.kill_every = (low, high)
    if args.jobs < 1 or args.workers < 1 or args.credit < 1 or args.broker_kills < 0 or args.shards < 1:
        p.error("--jobs, --workers, --credit and --shards must be at least 1, --broker-kills at least 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    calm_payloads = [b"calm-%06d" % i for i in range(args.jobs)]
    chaos_payloads = [b"chaos-%06d" % i for i in range(args.jobs)]
    with tempfile.TemporaryDirectory(prefix="fb-chaos-") as tmp:
        run = e2e.Run(Path(tmp), argparse.Namespace(transport="ipc"))
        try:
            chaos = Chaos(run, args)
            with Client(chaos.requests, check_interval=0.5, protocol=args.protocol) as client:
                seen = outcomes_seen(client)
                start = time.monotonic()
                calm = list(client.map(calm_payloads, timeout=None))
                calm_rate = args.jobs / (time.monotonic() - start)
                assert calm == [b"ok:" + p for p in calm_payloads], "wrong answers in the calm phase"
                result = chaos_phase(chaos, client, chaos_payloads, time.monotonic() + args.max_seconds)
                twice = sum(1 for n in seen.values() if n > 1)
            runs = runs_per_job(chaos.log, chaos_payloads)
        finally:
            run.close()
    rate = result["correct"] / result["wall"] if result["wall"] else 0.0
    ratio = rate / calm_rate
    print(
        f"chaos: core={args.core} store={'yes' if args.store else 'no'} protocol={args.protocol} "
        f"shards={args.shards} jobs={args.jobs} "
        f"workers={args.workers}x{args.credit} kill every {args.kill_every[0]:g}-{args.kill_every[1]:g} s"
    )
    print(
        f"  correct {result['correct']}, wrong {result['wrong']}, lost {result['lost']}, failed {result['failed']}, "
        f"answered twice {twice}"
    )
    print(f"  runs per job {runs}; worker kills {chaos.worker_kills}, broker kills {chaos.broker_kills}")
    print(f"  rate {rate:,.0f} jobs/s against {calm_rate:,.0f} calm: {ratio:.2f}x ({result['wall']:.1f} s)")
    bad = result["wrong"] or result["lost"] or twice
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"  below the target {args.min_ratio:g}x")
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
