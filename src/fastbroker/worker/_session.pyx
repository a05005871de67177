# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled twin of ``fastbroker.worker.session``: one DEALER worker's connections
to its brokers, with the I/O loop in C on a thread of its own that never takes the GIL
to do its work (docs/ARCHITECTURE.md, "The compiled worker session").

The loop thread owns the sockets (a Link per broker, compiled/link.pxi): connecting and
reconnecting with back-off, READY and the credit, heartbeats both ways, TASK (FBW01 and
FBW02), CANCEL, DISCONNECT, and the outbox of ANSWER, FAILED, EXTEND and RETURN. Python
runs only in the job threads: each takes a job from the table (waiting without the
GIL), runs the user's ``process()`` and puts the outcome back. A ``process()`` that
holds the GIL for minutes therefore cannot stop the heartbeats: the broker keeps the
worker, and the job's own deadline is what catches a job that never ends.

The loop never takes the GIL: its log lines are queued for the spawner thread (the
Python thread that also starts the job threads) to write. Same behaviour as the pure
Session, which stays the twin (FASTBROKER_PURE=1) and is run by the same tests.
"""

from libc.limits cimport INT_MAX
from libc.stdint cimport uint8_t
from libc.stdlib cimport calloc, malloc, realloc, free
from libc.string cimport memcpy, memcmp, memset
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport read, write
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF

cdef extern from "Python.h":
    void Py_DecRef(PyObject *o)  # a function, on a pointer: no reference taken to drop one

import logging
import os
import signal
import threading

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from fastbroker import protocol
from fastbroker.worker.running import ANSWER_ZERO_COPY_MIN, direct_process, run_batch, run_one
from fastbroker.worker.session import (
    BACKLOG_POLL as _BACKLOG_POLL,
    DRY_AFTER as _DRY_AFTER,
    SLICE as _SLICE,
)
from fastbroker.worker.session import CANCELLED_TEXT, CANCELLED_TYPE, _watch_at_exit

from fastbroker._protocol cimport *
from fastbroker._zmqdl cimport (
    zmsg, zpollitem, ZPOLLIN, ZPOLLOUT, ZDONTWAIT, ZSNDMORE, zmsg_init, zmsg_init_size, zmsg_init_data, zmsg_data,
    zmsg_size, zmsg_more, zmsg_close, zmsg_copy, zmsg_move, zmsg_send, zmsg_recv, zpoll, zerrno, ZETERM, zsocket,
    zclose, zconnect, zsetsockopt, fbz_load,
)

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *mutex, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_cond_init(pthread_cond_t *cond, void *attr)
    int pthread_cond_wait(pthread_cond_t *cond, pthread_mutex_t *mutex)
    int pthread_cond_signal(pthread_cond_t *cond)
    int pthread_cond_broadcast(pthread_cond_t *cond)
    int pthread_cond_destroy(pthread_cond_t *cond)

cdef const char *_load_error = fbz_load(os.fsencode(_pyzmq_backend.__file__))
if _load_error != NULL:
    raise ImportError("fastbroker.worker._session: " + (<bytes>_load_error).decode())
protocol.check_compiled(compiled_values(), compiled_signatures())

log = logging.getLogger("fastbroker.worker")

# libzmq's option and socket numbers, from pyzmq (which wraps the same libzmq).
cdef int _DEALER = zmq.DEALER
cdef int _LINGER = zmq.LINGER
cdef int _CURVE_SECRETKEY = zmq.CURVE_SECRETKEY
cdef int _CURVE_PUBLICKEY = zmq.CURVE_PUBLICKEY
cdef int _CURVE_SERVERKEY = zmq.CURVE_SERVERKEY

cdef enum:
    # Slot states.
    S_FREE = 0
    S_WAITING = 1  # payload in hand, no thread has it yet
    S_RUNNING = 2  # a job thread runs it
    S_DONE = 3  # outcome put back, not yet collected by the loop
    S_OUTBOX = 4  # to be sent
    S_SENT = 5  # an ANSWER sent since the broker last spoke (sent again if the connection is lost)
    # Slot kinds: what the outbox sends.
    K_ANSWER = 0
    K_FAILED = 1
    K_EXTEND = 2
    K_RETURN = 3  # jobs given back: their ids are the slot's frames
    # Log codes (LOG_FORMATS).
    L_STOPPING = 1
    L_CONNECTING = 2
    L_REGISTERING = 3
    L_RECONNECTING = 4
    L_TRYING_V1 = 5
    L_TRYING_V2 = 6
    L_STOPPED_AWAY = 7
    L_DROPPED = 8
    L_DISCONNECTED = 9
    L_SPEAKS_V2 = 10
    L_CONNECTED = 11
    L_CANCEL_RUNNING = 12
    L_CANCEL_WAITING = 13
    L_BAD_TASK = 14
    L_TASK_NO_ID = 15
    LOG_QUEUE = 256  # records waiting for the spawner; beyond, counted in logs_lost
    # How the loop ended.
    LOOP_STOPPED = 0  # graceful hang-up
    LOOP_ABORTED = 1  # run()'s caller was interrupted
    LOOP_NO_CONTEXT = 2  # the context was terminated under it
    LOOP_NO_MEMORY = 3
    # Counters, in WorkerStats' order (STAT_NAMES).
    N_RECEIVED = 0
    N_ANSWERED = 1
    N_FAILED = 2
    N_CONNECTS = 3
    N_RECONNECTS = 4
    N_DISCONNECTS = 5
    N_HEARTBEATS_SENT = 6
    N_CANCELLED = 7
    N_CANCELLED_UNSTARTED = 8
    N_IGNORED = 9
    N_RETURNED = 10

# What the loop logs, by code: it never takes the GIL, so it queues (code, a, b, task id)
# and the spawner thread writes the lines (_emit_logs).
LOG_FORMATS = {
    1: (logging.INFO, "stopping: finishing {a:.0f} job(s) in hand, then disconnecting"),
    2: (logging.DEBUG, "connecting to {address} (connection {a:.0f})"),
    3: (logging.INFO, "the broker sent DISCONNECT: registering again"),
    4: (logging.INFO, "reconnecting to {address} in {a:.2f} s: no word from the broker for {b:.1f} s"),
    5: (logging.INFO, "no word from the broker: trying FBW01 on the next connection"),
    6: (logging.INFO, "no word from the broker: trying FBW02 on the next connection"),
    7: (logging.INFO, "stopped (not connected to {address})"),
    8: (logging.WARNING, "{a:.0f} answer(s) could not be queued for {address} before disconnecting"),
    9: (logging.INFO, "disconnected from {address}"),
    10: (logging.INFO, "the broker speaks FBW02: using it"),
    11: (logging.INFO, "connected to {address}"),
    12: (logging.INFO, "job {task} cancelled by the client while running; answering it when it returns"),
    13: (logging.INFO, "job {task} cancelled by the client before it started; not running it"),
    14: (logging.WARNING, "ignored a TASK whose header does not match its {a:.0f} frames"),
    15: (logging.WARNING, "ignored a TASK without a 16-byte task id"),
}

STAT_NAMES = (
    "received", "answered", "failed", "connects", "reconnects", "disconnects", "heartbeats_sent", "cancelled",
    "cancelled_unstarted", "ignored", "returned",
)

# Set when an allocation failed: the loop ends (LOOP_NO_MEMORY) at its next turn, and
# the broker re-queues what this worker held when it sees it gone.
cdef int _out_of_memory = 0
cdef int _running_sessions = 0  # run()s in progress in this process (they share the flag above)
cdef char _WAKE_BYTE = 0

# The FAILED of a job cancelled before it started, as C strings for the loop.
cdef bytes _cancelled_type = CANCELLED_TYPE
cdef bytes _cancelled_text = CANCELLED_TEXT
cdef const char *_CANCELLED_TYPE = _cancelled_type
cdef const char *_CANCELLED_TEXT = _cancelled_text
cdef size_t _CANCELLED_TYPE_SIZE = len(_cancelled_type)
cdef size_t _CANCELLED_TEXT_SIZE = len(_cancelled_text)


# Seconds the loop sleeps at most while jobs wait for a thread (the pure twin's
# BACKLOG_POLL): the job threads then put outcomes back without waking it, and it sends
# those of a millisecond together; and it looks whether the threads keep up (_pace_threads).
cdef double BACKLOG_POLL = _BACKLOG_POLL

# Seconds a broker of several may send no job while its share allows some before the
# share goes to the others (the pure twin's DRY_AFTER, see _share_credit).
cdef double DRY_AFTER = _DRY_AFTER

# Seconds the brokers of several that have jobs queued each hold most of the credit at
# least, in turn (the pure twin's SLICE).
cdef double SLICE = _SLICE


cdef inline int _hungry(Link *k) noexcept nogil:
    """Its broker sent all it was told (it may have more), and may send again."""
    return k.sock != NULL and not k.probing and k.share <= k.in_hand - k.orphans

JOIN_SLICE = 0.1
"""Seconds run() waits for the loop thread at a time (see run())."""

# Signals a process is sent to stop or be told something; the threads of a session block
# them, so the kernel delivers them to a thread that does not (the main one, whose
# handlers Python runs), not to a thread that would only set Python's flag.
_ASYNC_SIGNALS = {
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
}


def _main_thread_takes_signals():
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# The parts, in dependency order (each only uses the ones above it).
include "compiled/zero_copy.pxi"
include "compiled/rings.pxi"
include "compiled/link.pxi"


def open_sessions(worker):
    """The sessions of one Worker.run(): one, whatever the number of brokers (a Link
    each, one loop, one job table, one pool of job threads)."""
    return [Session(worker)]


cdef class Session:
    """Runs one worker's loop until it has stopped and hung up: its connections to its
    brokers (a Link each, compiled/link.pxi), one job table and one pool of job threads
    for all of them, the credit exact across them. The pure Session's methods."""

    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)
        pthread_cond_init(&self.jobs_waiting, NULL)
        pthread_cond_init(&self.threads_wanted, NULL)

    def __init__(self, worker, addresses=None, wake_pipe=None, stats=None):
        from fastbroker.wakepipe import WakePipe

        cdef int i
        self.worker = worker
        self.addresses = list(worker.brokers if addresses is None else addresses)
        self.address = ",".join(self.addresses)
        self.wake_pipe = worker.wake_pipe if wake_pipe is None else wake_pipe  # stop(), signals
        self.stats = list(worker._link_stats if stats is None else stats)
        if not self.addresses or len(self.stats) != len(self.addresses):
            raise ValueError("a Session needs one WorkerStats per broker")
        self.addresses_c = [address.encode() for address in self.addresses]
        self.link_count = len(self.addresses)
        self.links = <Link *>calloc(self.link_count, sizeof(Link))
        self.poll_items = calloc(2 + self.link_count, sizeof(zpollitem))
        if self.links == NULL or self.poll_items == NULL:
            raise MemoryError()
        for i in range(self.link_count):
            _link_init(&self.links[i], i, <const char *>(<bytes>self.addresses_c[i]))
        self.wake_fd = self.wake_pipe.read_fd
        self.result_pipe = WakePipe()  # job threads -> loop
        self.result_fd = self.result_pipe.read_fd
        self.result_write_fd = self.result_pipe.write_fd
        self.context = <void *><size_t>worker.context.underlying
        curve = worker.curve
        self.curve_secret = None if curve is None else curve.secret
        self.curve_public = None if curve is None else curve.public
        self.curve_server = None if curve is None else curve.server_key
        self.has_curve = curve is not None
        if self.has_curve:  # C pointers into the bytes this object keeps, for the loop
            self.curve_secret_c, self.curve_sizes[0] = self.curve_secret, len(self.curve_secret)
            self.curve_public_c, self.curve_sizes[1] = self.curve_public, len(self.curve_public)
            self.curve_server_c, self.curve_sizes[2] = self.curve_server, len(self.curve_server)
        self.heartbeat = worker.heartbeat
        self.silence = worker.liveness * worker.heartbeat
        self.reconnect_max = worker.reconnect_max or self.silence
        self.stop_grace = worker.stop_grace
        self.linger_ms = worker.linger_ms
        self.credit = worker.credit
        self.prefetch = worker.prefetch
        # One broker never sends beyond the credit it was told; several may together.
        self.limit = self.credit + self.prefetch
        self.has_limit = self.link_count > 1
        # With several brokers, each is told a share of the credit (Link.share).
        self.fair_share = max(1, self.limit // self.link_count)
        self.holder = 0
        self.holder_since = 0.0
        self.batched = worker.batched
        self.views_min = -1 if worker.zero_copy_min is None else max(1, worker.zero_copy_min)
        self.batch_max = self.credit + self.prefetch if self.batched else 1
        # Outcomes that wake the loop while jobs wait (see _finish): half the credit; with
        # prefetch, none (the prefetched jobs keep the threads busy through a round trip).
        self.flush_at = max(1, self.credit // 2) if not self.prefetch else INT_MAX
        self.worker_protocol = worker.protocol
        for i in range(self.link_count):
            self.links[i].v2 = worker.protocol == 2
            self.links[i].spare_since = -1.0
        self.threads = []
        self.pace = 1
        self.thread_count = 0
        self.closed = False
        _watch_at_exit(self)

    def __dealloc__(self):
        cdef int i
        if self.slots != NULL:
            for i in range(self.slots_cap):
                if self.slots[i].frames != NULL:
                    _close_all(self.slots[i].frames, self.slots[i].nframes)
                    free(self.slots[i].frames)
            free(self.slots)
        if self.links != NULL:
            for i in range(self.link_count):
                _link_free(&self.links[i])
            free(self.links)
        free(self.poll_items)
        free(self.free_slots.items)
        free(self.waiting.items)
        free(self.done.items)
        free(self.extends.items)
        pthread_cond_destroy(&self.jobs_waiting)
        pthread_cond_destroy(&self.threads_wanted)
        pthread_mutex_destroy(&self.lock)

    # -- what Python calls -------------------------------------------------------------

    def run(self):
        """Serve until the worker stops, then hang up; the loop runs on a thread of its
        own while this one waits (so a signal handler of the main thread still runs)."""
        global _out_of_memory, _running_sessions
        if self.worker.stopping:
            self.stop_requested = 1
        if not _running_sessions:
            _out_of_memory = 0  # an earlier run's failure must not end this one
        _running_sessions += 1
        try:
            self._run()
        finally:
            _running_sessions -= 1
            self._emit_logs()  # what the loop said last

    def _run(self):
        self.spawner = threading.Thread(target=self._spawn_threads, name="fastbroker-worker-spawner", daemon=True)
        self.spawner.start()
        loop = threading.Thread(target=self._run_loop, name=f"fastbroker-worker-io {self.address}", daemon=True)
        loop.start()
        try:
            # In slices: a signal the kernel delivers to another thread only sets Python's
            # flag, and the handler (Worker.stop) runs when this thread next wakes.
            while loop.is_alive():
                loop.join(JOIN_SLICE)
        except BaseException:
            self.aborting = 1
            self.wake_pipe.wake()
            loop.join()
            self.shutdown(wait=False, cancel_waiting=True)
            raise
        if self.result_code == LOOP_STOPPED:
            self.shutdown(wait=True)
            self.spawner.join()
            self.result_pipe.close()
            return
        self.shutdown(wait=False, cancel_waiting=True)
        self.spawner.join()
        if self.failure is not None:
            raise self.failure
        if self.result_code == LOOP_NO_MEMORY:
            raise MemoryError("the worker's session ran out of memory")
        raise RuntimeError("the worker's session ended: its ZeroMQ context was terminated")

    def _run_loop(self):
        _main_thread_takes_signals()
        with nogil:
            self.result_code = self._loop()

    def request_stop(self):
        """From Worker.stop() (any thread, a signal handler): hang up gracefully."""
        self.stop_requested = 1
        self.wake_pipe.wake()

    def shutdown(self, wait, cancel_waiting=False):
        """Let the job threads end (without the jobs still waiting, with `cancel_waiting`);
        with `wait`, until they have. Jobs running then keep the result pipe open."""
        cdef int slot
        pthread_mutex_lock(&self.lock)
        self.pool_closed = 1
        if cancel_waiting:
            while self.waiting.count:
                slot = <int>_ring_pop(&self.waiting)
                self.links[self.slots[slot].link].in_hand -= 1
                self._free_slot(slot)
                self.in_hand -= 1
        pthread_cond_broadcast(&self.jobs_waiting)
        pthread_cond_broadcast(&self.threads_wanted)
        pthread_mutex_unlock(&self.lock)
        self.closed = True
        if self.in_hand:
            # Jobs still running will write to the pipes when done: keep their fds.
            self.worker._keep_wake_pipe = True
        if wait:
            for thread in list(self.threads):
                thread.join()

    def update_stats(self):
        """Copy each link's counters into its WorkerStats."""
        cdef int i
        cdef Link *k
        for i in range(self.link_count):
            k = &self.links[i]
            stats = self.stats[i]
            for j, name in enumerate(STAT_NAMES):
                setattr(stats, name, k.counters[j])
            stats.protocol = 0 if not k.counters[N_CONNECTS] else (2 if k.v2 else 1)

    def job_cancelled(self, int number, task_id):
        """Worker.cancelled(): whether the broker cancelled this running job."""
        cdef int cancelled
        pthread_mutex_lock(&self.lock)
        cancelled = self.slots[number].cancelled
        pthread_mutex_unlock(&self.lock)
        return cancelled != 0

    def request_extend(self, int number, task_id, seconds):
        """In a job thread (Worker.extend): ask the loop to send EXTEND for the job."""
        cdef long long ms = max(1, min(round(seconds * 1000), 0xFFFFFFFF))
        cdef int wake
        pthread_mutex_lock(&self.lock)
        _ring_push(&self.extends, (<long long>number << 32) | ms)
        wake = not self.results_pending
        self.results_pending = 1
        pthread_mutex_unlock(&self.lock)
        if wake:
            write(self.result_write_fd, &_WAKE_BYTE, 1)
    # -- the job threads -----------------------------------------------------------------

    def _spawn_threads(self):
        """Starts the job threads the loop asks for (it cannot: that takes the GIL): the
        first when the first job comes, more when jobs wait (_pace_threads)."""
        cdef int wanted, closed
        _main_thread_takes_signals()  # and the job threads, which this one starts
        while True:
            with nogil:
                pthread_mutex_lock(&self.lock)
                while not self.spawn_wanted and not self.log_count and not self.pool_closed:
                    pthread_cond_wait(&self.threads_wanted, &self.lock)
                wanted = self.spawn_wanted
                self.spawn_wanted = 0
                closed = self.pool_closed
                pthread_mutex_unlock(&self.lock)
            self._emit_logs()
            if closed:
                return
            for _ in range(wanted):
                thread = threading.Thread(target=self._serve, name=f"fastbroker-job_{len(self.threads)}")
                try:
                    thread.start()
                except BaseException as exc:  # no thread for the jobs: the worker cannot go on
                    self.failure = exc
                    self.aborting = 1
                    self.wake_pipe.wake()
                    return
                self.threads.append(thread)

    def _emit_logs(self):
        """Write the lines the loop queued (in a Python thread: the spawner, or run())."""
        cdef LogRecord records[LOG_QUEUE]
        cdef int n, lost, i
        pthread_mutex_lock(&self.lock)
        n = self.log_count
        memcpy(records, self.logs, n * sizeof(LogRecord))
        self.log_count = 0
        lost = self.logs_lost
        self.logs_lost = 0
        pthread_mutex_unlock(&self.lock)
        for i in range(n):
            level, text = LOG_FORMATS[records[i].what]
            if not log.isEnabledFor(level):
                continue
            task = (<bytes>records[i].task_id[:16]).hex()
            address = self.addresses[records[i].link]
            log.log(level, "%s", text.format(address=address, task=task, a=records[i].a, b=records[i].b))
        if lost:
            log.warning("%d log line(s) of the session with %s were lost (too many at once)", lost, self.address)

    def _serve(self):
        worker = self.worker
        local = worker._job_local
        process = direct_process(worker)  # a Python call less per job, if not None
        first = True
        while True:
            try:
                jobs = self._take(self.batch_max, first)
            except MemoryError:  # _take has ended the session (see _out_of_memory)
                log.exception("a job thread could not take its job")
                return
            first = False
            if jobs is None:
                return
            try:
                if self.batched:
                    outcomes = run_batch(worker, [payload for _, _, payload in jobs])
                    for (number, _, _), (answer, error) in zip(jobs, outcomes):
                        self._finish(number, answer, error)
                    continue
                number, task_id, payload = jobs[0]
                local.job = (task_id, self, number)
                try:
                    answer, error = run_one(worker, task_id, payload, self, number, process)
                finally:
                    local.job = None
                self._finish(number, answer, error)
            except BaseException:  # run_one() reports the job's own errors: this is a bug
                log.exception("a job thread failed")

    def _take(self, int most, bint first):
        """Up to `most` jobs as [(number, task id, payload frames)], waiting for one
        without the GIL; None once the pool is closed. `first`: the thread's first call
        (it was one of those `starting`)."""
        cdef int n = 0, i, j
        cdef int number_one, count_one
        cdef zmsg *payload_one
        cdef uint8_t id_one[16]
        cdef int *numbers = &number_one
        cdef zmsg **payloads = &payload_one
        cdef int *counts = &count_one
        cdef uint8_t *ids = id_one
        if most > 1:
            numbers = <int *>malloc(most * sizeof(int))
            payloads = <zmsg **>malloc(most * sizeof(zmsg *))
            counts = <int *>malloc(most * sizeof(int))
            ids = <uint8_t *>malloc(most * 16)
            if numbers == NULL or payloads == NULL or counts == NULL or ids == NULL:
                free(numbers)
                free(payloads)
                free(counts)
                free(ids)
                self._end_out_of_memory()
                raise MemoryError()
        # With the GIL first: while jobs wait, a thread keeps it from one job to the next
        # (as the pure pool's threads do), instead of handing it around at every job.
        pthread_mutex_lock(&self.lock)
        if first:
            self.starting -= 1
        if self.waiting.count == 0 and not self.pool_closed:
            pthread_mutex_unlock(&self.lock)
            with nogil:
                pthread_mutex_lock(&self.lock)
                while self.waiting.count == 0 and not self.pool_closed:
                    self.idle_threads += 1
                    pthread_cond_wait(&self.jobs_waiting, &self.lock)
                    self.idle_threads -= 1
                n = self._take_waiting(most, numbers, payloads, counts, ids)
                pthread_mutex_unlock(&self.lock)
        else:
            n = self._take_waiting(most, numbers, payloads, counts, ids)
            pthread_mutex_unlock(&self.lock)
        jobs = None
        try:
            if n:
                jobs = []
                for i in range(n):
                    payload = [self._payload_frame(&payloads[i][j]) for j in range(counts[i])]
                    jobs.append((numbers[i], PyBytes_FromStringAndSize(<char *>ids + i * 16, 16), payload))
        except MemoryError:
            # Jobs taken and not run would hold the credit for ever: end the session (the
            # broker re-queues what this worker held when it sees it gone).
            self._end_out_of_memory()
            raise
        finally:
            for i in range(n):
                _close_all(payloads[i], counts[i])
                free(payloads[i])
            if most > 1:
                free(ids)
                free(numbers)
                free(payloads)
                free(counts)
        return jobs

    def _end_out_of_memory(self):
        """A job thread could not allocate: the loop ends (LOOP_NO_MEMORY) at once."""
        global _out_of_memory
        _out_of_memory = 1
        write(self.result_write_fd, &_WAKE_BYTE, 1)

    cdef object _payload_frame(self, zmsg *frame):
        """A payload frame for the job: bytes (a copy), or a view of the message itself
        (moved out of `frame`) when Worker.zero_copy_min says so."""
        cdef ReceivedFrame lent
        cdef size_t size = zmsg_size(frame)
        if self.views_min < 0 or size < <size_t>self.views_min:
            return PyBytes_FromStringAndSize(<char *>zmsg_data(frame), size)
        lent = ReceivedFrame.__new__(ReceivedFrame)
        zmsg_move(&lent.msg, frame)
        return memoryview(lent)

    cdef int _take_waiting(self, int most, int *numbers, zmsg **payloads, int *counts,
                           uint8_t *ids) noexcept nogil:
        """With the lock: move up to `most` waiting jobs out of the table (now running)."""
        cdef int n = 0, slot
        while self.waiting.count and n < most:
            slot = <int>_ring_pop(&self.waiting)
            self.slots[slot].state = S_RUNNING
            numbers[n] = slot
            payloads[n] = self.slots[slot].frames
            counts[n] = self.slots[slot].nframes
            memcpy(ids + n * 16, self.slots[slot].task_id, 16)
            self.slots[slot].frames = NULL
            self.slots[slot].nframes = 0
            n += 1
        return n

    def _finish(self, int number, answer, error):
        """In a job thread: put the job's outcome back for the loop to send."""
        cdef list frames
        cdef int kind, n, i, wake
        cdef Py_ssize_t size
        cdef bytes frame
        if answer is not None:
            frames, kind = answer, K_ANSWER
        else:
            frames, kind = [error[0].encode(), error[1].encode("utf-8", "replace")], K_FAILED
        n = len(frames)
        cdef zmsg *msgs = <zmsg *>malloc((n or 1) * sizeof(zmsg))
        if msgs == NULL:
            self._end_out_of_memory()
            raise MemoryError()
        for i in range(n):
            frame = frames[i]
            size = PyBytes_GET_SIZE(frame)
            if size >= _ANSWER_ZERO_COPY_MIN:
                _start_releaser()
                Py_INCREF(frame)  # until _release_answer (see above)
                if zmsg_init_data(&msgs[i], PyBytes_AS_STRING(frame), size, _release_answer, <PyObject *>frame) == 0:
                    continue
                Py_DECREF(frame)
            _put_bytes(&msgs[i], PyBytes_AS_STRING(frame), size)
        pthread_mutex_lock(&self.lock)
        self.slots[number].frames = msgs
        self.slots[number].nframes = n
        self.slots[number].kind = kind
        self.slots[number].state = S_DONE
        _ring_push(&self.done, number)
        # While jobs wait for a thread (prefetch), the loop sleeps at most
        # BACKLOG_POLL: an outcome need not wake it, and goes with the others of that
        # moment (one ANSWER, one wake-up, for many). Only the loop adds waiting jobs,
        # so a loop asleep with none waiting is always woken. Half the credit's outcomes
        # wake it all the same: the broker, told, sends the next jobs while the threads
        # run the rest (else they would run out of jobs and wait a round trip for more).
        wake = not self.results_pending and (not self.waiting.count or self.done.count >= self.flush_at)
        if wake:
            self.results_pending = 1
        pthread_mutex_unlock(&self.lock)
        if wake:
            write(self.result_write_fd, &_WAKE_BYTE, 1)

    # -- the loop (its own thread, no GIL) ---------------------------------------------------

    cdef int _loop(self) noexcept nogil:
        cdef double now
        cdef int i
        if not self.stop_requested:
            now = _now()
            for i in range(self.link_count):
                if _link_open(self, &self.links[i], now) < 0:
                    self._end()
                    return LOOP_NO_CONTEXT
        while True:
            now = _now()
            if self.aborting:
                self._end()
                return LOOP_ABORTED
            if _out_of_memory:
                self._end()
                return LOOP_NO_MEMORY
            if self.terminated:
                self._end()
                return LOOP_NO_CONTEXT
            self._collect()
            self._pace_threads(now)
            if self.has_limit and not self.stopping:
                self._share_credit(now)
            if self.stop_requested and not self.stopping:
                self.stopping = 1
                self._log(0, L_STOPPING, self.in_hand, 0, NULL)
            for i in range(self.link_count):
                if _link_turn(self, &self.links[i], now) < 0:
                    self._end()
                    return LOOP_NO_CONTEXT
            if self.stopping and self._finished(now):
                for i in range(self.link_count):
                    _link_hang_up(self, &self.links[i])
                return LOOP_STOPPED
            self._poll(now)

    cdef void _end(self) noexcept nogil:
        """The loop ends without hanging up: every socket closed at once, what was left
        to send dropped (the brokers re-queue what this worker held when they see it gone)."""
        cdef int i
        for i in range(self.link_count):
            _link_close_socket(&self.links[i], 0)
            _link_drop_outbox(self, &self.links[i])

    cdef void _log(self, int link, int what, double a, double b, const uint8_t *task_id) noexcept nogil:
        """Queue a log line about `link` for the spawner thread to write (the loop never
        takes the GIL); without the lock held. Lines beyond LOG_QUEUE waiting are
        counted, not kept."""
        cdef LogRecord *record
        pthread_mutex_lock(&self.lock)
        if self.log_count == LOG_QUEUE:
            self.logs_lost += 1
        else:
            record = &self.logs[self.log_count]
            record.what = what
            record.link = link
            record.a = a
            record.b = b
            if task_id != NULL:
                memcpy(record.task_id, task_id, 16)
            self.log_count += 1
            pthread_cond_signal(&self.threads_wanted)
        pthread_mutex_unlock(&self.lock)

    cdef void _poll(self, double now) noexcept nogil:
        """Wait for a wake-up, an outcome, a message from any broker (or room to send to
        one with something waiting) or the next timer, and read what came."""
        cdef zpollitem *items = <zpollitem *>self.poll_items
        cdef int n = 0, i, rc, links_at
        cdef double due = -1.0, wait, when
        cdef long timeout
        cdef Link *k
        items[n].socket = NULL
        items[n].fd = self.wake_fd
        items[n].events = ZPOLLIN
        n += 1
        items[n].socket = NULL
        items[n].fd = self.result_fd
        items[n].events = ZPOLLIN
        n += 1
        links_at = n
        for i in range(self.link_count):
            k = &self.links[i]
            when = _link_due(self, k, now)
            if when >= 0 and (due < 0 or when < due):
                due = when
            if k.sock != NULL:
                items[n].socket = k.sock
                items[n].fd = i  # the link's number: zmq_poll ignores fd when socket is set
                items[n].events = ZPOLLIN | (ZPOLLOUT if k.outbox.count else 0)
                n += 1
            if k.spare_since >= 0 and not self.stopping:
                when = k.spare_since + DRY_AFTER  # see _share_credit
                if due < 0 or when < due:
                    due = when
        wait = due - now if due >= 0 else self.heartbeat
        pthread_mutex_lock(&self.lock)
        if self.waiting.count and wait > BACKLOG_POLL:
            wait = BACKLOG_POLL  # outcomes may come without a wake-up (see _finish)
        pthread_mutex_unlock(&self.lock)
        if wait < 0:
            wait = 0
        # Round up: waking a hair early would spin through a turn with nothing due.
        timeout = <long>(wait * 1000)
        if timeout < wait * 1000:
            timeout += 1
        rc = zpoll(items, n, timeout)
        if rc < 0 and zerrno() == ZETERM:
            self.terminated = 1  # the context was terminated under us: the loop ends
        if rc <= 0:
            return  # nothing, or EINTR
        for i in range(links_at):
            if items[i].revents:
                self._drain(items[i].fd)
        for i in range(links_at, n):
            if items[i].revents & ZPOLLIN:
                _link_receive(self, &self.links[items[i].fd])

    cdef void _drain(self, int fd) noexcept nogil:
        cdef char buffer[4096]
        cdef int _
        for _ in range(64):  # bounded: a pipe holds at most 64 KiB here
            if read(fd, buffer, 4096) < 4096:
                return

    cdef int _finished(self, double now) noexcept nogil:
        """A stopping worker may hang up: no job in hand, and nothing left to send to
        any broker (see _link_finished)."""
        cdef int i
        if self.in_hand:
            return 0
        for i in range(self.link_count):
            if not _link_finished(&self.links[i], now):
                return 0
        return 1

    # -- the job table: jobs in, outcomes out -----------------------------------------------

    cdef void _start_job(self, Link *k, const uint8_t *task_id, int first, int count) noexcept nogil:
        """With the lock: a job from `k` for the threads, its payload moved from the
        link's received frames; given back (RETURN) if the credit is full."""
        cdef int slot, i
        cdef Slot *s
        global _out_of_memory
        if self.has_limit and self.in_hand >= self.limit:
            # Full (a broker sent it before it read a lowered share, or a probe): given back.
            _link_hold_back(k, task_id)
            return
        slot = self._new_slot()
        if slot < 0:
            return
        s = &self.slots[slot]
        s.frames = <zmsg *>malloc((count or 1) * sizeof(zmsg))
        if s.frames == NULL:
            _out_of_memory = 1
            self._free_slot(slot)
            return
        for i in range(count):
            zmsg_init(&s.frames[i])
            zmsg_move(&s.frames[i], &k.frames[first + i])
        s.nframes = count
        memcpy(s.task_id, task_id, 16)
        s.state = S_WAITING
        s.kind = K_ANSWER
        s.link = k.index
        s.generation = k.generation
        s.cancelled = 0
        s.since = k.last_heard  # when its message came
        self.in_hand += 1
        k.in_hand += 1
        k.spare_since = -1.0  # its broker has jobs (see _share_credit)
        k.probing = 0
        if k.index == self.holder:
            self.holder_jobs += 1
        k.counters[N_RECEIVED] += 1
        _ring_push(&self.waiting, slot)
        if self.waiting.count == 1 and self.idle_threads:
            # One idle thread is woken for the jobs that come together: it runs them back
            # to back, keeping the GIL while jobs wait (see _take). More threads only if
            # they stop keeping up (_pace_threads): woken at once, they would all fight
            # for the GIL over jobs that one thread runs in microseconds.
            pthread_cond_signal(&self.jobs_waiting)
        elif self.thread_count == 0:
            self._add_threads(1)

    cdef void _cancel(self, Link *k, const uint8_t *task_id) noexcept nogil:
        """CANCEL from `k`'s broker: a job no thread has taken is withdrawn and FAILED at
        once; a running one is marked (Worker.cancelled()) and answered when it returns."""
        cdef int slot, running = 0, withdrawn = 0
        global _out_of_memory
        cdef Slot *s
        pthread_mutex_lock(&self.lock)
        for slot in range(self.slots_cap):
            s = &self.slots[slot]
            if s.state < S_WAITING or s.state > S_DONE or s.link != k.index or memcmp(s.task_id, task_id, 16) != 0:
                continue
            k.counters[N_CANCELLED] += 1
            if s.state != S_WAITING:
                s.cancelled = 1
                running += 1
                continue
            k.counters[N_CANCELLED_UNSTARTED] += 1
            withdrawn += 1
            _ring_remove(&self.waiting, slot)
            _close_all(s.frames, s.nframes)
            s.nframes = 0
            self.in_hand -= 1
            k.in_hand -= 1
            if s.generation != k.generation:
                k.orphans -= 1
            # As for any FAILED, only on the connection the job came on.
            if s.generation != k.generation or k.sock == NULL:
                self._free_slot(slot)
                continue
            free(s.frames)
            s.frames = <zmsg *>malloc(2 * sizeof(zmsg))
            if s.frames == NULL:
                _out_of_memory = 1
                s.nframes = 0
                self._free_slot(slot)
                continue
            s.nframes = 2
            _put_bytes(&s.frames[0], _CANCELLED_TYPE, _CANCELLED_TYPE_SIZE)
            _put_bytes(&s.frames[1], _CANCELLED_TEXT, _CANCELLED_TEXT_SIZE)
            s.kind = K_FAILED
            s.state = S_OUTBOX
            _ring_push(&k.outbox, slot)
        pthread_mutex_unlock(&self.lock)
        if running:
            self._log(k.index, L_CANCEL_RUNNING, 0, 0, task_id)
        if withdrawn:
            self._log(k.index, L_CANCEL_WAITING, 0, 0, task_id)

    cdef void _collect(self) noexcept nogil:
        """Take the outcomes and EXTENDs the job threads put back since the last turn,
        into the outbox of the link each job came from."""
        cdef int slot, number
        cdef long long item
        cdef Slot *s
        cdef Slot *job
        cdef Link *k
        global _out_of_memory
        cdef uint8_t ms[4]
        pthread_mutex_lock(&self.lock)
        # Before taking them: one put back from now on wakes the loop again.
        self.results_pending = 0
        while self.done.count:
            slot = <int>_ring_pop(&self.done)
            s = &self.slots[slot]
            k = &self.links[s.link]
            self.in_hand -= 1
            k.in_hand -= 1
            if s.generation != k.generation:
                k.orphans -= 1
            if s.kind == K_ANSWER:
                k.counters[N_ANSWERED] += 1
                s.state = S_OUTBOX
                _ring_push(&k.outbox, slot)
                continue
            k.counters[N_FAILED] += 1
            if s.generation == k.generation and k.sock != NULL:
                s.state = S_OUTBOX
                _ring_push(&k.outbox, slot)
            else:  # the broker re-queues the jobs of a connection it lost
                self._free_slot(slot)
        while self.extends.count:
            item = _ring_pop(&self.extends)
            number = <int>(item >> 32)
            if self.slots[number].state != S_RUNNING:
                continue  # it has ended
            slot = self._new_slot()
            if slot < 0:
                break
            job = &self.slots[number]
            s = &self.slots[slot]
            memcpy(s.task_id, job.task_id, 16)
            s.link = job.link
            s.generation = job.generation
            s.kind = K_EXTEND
            s.state = S_OUTBOX
            s.frames = <zmsg *>malloc(sizeof(zmsg))
            if s.frames == NULL:
                _out_of_memory = 1
                self._free_slot(slot)
                break
            s.nframes = 1
            ms[0] = (item >> 24) & 0xFF
            ms[1] = (item >> 16) & 0xFF
            ms[2] = (item >> 8) & 0xFF
            ms[3] = item & 0xFF
            _put_bytes(&s.frames[0], ms, 4)
            _ring_push(&self.links[s.link].outbox, slot)
        pthread_mutex_unlock(&self.lock)

    # -- how many job threads ---------------------------------------------------------------

    cdef void _pace_threads(self, double now) noexcept nogil:
        """A job has waited BACKLOG_POLL for a thread: the threads there are are busy (a
        process() that sleeps, waits on I/O or runs for more than microseconds), so wake
        or start more: one the first time, twice as many each time a job has waited that
        long again before none waits, up to the credit. A process() that is quick gets one
        thread, which takes every job."""
        cdef int wanted, woken
        if now - self.last_pace < BACKLOG_POLL:
            return
        self.last_pace = now
        pthread_mutex_lock(&self.lock)
        if self.pool_closed or not self.waiting.count:
            self.pace = 1  # the threads caught up
            pthread_mutex_unlock(&self.lock)
            return
        if now - self.slots[<int>_ring_at(&self.waiting, 0)].since < BACKLOG_POLL:
            pthread_mutex_unlock(&self.lock)  # the oldest waiting job is young: they keep up
            return
        wanted = min(self.pace, self.waiting.count)
        woken = min(wanted, self.idle_threads)
        for _ in range(woken):
            pthread_cond_signal(&self.jobs_waiting)
        self._add_threads(wanted - woken - self.starting)
        self.pace = min(2 * self.pace, self.credit)
        pthread_mutex_unlock(&self.lock)

    cdef void _add_threads(self, int n) noexcept nogil:
        """With the lock: ask the spawner for `n` more job threads, within the credit."""
        if n > self.credit - self.thread_count:
            n = self.credit - self.thread_count
        if n <= 0:
            return
        self.thread_count += n
        self.starting += n
        self.spawn_wanted += n
        pthread_cond_signal(&self.threads_wanted)

    # -- the credit across several brokers ----------------------------------------------------

    cdef int _opening_share(self, Link *k) noexcept nogil:
        """The share a broker is told on a new connection: a fair share of the room no
        other broker may fill, at least one job more than it holds (see the pure Session)."""
        cdef int room = self.limit - self.in_hand, i, spare
        cdef int own = k.in_hand - k.orphans
        cdef Link *other
        for i in range(self.link_count):
            other = &self.links[i]
            if other != k and other.sock != NULL and not other.probing:
                spare = other.share - other.in_hand + other.orphans
                if spare > 0:
                    room -= spare
        return max(own + 1, min(self.fair_share, own + room))

    cdef void _share_credit(self, double now) noexcept nogil:
        """Split the credit between the brokers so that together they never send more
        than it: of the hungry ones, the holder gets what the others do not use, in turn
        once it held the turn SLICE and had a job in it, and the others 0; a dry one is
        told 1, not counted (probing). See the pure Session."""
        cdef int room = self.limit - self.in_hand, told = 0, hungry = 0
        cdef int i, own, spare, wanted, share
        cdef Link *k = &self.links[self.holder]
        cdef int holder_gone = k.sock == NULL or k.probing  # or found dry now
        for i in range(self.link_count):
            k = &self.links[i]
            if k.sock == NULL or k.probing:
                continue
            own = k.in_hand - k.orphans
            spare = k.share - own
            if spare > 0:
                if k.spare_since < 0:
                    k.spare_since = now  # reset by each job that comes (_start_job)
                elif now - k.spare_since >= DRY_AFTER:
                    k.share = 1
                    k.spare_since = -1.0
                    k.probing = 1
                    if i == self.holder:
                        holder_gone = 1
                    continue
                room -= spare
                told += k.share
            else:
                k.spare_since = -1.0
                hungry += 1
        if not hungry:
            return
        if holder_gone or (self.holder_jobs and now - self.holder_since >= SLICE):
            k = &self.links[self.holder]
            for i in range(1, self.link_count):  # the next hungry one; else the turn goes on
                if _hungry(&self.links[(self.holder + i) % self.link_count]):
                    self.holder = (self.holder + i) % self.link_count
                    self.holder_since = now
                    self.holder_jobs = 0
                    if not holder_gone:
                        # Its turn is over even if its jobs in flight leave it room now.
                        spare = k.share - k.in_hand + k.orphans
                        if spare > 0:
                            room += spare
                            told -= k.share
                        k.share = 0
                    break
        for i in range(self.link_count):
            k = &self.links[i]
            if not _hungry(k):
                continue
            wanted = max(1, self.limit - told) if i == self.holder else 0
            if k.share > wanted:
                k.share = wanted
            elif k.share < wanted and room > 0:
                own = k.in_hand - k.orphans
                share = min(wanted, max(k.share, own) + room)
                room -= max(0, share - own)
                k.share = share

    # -- the slot table (with the lock) ---------------------------------------------------------

    cdef int _new_slot(self) noexcept nogil:
        cdef int cap, i
        cdef Slot *grown
        global _out_of_memory
        if not self.free_slots.count:
            cap = self.slots_cap * 2 if self.slots_cap else 64
            grown = <Slot *>realloc(self.slots, cap * sizeof(Slot))
            if grown == NULL:
                _out_of_memory = 1
                return -1
            memset(grown + self.slots_cap, 0, (cap - self.slots_cap) * sizeof(Slot))
            self.slots = grown
            for i in range(self.slots_cap, cap):
                _ring_push(&self.free_slots, i)
            self.slots_cap = cap
            if _out_of_memory:
                return -1
        return <int>_ring_pop(&self.free_slots)

    cdef void _free_slot(self, int slot) noexcept nogil:
        cdef Slot *s = &self.slots[slot]
        if s.frames != NULL:
            _close_all(s.frames, s.nframes)
            free(s.frames)
        s.frames = NULL
        s.nframes = 0
        s.state = S_FREE
        s.cancelled = 0
        _ring_push(&self.free_slots, slot)

    cdef void _lock_free_slot(self, int slot) noexcept nogil:
        pthread_mutex_lock(&self.lock)
        self._free_slot(slot)
        pthread_mutex_unlock(&self.lock)
