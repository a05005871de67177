# The compiled worker session's state (its code: _session.pyx). Declared here as the
# broker core's classes are in _core.pxd, so that a reader sees every field at once.

from libc.stdint cimport uint8_t, uint64_t

from fastbroker._zmqdl cimport zmsg


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass


# A slot of the job table: a job in hand (its payload while it waits for a thread), then
# its outcome until sent and confirmed; also an EXTEND or a RETURN waiting to be sent.
cdef struct Slot:
    int state  # S_* below
    int kind  # K_*: what the outbox sends for it
    int link  # the Link (broker) its job came from, and whose outbox sends it
    int generation  # of that link's connection its job came on
    int cancelled  # the broker sent CANCEL while it runs
    double since  # when it came (while it waits for a thread: see Session._pace_threads)
    uint8_t task_id[16]
    int nframes
    zmsg *frames  # payload (waiting), answer or failure (done), milliseconds (extend)


# A line the loop asks the spawner thread to log (the loop never takes the GIL).
cdef struct LogRecord:
    int what  # L_* in _session.pyx, a key of LOG_FORMATS
    int link  # the Link it is about
    double a, b
    uint8_t task_id[16]


# A growable ring of integers (job slots, link numbers, or extend requests as
# number << 32 | ms).
cdef struct Ring:
    long long *items
    int cap
    int head
    int count


# A session's connection to one broker (its code: compiled/link.pxi). Only the loop
# thread touches it, but for the outbox rings, which hold slots of the job table.
cdef struct Link:
    int index  # in Session.links, and in Session.addresses
    const char *address  # into Session.addresses_c
    void *sock  # NULL while away
    int v2, offered_v2, generation, heard, announced, failures
    double last_heard, next_heartbeat, reconnect_at, quiet_at
    int in_hand  # jobs of this broker in hand
    int orphans  # of them, those of an earlier connection (or registration)
    # With several brokers, the credit this one is told (Session._share_credit),
    # counting the jobs of this connection only, and since when it has left more than
    # one of them unused (-1: it has not).
    int share
    double spare_since
    int probing  # its broker had nothing queued: it may send one job, not counted
    uint8_t *returns  # task ids to give back (RETURN), 16 bytes each
    int returns_count, returns_cap
    Ring outbox, unconfirmed
    uint64_t counters[12]  # N_* in _session.pyx, copied to its WorkerStats by update_stats()
    # Scratch for the message being received (`frames`) and the one being sent (`out`).
    zmsg *frames
    int frames_cap
    zmsg *out
    int out_cap


cdef class Session:
    cdef readonly object worker
    cdef readonly str address  # the brokers, comma-separated (for names and logs)
    cdef readonly list addresses
    cdef list stats  # a WorkerStats per link
    cdef object wake_pipe  # the worker's: stop(), signals
    cdef list addresses_c  # bytes kept for the links' C pointers
    cdef Link *links
    cdef int link_count
    cdef int limit  # jobs in hand at most (credit + prefetch), checked with several links
    cdef int has_limit
    cdef int fair_share  # with several links: the credit over the links, at least 1
    cdef int holder  # the hungry link that gets most of the credit (_share_credit)
    cdef double holder_since
    cdef int holder_jobs  # jobs that came from the holder in its turn
    cdef int wake_fd
    cdef void *poll_items  # zpollitem[2 + link_count], for _poll
    cdef object result_pipe
    cdef readonly list threads
    cdef object failure  # an exception from the job threads' start, raised by run()
    cdef const char *curve_secret_c
    cdef const char *curve_public_c
    cdef const char *curve_server_c
    cdef size_t curve_sizes[3]  # secret, public, server
    cdef bytes curve_secret, curve_public, curve_server  # CURVE keys (None: plain)
    cdef int has_curve
    cdef object __weakref__  # the at-exit hook keeps sessions in a WeakSet
    cdef void *context
    cdef int result_fd, result_write_fd
    # Settings, read from the worker once.
    cdef double heartbeat, silence, reconnect_max, stop_grace
    cdef int linger_ms, credit, prefetch, batch_max, worker_protocol, batched
    cdef long long views_min  # Worker.zero_copy_min, or -1
    cdef int stopping
    cdef int stop_requested  # set by request_stop() (any thread)
    cdef int aborting  # set by run() when its caller is interrupted
    cdef int terminated  # the ZeroMQ context was terminated under the loop
    cdef int in_hand  # jobs in hand, every link's
    cdef int result_code  # how _loop ended: LOOP_* below
    # The job table and its queues; `lock` guards them against the job threads.
    cdef pthread_mutex_t lock
    cdef pthread_cond_t jobs_waiting
    cdef pthread_cond_t threads_wanted
    cdef Slot *slots
    cdef int slots_cap
    cdef Ring free_slots, waiting, done, extends
    cdef int results_pending, idle_threads, thread_count, pool_closed
    cdef int flush_at  # outcomes put back that wake the loop even while jobs wait (_finish)
    cdef int spawn_wanted, starting  # threads the loop asked for, not yet started / not yet waiting
    cdef double last_pace  # when _pace_threads last looked
    cdef int pace  # threads _pace_threads adds next if the jobs still wait
    cdef object spawner
    cdef public bint closed
    cdef LogRecord logs[256]  # LOG_QUEUE
    cdef int log_count, logs_lost

    cdef int _loop(self) noexcept nogil
    cdef void _poll(self, double now) noexcept nogil
    cdef void _drain(self, int fd) noexcept nogil
    cdef int _finished(self, double now) noexcept nogil
    cdef void _end(self) noexcept nogil
    cdef void _start_job(self, Link *k, const uint8_t *task_id, int first, int count) noexcept nogil
    cdef void _cancel(self, Link *k, const uint8_t *task_id) noexcept nogil
    cdef void _collect(self) noexcept nogil
    cdef int _opening_share(self, Link *k) noexcept nogil
    cdef void _share_credit(self, double now) noexcept nogil
    cdef void _pace_threads(self, double now) noexcept nogil
    cdef void _add_threads(self, int n) noexcept nogil
    cdef int _new_slot(self) noexcept nogil
    cdef object _payload_frame(self, zmsg *frame)
    cdef int _take_waiting(self, int most, int *numbers, zmsg **payloads, int *counts,
                           uint8_t *ids) noexcept nogil
    cdef void _free_slot(self, int slot) noexcept nogil
    cdef void _lock_free_slot(self, int slot) noexcept nogil
    cdef void _log(self, int link, int what, double a, double b, const uint8_t *task_id) noexcept nogil
