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
# its outcome until sent and confirmed; also an EXTEND waiting to be sent.
cdef struct Slot:
    int state  # S_* below
    int kind  # K_*: what the outbox sends for it
    int generation  # of the connection its job came on
    int cancelled  # the broker sent CANCEL while it runs
    uint8_t task_id[16]
    int nframes
    zmsg *frames  # payload (waiting), answer or failure (done), milliseconds (extend)


# A line the loop asks the spawner thread to log (the loop never takes the GIL).
cdef struct LogRecord:
    int what  # L_* in _session.pyx, a key of LOG_FORMATS
    double a, b
    uint8_t task_id[16]


# A growable ring of integers (job slots, or extend requests as number << 32 | ms).
cdef struct Ring:
    long long *items
    int cap
    int head
    int count


# A session waiting for room in the gate: where to tell it (its flag and wake pipe).
cdef struct Blocked:
    int *unblocked
    int wake_fd


cdef class CreditGate:
    cdef pthread_mutex_t lock
    cdef readonly int limit
    cdef readonly int held
    cdef Blocked *blocked
    cdef int blocked_count, blocked_cap

    cdef int take(self) noexcept nogil
    cdef void give(self) noexcept nogil
    cdef void block(self, int *unblocked, int wake_fd) noexcept nogil


cdef class Session:
    cdef readonly object worker
    cdef readonly str address
    cdef readonly object stats
    cdef object wake_pipe
    cdef CreditGate gate  # None with one broker
    cdef int has_gate
    cdef int unblocked  # set by the gate (another session's loop): offer the credit again
    cdef int wake_write_fd
    cdef uint8_t *returns  # task ids to give back (RETURN), 16 bytes each
    cdef int returns_count, returns_cap
    cdef object result_pipe
    cdef readonly list threads
    cdef object failure  # an exception from the job threads' start, raised by run()
    cdef bytes address_c
    cdef const char *address_ptr  # into address_c, for the loop
    cdef const char *curve_secret_c
    cdef const char *curve_public_c
    cdef const char *curve_server_c
    cdef size_t curve_sizes[3]  # secret, public, server
    cdef bytes curve_secret, curve_public, curve_server  # CURVE keys (None: plain)
    cdef int has_curve
    cdef object __weakref__  # the at-exit hook keeps sessions in a WeakSet
    cdef void *context
    cdef void *sock
    cdef int wake_fd, result_fd, result_write_fd
    # Settings, read from the worker once.
    cdef double heartbeat, silence, reconnect_max, stop_grace
    cdef int linger_ms, credit, prefetch, batch_max, worker_protocol, batched
    cdef long long views_min  # Worker.zero_copy_min, or -1
    # The connection.
    cdef int v2, offered_v2, generation, heard, announced, failures
    cdef double last_heard, next_heartbeat, reconnect_at, quiet_at
    cdef int stopping
    cdef int stop_requested  # set by request_stop() (any thread)
    cdef int aborting  # set by run() when its caller is interrupted
    cdef int terminated  # the ZeroMQ context was terminated under the loop
    cdef int woken
    cdef int in_hand, orphans
    cdef int result_code  # how _loop ended: LOOP_* below
    # The job table and its queues; `lock` guards them against the job threads.
    cdef pthread_mutex_t lock
    cdef pthread_cond_t jobs_waiting
    cdef pthread_cond_t threads_wanted
    cdef Slot *slots
    cdef int slots_cap
    cdef Ring free_slots, waiting, done, extends, outbox, unconfirmed
    cdef int results_pending, idle_threads, thread_count, pool_closed
    cdef int spawn_wanted, starting  # threads the loop asked for, not yet started / not yet waiting
    cdef object spawner
    cdef public bint closed
    cdef uint64_t counters[12]  # C_* below, copied to `stats` by update_stats()
    cdef LogRecord logs[256]  # LOG_QUEUE
    cdef int log_count, logs_lost
    # Scratch for the message being received (`frames`) and the one being sent (`out`).
    cdef zmsg *frames
    cdef int frames_cap
    cdef zmsg *out
    cdef int out_cap

    cdef int _loop(self) noexcept nogil
    cdef int _open(self, double now) noexcept nogil
    cdef void _close_socket(self, int linger_ms) noexcept nogil
    cdef void _lose(self, double now) noexcept nogil
    cdef void _register_again(self) noexcept nogil
    cdef void _use_protocol(self, int v2) noexcept nogil
    cdef void _poll(self, double now) noexcept nogil
    cdef void _drain(self, int fd) noexcept nogil
    cdef int _finished(self, double now) noexcept nogil
    cdef void _hang_up(self) noexcept nogil
    cdef void _announce_credit(self, double now) noexcept nogil
    cdef void _offer_v2(self, double now) noexcept nogil
    cdef int _send_small(self, double now, const char *signature, int command,
                         const void *body, size_t size) noexcept nogil
    cdef int _send_frames(self, double now, int n) noexcept nogil
    cdef void _flush(self, double now) noexcept nogil
    cdef int _flush_answers(self, double now) noexcept nogil
    cdef int _flush_one(self, double now, int slot) noexcept nogil
    cdef void _receive(self) noexcept nogil
    cdef int _recv_message(self) noexcept nogil
    cdef void _handle(self, int n) noexcept nogil
    cdef void _start_job(self, const uint8_t *task_id, int first, int count) noexcept nogil
    cdef void _start_jobs(self, int n) noexcept nogil
    cdef void _cancel(self, int n) noexcept nogil
    cdef void _confirm(self) noexcept nogil
    cdef void _collect(self) noexcept nogil
    cdef int _new_slot(self) noexcept nogil
    cdef object _payload_frame(self, zmsg *frame)
    cdef int _take_waiting(self, int most, int *numbers, zmsg **payloads, int *counts,
                           uint8_t *ids) noexcept nogil
    cdef void _free_slot(self, int slot) noexcept nogil
    cdef int _out_room(self, int n) noexcept nogil
    cdef void _out_head(self, const char *signature, int command) noexcept nogil
    cdef const char *_signature(self) noexcept nogil
    cdef void _log(self, int what, double a, double b, const uint8_t *task_id) noexcept nogil
    cdef void _lock_free_slot(self, int slot) noexcept nogil
    cdef void _give_back(self, double now) noexcept nogil
    cdef void _drop_outbox(self) noexcept nogil
