"""The I/O loop of a DEALER ``Worker`` (FBW02, or FBW01), pure Python: one loop for
every broker of the worker's list (a ``Link`` each, worker/link.py: connection,
heartbeats both ways, reconnection with back-off, the framing), one job table and one
pool of job threads, the credit exact across the brokers, graceful hang-up, CANCEL
from the broker. ``Worker.run()`` runs ``open_sessions(worker)``'s one Session.
The compiled twin is worker/_session.pyx, same names.

Only the loop's thread touches the sockets; pool threads hand results back
through a deque and wake the loop through the worker's pipe.

CANCEL (PROTOCOL.md 4.12): the broker has dropped the job and keeps its credit
taken until we ANSWER or FAIL it. A job still waiting for a pool thread is
withdrawn and FAILED at once (``Cancelled``); a running one is marked in
``Session.cancelled``, which the job reads through ``Worker.cancelled()``, and is
answered as usual when it returns.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

import zmq

from fastbroker.protocol import CMD_ANSWER, CMD_EXTEND, CMD_FAILED, R_OK
from fastbroker.worker import wire
from fastbroker.worker.link import Link
from fastbroker.worker.running import direct_process, run_batch, run_one

log = logging.getLogger("fastbroker.worker")

CANCELLED_TYPE = b"Cancelled"
CANCELLED_TEXT = b"cancelled by the client"
"""The FAILED a worker sends for a job cancelled before it started (PROTOCOL.md 4.12)."""


@dataclass
class WorkerStats:
    """Counters of a DEALER worker, updated by its I/O loop only."""

    received: int = 0  # TASKs received
    answered: int = 0  # jobs answered (ANSWER queued for the broker)
    failed: int = 0  # jobs whose process() raised (FAILED sent unless the connection was lost)
    connects: int = 0  # sockets opened, the first one included
    reconnects: int = 0  # sockets opened again after a silent broker or a DISCONNECT
    disconnects: int = 0  # DISCONNECTs received from the broker
    heartbeats_sent: int = 0
    cancelled: int = 0  # CANCELs received for jobs in hand (started or not)
    cancelled_unstarted: int = 0  # of which withdrawn before a pool thread took them (FAILED at once)
    protocol: int = 0  # what it speaks now: 2 (FBW02) or 1 (FBW01); 0 before its first connection
    ignored: int = 0  # broker messages not acted on: an unknown command, a TASK or CANCEL with the wrong frames
    returned: int = 0  # jobs given back (RETURN): they came while the credit was full (several brokers)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)

    @classmethod
    def total(cls, each: Sequence[WorkerStats]) -> WorkerStats:
        """The counters of several connections summed (``protocol``: the lowest)."""
        out = cls()
        for name in asdict(out):
            values = [getattr(one, name) for one in each]
            setattr(out, name, min(values) if name == "protocol" else sum(values))
        return out


# A job's outcome from a pool thread: (job number, task id, answer frames or None,
# (exception type name, message) or None).
_Result = Tuple[int, bytes, Optional[List[bytes]], Optional[Tuple[str, str]]]


# Plain ints: pyzmq's constants are enum flags, whose operators cost microseconds
# each in a loop that runs for every job.
_POLLIN = int(zmq.POLLIN)
_POLLIN_OUT = int(zmq.POLLIN | zmq.POLLOUT)


BACKLOG_POLL = 0.001
"""Seconds the compiled twin's loop sleeps at most while jobs wait for a thread (it
lets outcomes come without a wake-up meanwhile), and how long a job may wait for one
before more threads are started (``_pace_threads``); the pure loop's is
``JobPool.stuck_after``."""


DRY_AFTER = 0.01
"""Seconds a broker of several may send no job while it may send some before its
share of the credit goes to the others (``Session._share_credit``): a broker with
jobs queued fills its share within a round trip."""

SLICE = 0.01
"""Seconds the brokers of several that have jobs queued each hold most of the credit at
least, in turn, and one job (``Session._share_credit``)."""


class JobPool:
    """Up to ``size`` threads that run jobs, started as they are needed: what the loop
    used a ThreadPoolExecutor for, without its Future, Condition and semaphore per
    job, which cost more than the hand-off itself (and hold the GIL longer after
    the job, when the loop wants it back to send the answer).

    A job waits in ``waiting`` until a thread takes it; ``withdraw`` (CANCEL) takes
    it first if no thread has. Each side takes it with one ``dict.pop``, atomic
    under the GIL, so exactly one of them gets it and a withdrawn job never runs.

    As a ThreadPoolExecutor's, the threads are not daemons and are told to end
    when the interpreter exits (after finishing the jobs they hold).
    """

    def __init__(
        self,
        size: int,
        run: Callable[[int, bytes, List[bytes]], None],
        name: str,
        run_batch: Optional[Callable[[List[Tuple[int, bytes, List[bytes]]]], None]] = None,
        batch_max: int = 1,
    ) -> None:
        self.size = size
        self.run = run
        # With run_batch, a thread takes every job waiting (up to batch_max) at once.
        self.run_batch = run_batch
        self.batch_max = batch_max
        self.name = name
        self.queue: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
        # job number -> its arguments and when it came (time.monotonic()), oldest first
        self.waiting: Dict[int, Tuple[bytes, List[bytes], float]] = {}
        self.threads: List[threading.Thread] = []
        self.closed = False
        self.last_pace = 0.0  # when pace() last looked
        self.next_threads = 1  # threads pace() adds next if the jobs still wait
        # How long a job waits before the threads count as stuck: here the loop is Python
        # too, and a thread ready to take a job may wait for the GIL up to a switch
        # interval (5 ms) while the loop reads a batch; longer, and it is not the GIL.
        self.stuck_after = min(0.01, max(BACKLOG_POLL, 2 * sys.getswitchinterval()))
        # Set when a job spent BACKLOG_POLL / 2 or more off the CPU (it sleeps or waits on
        # I/O): the GIL is then not what keeps jobs waiting, and BACKLOG_POLL of waiting
        # is enough to add a thread (see wait_limit).
        self.blocking = False
        _watch_at_exit(self)

    def submit(self, number: int, task_id: bytes, payload: List[bytes]) -> None:
        """Queue a job (the first one starts a thread; pace() starts the others)."""
        if self.closed:
            raise RuntimeError("cannot run new jobs after the pool was shut down")
        self.waiting[number] = (task_id, payload, time.monotonic())
        if not self.threads:
            self._start(1)
        self.queue.put(number)

    @property
    def wait_limit(self) -> float:
        """How long a job may wait for a thread before pace() adds one."""
        return BACKLOG_POLL if self.blocking else self.stuck_after

    def pace(self, now: float) -> None:
        """From the loop at every turn: a job has waited ``stuck_after`` for a thread, so
        the threads there are are busy (a process() that sleeps, waits on I/O or runs for
        more than microseconds): start more, one the first time, twice as many each time
        a job has waited that long again before none waits, up to ``size``. Quick jobs
        get one thread, which takes them as they come: more would only fight for the GIL."""
        limit = self.wait_limit
        if now - self.last_pace < limit:
            return
        self.last_pace = now
        if self.closed or not self.waiting:
            self.next_threads = 1  # the threads caught up
            return
        try:
            oldest = next(iter(self.waiting.values()))[2]
        except (StopIteration, RuntimeError):  # taken meanwhile by a thread
            return
        if now - oldest < limit:
            return  # the oldest waiting job is young: the threads keep up
        self._start(min(self.next_threads, len(self.waiting)))
        self.next_threads = min(2 * self.next_threads, self.size)

    def _start(self, n: int) -> None:
        for _ in range(min(n, self.size - len(self.threads))):
            thread = threading.Thread(target=self._serve, name=f"{self.name}_{len(self.threads)}")
            thread.start()
            self.threads.append(thread)

    def withdraw(self, number: int) -> bool:
        """Take back a job no thread has taken yet; False if one has (it runs to its end)."""
        return self.waiting.pop(number, None) is not None

    def shutdown(self, wait: bool, cancel_waiting: bool = False) -> None:
        """Let the threads end once the queue is done (without the jobs waiting, with
        `cancel_waiting`); with `wait`, until they have."""
        self.closed = True
        if cancel_waiting:
            self.waiting.clear()
        for _ in self.threads:
            self.queue.put(None)
        if wait:
            for thread in self.threads:
                thread.join()

    def _serve(self) -> None:
        get, take, run = self.queue.get, self.waiting.pop, self.run
        clock, cpu_clock, off_cpu = time.perf_counter, time.thread_time, BACKLOG_POLL / 2
        while True:
            number = get()
            if number is None:
                return
            job = take(number, None)
            if job is None:
                continue  # withdrawn before this thread took it
            try:
                if self.run_batch is None:
                    start, cpu = clock(), cpu_clock()
                    run(number, job[0], job[1])
                    self.blocking = (clock() - start) - (cpu_clock() - cpu) >= off_cpu
                elif not self._serve_batch((number, job[0], job[1])):
                    return
            except BaseException:  # run() reports the job's own errors: this is a bug
                log.exception("a job thread failed")

    def _serve_batch(self, first: Tuple[int, bytes, List[bytes]]) -> bool:
        """Run `first` with the jobs waiting now (no waiting for more); False if the
        pool's end (None) was taken meanwhile: it is the thread's last batch."""
        batch, more = [first], True
        while len(batch) < self.batch_max:
            try:
                number = self.queue.get_nowait()
            except queue.Empty:
                break
            if number is None:
                more = False
                break
            job = self.waiting.pop(number, None)
            if job is not None:
                batch.append((number, job[0], job[1]))
        assert self.run_batch is not None
        self.run_batch(batch)
        return more


_pools: weakref.WeakSet[JobPool] = weakref.WeakSet()
_exit_hook: List[bool] = []


def _watch_at_exit(pool: JobPool) -> None:
    if not _exit_hook:
        # What concurrent.futures does for its executors: a pool left running (its
        # loop in a daemon thread, say) must not keep the interpreter from exiting.
        threading._register_atexit(_end_pools_at_exit)  # type: ignore[attr-defined]
        _exit_hook.append(True)
    _pools.add(pool)


def _end_pools_at_exit() -> None:
    pools = list(_pools)
    for pool in pools:
        if not pool.closed:
            pool.shutdown(wait=False)
    for pool in pools:
        for thread in pool.threads:
            thread.join()


def open_sessions(worker: Any) -> List[Session]:
    """The sessions of one Worker.run(): one, whatever the number of brokers (a Link
    each, one loop, one job table, one pool of job threads)."""
    return [Session(worker)]


class Session:
    """Runs one worker's loop until it has stopped and hung up: its connections to its
    brokers (a Link each, worker/link.py), one job table and one pool of job threads
    for all of them, the credit exact across them (docs/PROTOCOL.md 4.14)."""

    def __init__(
        self,
        worker: Any,
        addresses: Optional[Sequence[str]] = None,
        wake_pipe: Any = None,
        stats: Optional[Sequence[WorkerStats]] = None,
    ) -> None:
        self.worker = worker
        self._process_direct = direct_process(worker)  # a Python call less per job, if not None
        self.addresses: List[str] = list(worker.brokers if addresses is None else addresses)
        self.address = ",".join(self.addresses)  # for names and logs
        self.wake_pipe = worker.wake_pipe if wake_pipe is None else wake_pipe  # stop(), signals, job threads
        each = list(worker._link_stats if stats is None else stats)
        if not self.addresses or len(each) != len(self.addresses):
            raise ValueError("a Session needs one WorkerStats per broker")
        self.heartbeat: float = worker.heartbeat
        self.silence: float = worker.liveness * worker.heartbeat
        self.reconnect_max: float = worker.reconnect_max or self.silence
        self.credit: int = worker.credit
        # Jobs the broker may send beyond those running: they wait here for a thread.
        self.prefetch: int = worker.prefetch
        # One broker never sends beyond the credit it was told; several may together.
        self.limit = self.credit + self.prefetch
        self.has_limit = len(self.addresses) > 1
        # With several brokers, each is told a share of the credit (Link.share).
        self.fair_share = max(1, self.limit // len(self.addresses))
        self.holder = 0  # the hungry link that gets most of the credit (_share_credit)
        self.holder_since = 0.0
        self.holder_jobs = 0  # jobs that came from the holder in its turn
        self.views_min: Optional[int] = worker.zero_copy_min
        self.links = [Link(self, index, address, one) for index, (address, one) in enumerate(zip(self.addresses, each))]
        self.stopping = False
        self.next_job = 0
        self.jobs: Dict[int, Tuple[Link, int]] = {}  # job number -> its link and that link's generation then
        # (link number, task id) -> numbers of the jobs in hand with it: usually one, but
        # a timed-out attempt still running here and a later try of the same job make two.
        self.by_task: Dict[Tuple[int, bytes], List[int]] = {}
        # Jobs the broker cancelled while they run here. Written by this loop only; pool
        # threads just test membership (Worker.cancelled()).
        self.cancelled: Set[int] = set()
        self.results: Deque[_Result] = collections.deque()
        # (job number, task id, milliseconds): EXTENDs asked for by running jobs.
        self.extends: Deque[Tuple[int, bytes, int]] = collections.deque()
        self.pool = JobPool(
            self.credit,
            self._process,
            "fastbroker-job",
            self._process_batch if worker.batched else None,
            self.credit + self.prefetch,
        )
        # The wake pipe was readable at the last poll (and may be at the start):
        # drain it before collecting results. A byte written later keeps it
        # readable, so the next poll returns at once and sets this again.
        self.woken = True
        # True from a pool thread's wake-up until the loop takes the results: a job
        # that ends while it is set needs no write to the pipe (one syscall per job less).
        self.results_pending = False

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        graceful = False
        try:
            if not self.worker.stopping:
                now = time.monotonic()
                for link in self.links:
                    link.open(now)
            while True:
                now = time.monotonic()
                if self.woken:
                    # Only when the pipe was readable: an empty pipe costs a failed read.
                    self.woken = False
                    self._drain_wake_pipe()
                # Before taking the results: one appended from now on wakes again.
                self.results_pending = False
                self._collect_results()
                self._collect_extends()
                self.pool.pace(now)
                if self.has_limit and not self.stopping:
                    self._share_credit(now)
                if self.worker.stopping and not self.stopping:
                    self.stopping = True
                    log.info("stopping: finishing %d job(s) in hand, then disconnecting", len(self.jobs))
                for link in self.links:
                    link.turn(now)
                if self.stopping and self._finished(now):
                    self._hang_up()
                    graceful = True
                    return
                self._poll(now)
        finally:
            if not graceful:  # an error escaped the loop: release without waiting
                for link in self.links:
                    link.close_socket(0)
                self.pool.shutdown(wait=False, cancel_waiting=True)
                if self.jobs:
                    # Jobs still running will write to the wake pipe when done:
                    # close() must not free its fds for reuse under them.
                    self.worker._keep_wake_pipe = True

    def _poll(self, now: float) -> None:
        """Wait for a wake-up, a message from any broker (or room to send to one with
        something waiting) or the next timer, and read what came."""
        items: List[Tuple[Any, int]] = [(self.wake_pipe.read_fd, _POLLIN)]
        due: Optional[float] = None
        for link in self.links:
            when = link.due(now)
            if when is not None and (due is None or when < due):
                due = when
            if link.sock is not None:
                items.append((link.sock, _POLLIN_OUT if link.outbox else _POLLIN))
            if link.spare_since is not None and not self.stopping:
                when = link.spare_since + DRY_AFTER  # see _share_credit
                due = when if due is None else min(due, when)
        wait = max(0.0, due - now) if due is not None else self.heartbeat
        pool = self.pool
        if pool.waiting and len(pool.threads) < pool.size and wait > pool.wait_limit:
            wait = pool.wait_limit  # to see whether the job threads keep up (JobPool.pace)
        # Round up: waking a hair early would spin through a turn with nothing due.
        for item, events in zmq.zmq_poll(items, int(math.ceil(wait * 1000))):
            if isinstance(item, int):
                self.woken = True
            elif events & _POLLIN:
                for link in self.links:
                    if link.sock is item:
                        link.receive()

    def _drain_wake_pipe(self) -> None:
        """WakePipe.drain() in one read instead of two: a pipe's read that returns
        fewer bytes than asked for has emptied it (a byte written since keeps it
        readable for the next poll), so the read that fails on an empty pipe,
        and its exception, are not needed."""
        fd = self.wake_pipe.read_fd
        try:
            for _ in range(64):  # bounded: a pipe holds at most 64 KiB here
                if len(os.read(fd, 4096)) < 4096:
                    return
        except OSError:
            pass  # empty (BlockingIOError) or closed

    def _finished(self, now: float) -> bool:
        """A stopping worker may hang up: no job in hand, and nothing left to send to
        any broker (see Link.finished)."""
        return not self.jobs and all(link.finished(now) for link in self.links)

    def _hang_up(self) -> None:
        """The end of a graceful stop: every link delivers what is left, says
        DISCONNECT and closes."""
        self.pool.shutdown(wait=True)
        for link in self.links:
            link.hang_up()

    # -- the job table: jobs in, outcomes out --------------------------------------------

    def start_job(self, link: Link, task_id: bytes, payload: List[bytes]) -> None:
        """A job from `link` for the pool; given back (RETURN) if the credit is full."""
        if self.has_limit and len(self.jobs) >= self.limit:
            # Full (a broker sent it before it read a lowered share, or a probe): given back.
            link.returns.append(task_id)
            return
        link.stats.received += 1
        link.in_hand += 1
        link.spare_since = None  # its broker has jobs (see _share_credit)
        link.probing = False
        if link.index == self.holder:
            self.holder_jobs += 1
        self.next_job += 1
        number = self.next_job
        self.jobs[number] = (link, link.generation)
        self.by_task.setdefault((link.index, task_id), []).append(number)
        self.pool.submit(number, task_id, payload)

    def cancel(self, link: Link, task_id: bytes) -> None:
        """CANCEL from `link`'s broker: withdraw the job if no pool thread has taken it
        yet (FAILED at once, so the broker frees its credit), else mark it so that
        ``Worker.cancelled()`` tells the job; its ANSWER or FAILED is sent when it
        ends. Never blocks."""
        numbers = self.by_task.get((link.index, task_id))
        if not numbers:
            # It may have just finished, its answer crossing the CANCEL.
            log.debug("ignored a CANCEL for job %s, which is not in hand", task_id.hex())
            return
        for number in list(numbers):
            link.stats.cancelled += 1
            # Withdrawing succeeds only while the job waits in the pool's queue;
            # from then on the pool never runs it, so no result will come.
            if not self.pool.withdraw(number):
                self.cancelled.add(number)
                log.info("job %s cancelled by the client while running; answering it when it returns", task_id.hex())
                continue
            link.stats.cancelled_unstarted += 1
            _, generation = self._forget(number, task_id)
            log.info("job %s cancelled by the client before it started; not running it", task_id.hex())
            # As for any FAILED, only on the connection the job came on: the broker
            # has already put back the jobs of a connection it lost.
            if generation == link.generation and link.sock is not None:
                link.outbox.append((generation, link.message(CMD_FAILED, task_id, CANCELLED_TYPE, CANCELLED_TEXT)))

    def _forget(self, number: int, task_id: bytes) -> Tuple[Link, int]:
        """The job is no longer in hand; returns its link and the generation it came on."""
        link, generation = self.jobs.pop(number)
        link.in_hand -= 1
        if generation != link.generation:
            link.orphans -= 1
        key = (link.index, task_id)
        numbers = self.by_task[key]
        numbers.remove(number)
        if not numbers:
            del self.by_task[key]
        self.cancelled.discard(number)
        return link, generation

    def _collect_results(self) -> None:
        # FBW02: the answers of this turn go as few ANSWER messages per broker (FAILED
        # stays one message each: it is rare, and goes only on the connection its job
        # came on).
        if not self.results:
            return
        batches: Dict[Link, wire.AnswerBatch] = {}
        while self.results:
            number, task_id, answer, error = self.results.popleft()
            link, generation = self._forget(number, task_id)
            if answer is not None:
                link.stats.answered += 1
                if link.v2:
                    batch = batches.get(link)
                    if batch is None:
                        batch = batches[link] = wire.AnswerBatch()
                    batch.add(task_id, R_OK, answer)
                else:
                    link.outbox.append((None, link.message(CMD_ANSWER, task_id, *answer)))
                continue
            link.stats.failed += 1
            assert error is not None
            if generation == link.generation and link.sock is not None:
                name, text = error
                link.outbox.append(
                    (generation, link.message(CMD_FAILED, task_id, name.encode(), text.encode("utf-8", "replace")))
                )
            else:
                log.info("job %s failed after its connection was lost; the broker re-queues it", task_id.hex())
        for link, batch in batches.items():
            link.outbox.extend((None, frames) for frames in batch.close())

    def _collect_extends(self) -> None:
        while self.extends:
            number, task_id, ms = self.extends.popleft()
            job = self.jobs.get(number)
            if job is not None:  # still running: on the connection its job came on
                link, generation = job
                link.outbox.append((generation, link.message(CMD_EXTEND, task_id, ms.to_bytes(4, "big"))))

    # -- the credit across several brokers -------------------------------------------------

    def opening_share(self, link: Link) -> int:
        """The share a broker is told on a new connection: a fair share (the credit
        over the brokers) of the room no other broker may fill (what is not in hand,
        less what each other broker may still send), at least one job more than it
        holds."""
        room = self.limit - len(self.jobs)
        for other in self.links:
            if other is not link and other.sock is not None and not other.probing:
                room -= max(0, other.share - other.in_hand + other.orphans)
        own = link.in_hand - link.orphans
        return max(own + 1, min(self.fair_share, own + room))

    def _share_credit(self, now: float) -> None:
        """Split the credit between the brokers so that together they never send more
        than it (docs/PROTOCOL.md 4.15). Each is told a share (READY), which it refills
        by itself as its jobs end: a worker whose brokers all have jobs queued gets no
        job it must give back, and sends no READY per job.

        Of the brokers that sent all their share allows (hungry: they may have more, and
        a broker that got jobs back is one), one, the holder, is told all the credit the
        others do not use, and the others 0. The holder changes, round robin, once it
        has held the turn SLICE and had at least one job in it (room appears only as
        jobs end: with jobs longer than SLICE, a turn that only time ended could fall
        between job ends again and again), and at once when it runs dry. So the jobs
        come in large batches from one broker at a time (sixteen jobs in flight from
        each of four brokers cost the worker 2.5 times the CPU per job of sixty-four
        from one), and every broker with jobs queued is served in turn.

        A broker that sends nothing for DRY_AFTER while it may send jobs has nothing
        queued: it is told 1 (probing), so that it can send a job once it holds none,
        and that job is not counted against the room the others are told (a holder of a
        worker with credit 8 and one idle broker of two gets 8, not 7): if it comes
        while the credit is full, it is given back, and that broker waits for its turn.
        Lowering a share takes nothing back (the broker sends nothing until fewer are in
        flight; Link.turn sends a lowered share before the answers); what it frees as
        its jobs end goes to the holder."""
        room = self.limit - len(self.jobs)
        told = 0  # the shares of the brokers that are not hungry
        hungry = 0
        links = self.links
        holder = links[self.holder]
        holder_gone = holder.sock is None or holder.probing  # or found dry now
        for link in links:
            if link.sock is None or link.probing:
                continue
            own = link.in_hand - link.orphans
            spare = link.share - own
            if spare > 0:
                if link.spare_since is None:
                    link.spare_since = now  # reset by each job that comes (start_job)
                elif now - link.spare_since >= DRY_AFTER:
                    link.share = 1
                    link.spare_since = None
                    link.probing = True
                    holder_gone = holder_gone or link is holder
                    continue
                room -= spare
                told += link.share
            else:
                link.spare_since = None
                hungry += 1
        if not hungry:
            return
        if holder_gone or (self.holder_jobs and now - self.holder_since >= SLICE):
            count = len(links)
            for step in range(1, count):  # the next hungry one; else the turn goes on
                link = links[(self.holder + step) % count]
                if self._hungry(link):
                    self.holder = link.index
                    self.holder_since = now
                    self.holder_jobs = 0
                    if not holder_gone:
                        # Its turn is over even if its jobs in flight leave it room now.
                        spare = holder.share - holder.in_hand + holder.orphans
                        if spare > 0:
                            room += spare
                            told -= holder.share
                        holder.share = 0
                    break
        for link in links:
            if not self._hungry(link):
                continue
            wanted = max(1, self.limit - told) if link.index == self.holder else 0
            if link.share > wanted:
                link.share = wanted
            elif link.share < wanted and room > 0:
                own = link.in_hand - link.orphans
                share = min(wanted, max(link.share, own) + room)
                room -= max(0, share - own)
                link.share = share

    @staticmethod
    def _hungry(link: Link) -> bool:
        """Its broker sent all it was told (it may have more), and may send again."""
        return link.sock is not None and not link.probing and link.share <= link.in_hand - link.orphans

    # -- what the Worker and the job threads call ------------------------------------------

    def request_stop(self) -> None:
        """Worker.stop(): nothing to do here, the loop reads ``worker.stopping`` each turn
        (the compiled twin, whose loop cannot read it without the GIL, sets a flag)."""

    def update_stats(self) -> None:
        """Worker.stats: nothing to do here, the links write their ``stats`` themselves
        (the compiled twin copies its counters in)."""

    def _process(self, number: int, task_id: bytes, payload: List[bytes]) -> None:
        """In a pool thread: run the user's code, hand the outcome to the loop."""
        local = self.worker._job_local
        # What Worker.cancelled() and Worker.extend() read in this thread while the job runs.
        local.job = (task_id, self, number)
        try:
            answer, error = run_one(self.worker, task_id, payload, self, number, self._process_direct)
        finally:
            local.job = None
        self.results.append((number, task_id, answer, error))
        self._result_ready()

    def job_cancelled(self, number: int, task_id: bytes) -> bool:
        """Worker.cancelled(): whether the broker cancelled this running job."""
        return number in self.cancelled

    def request_extend(self, number: int, task_id: bytes, seconds: float) -> None:
        """In a pool thread (Worker.extend): ask the loop to send EXTEND for the job."""
        self.extends.append((number, task_id, max(1, min(round(seconds * 1000), 0xFFFFFFFF))))
        self._result_ready()

    def _result_ready(self) -> None:
        """In a pool thread, after appending to results: wake the loop unless a wake-up
        is already on its way (the loop clears the flag before taking the results)."""
        if not self.results_pending:
            self.results_pending = True
            self.wake_pipe.wake()

    def _process_batch(self, jobs: List[Tuple[int, bytes, List[bytes]]]) -> None:
        """In a pool thread: the user's process_batch over several jobs; each job's
        outcome goes to the loop as if it had run alone."""
        outcomes = run_batch(self.worker, [payload for _, _, payload in jobs])
        self.results.extend((number, task_id, *outcome) for (number, task_id, _), outcome in zip(jobs, outcomes))
        self._result_ready()


def drop_released_answers() -> None:
    """Nothing to do here: pyzmq copies the answers it sends (the compiled twin sends
    large ones from the job's own object and drops its references here, as its job
    threads do)."""
