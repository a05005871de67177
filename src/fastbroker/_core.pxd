# The shape of the compiled core (fastbroker._core) in one file: every struct, and every
# cdef class with its state and its cdef methods. The code is in core/*.pxi, included by
# _core.pyx in the order below; a part only holds typed references to parts above it,
# so the composition has no cycles and BrokerCore, at the bottom, owns them all.
#
# Every class is final (nothing subclasses them), so a call from one part to another is
# a direct C call, not one through a vtable.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

from fastbroker._protocol cimport EVENT_DATA_MAX, N_COUNTERS, N_DROP_REASONS, N_LATENCY
from fastbroker._zmqdl cimport zmsg


# -- core-internal constants ------------------------------------------------------

# libzmq's sizes (4.3): a frame up to MAX_VSM_SIZE bytes is kept inside its zmq_msg_t;
# a larger one received may lie in the receiver's shared buffer of in_batch_size bytes.
cdef enum:
    MAX_VSM_SIZE = 33
    KEEP_COPY_MAX = 8192

cdef enum:
    RECV_DROPPED = 0x7FFFFFFF  # BrokerCore._recv's "message read and dropped"

cdef extern from *:
    """
    #define FB_DONE_BIT 0x80000000U
    #define FB_NO_SLOT 0xFFFFFFFFU
    """
    # An FBC01 id's value in RequestIds: a kept outcome's slot | DONE_BIT, else a request's slot.
    const uint32_t DONE_BIT "FB_DONE_BIT"
    const uint32_t NO_SLOT "FB_NO_SLOT"  # end of a free list or a job list

cdef enum ReqState:
    FREE = 0
    QUEUED = 1
    RUNNING = 2

# -- core/ring.pxi ------------------------------------------------------------------

cdef enum:
    RING_BLOCK = 1023  # handles per ring block: with its link, a block is 8 KiB

cdef struct RingBlock:
    RingBlock *next
    uint64_t items[RING_BLOCK]

cdef struct Ring:
    # A FIFO of 64-bit handles (slot << 32 | generation) in a list of blocks.
    RingBlock *head  # the block holding the front, NULL before the first push
    RingBlock *tail  # the block the next push goes to
    RingBlock *spare  # an emptied block kept for the next growth, or NULL
    size_t head_i  # the front's index in head
    size_t tail_i  # the next push's index in tail
    size_t count


# -- core/address_index.pxi -----------------------------------------------------------

cdef struct AEnt:
    uint64_t hash
    uint8_t *key  # NULL: empty
    size_t keylen
    uint32_t value

cdef struct AddrIndex:
    AEnt *ents
    size_t cap  # power of two
    size_t count


# -- core/request_ids.pxi -------------------------------------------------------------

cdef struct CEnt:
    uint8_t key[16]
    uint32_t value
    uint32_t tag  # CID_EMPTY, CID_TOMB, or the hash's high half with bit 1 set

cdef struct CidIndex:
    CEnt *ents
    size_t cap  # power of two, 0 before the first insert
    size_t count  # live entries in both tables
    CEnt *old  # the table being emptied into ents, or NULL
    size_t old_cap
    size_t old_next  # old buckets below this have moved
    uint64_t seed


# -- core/events.pxi ------------------------------------------------------------------

cdef struct Ev:
    uint8_t kind
    uint8_t len
    uint32_t n
    uint8_t data[EVENT_DATA_MAX]


# -- core/journal.pxi -----------------------------------------------------------------

cdef struct JEnt:
    # One change for the durable store (see Journal.take).
    uint8_t kind
    uint8_t code
    uint8_t cid[16]
    uint32_t attempts
    int32_t tries
    double timeout  # < 0: none
    size_t first  # its frames in Journal.frames: payload (submit) or outcome body, then a
    # dead request's payload (finish); shared copies
    int nframes
    int nbody  # finish: frames[:nbody] are the outcome's body


# -- core/request_table.pxi -----------------------------------------------------------

cdef struct Req:
    # Ordered so that no padding is needed: 96 bytes a request.
    uint32_t gen
    uint32_t next_free
    int32_t tries_left  # -1: unlimited
    uint32_t attempts
    int32_t worker  # session slot of the DEALER worker running this attempt, -1
    int32_t failed_on  # session slot whose FAILED caused the pending retry, -1
    uint32_t failed_on_gen
    uint32_t wprev  # neighbours in that worker's job list (request slots)
    uint32_t wnext
    int32_t tries  # as given, -1: unlimited (for STATUS)
    uint16_t nenv
    uint16_t nframes  # at most MAX_FRAMES
    uint8_t state  # a ReqState
    uint8_t client  # an FBC01 request: frames[0:nenv] are its waiters' identities
    uint8_t v2_waiters  # bit w: waiter w speaks FBC02 (its replies go in REPLIES batches)
    zmsg *frames  # REQ: routing envelope (no delimiter) then payload; FBC01: waiters then payload
    double timeout  # per attempt, < 0: none
    uint8_t cid[16]  # the client's request id
    zmsg *fail  # FBC01: the latest FAILED's type and message, or NULL
    double arrived  # when it entered the broker (for the latency histogram)


# -- core/idle_workers.pxi ------------------------------------------------------------

cdef struct Wk:
    uint32_t gen
    uint32_t next_free
    bint used
    zmsg *env  # routing frames including the empty delimiter (none for a DEALER worker)
    int nenv
    int32_t session  # DEALER worker's session slot, -1 for an original REQ worker
    const uint8_t *key  # owned by the index
    size_t keylen
    uint64_t hash


# -- core/deadline_heap.pxi -----------------------------------------------------------

cdef struct HeapEnt:
    double deadline
    uint32_t key


# -- core/worker_sessions.pxi ---------------------------------------------------------

cdef struct Sess:
    uint32_t gen
    uint32_t next_free
    bint used
    zmsg *env  # routing frames and the empty delimiter; copies are sent
    int nenv
    const uint8_t *key  # owned by WorkerSessions.index
    size_t keylen
    uint64_t hash
    uint32_t credit
    uint32_t inflight  # jobs it holds, ghosts included
    uint32_t ghosts  # jobs it still works on that ended without it (timed out, answered elsewhere)
    double expiry
    uint32_t jobs  # first request slot of its job list, NO_SLOT if none
    bint v2  # its last READY was FBW02: it gets FBW02 messages, TASKs of many jobs
    # -1, or WorkerSessions.polls when a send to it failed (its connection is gone):
    # forgotten once the loop has polled again, so that a DISCONNECT it sent before
    # closing is read first and it is counted as left, not dead.
    int64_t gone


# -- core/kept_outcomes.pxi -----------------------------------------------------------

cdef struct Done:
    # A finished FBC01 request's outcome, kept for RESULT and duplicate SUBMITs.
    uint32_t next_free
    uint8_t cid[16]
    uint8_t code
    zmsg *body  # answer frames (OK) or type and message (FAILED); shared, not copied
    int nbody
    double finished
    size_t size  # body and payload bytes + RESULT_OVERHEAD
    uint32_t attempts
    int32_t tries
    zmsg *payload  # dead (FAILED or TIMED_OUT): the request's payload, for REQUEUE; else NULL
    int npayload
    double timeout  # dead: the request's per-attempt timeout, < 0: none
    bint gone  # requeued: a tombstone in the FIFO until it reaches the front


# == the classes, in include order ====================================================

@cython.final
cdef class Clock:
    cdef double now  # the loop turn's clock reading, for handlers


@cython.final
cdef class Counters:
    cdef uint64_t counts[N_COUNTERS]
    cdef uint64_t drops[N_DROP_REASONS]
    cdef int last_drop  # reason of the latest dropped message, -1: none since run() began
    cdef uint64_t latency_counts[N_LATENCY]  # answered requests' latency
    cdef double latency_sum

    cdef inline void add(self, int which) noexcept nogil
    cdef inline void drop(self, int reason) noexcept nogil
    cdef int reply_lost(self, int e) noexcept nogil
    cdef void record_latency(self, double seconds) noexcept nogil
    cdef dict counts_dict(self)
    cdef dict drops_dict(self)
    cdef dict latency_dict(self)


@cython.final
cdef class Events:
    cdef Counters counters
    cdef Ev *queue  # EVENT_QUEUE entries once recording was first turned on
    cdef size_t count
    cdef bint on

    cdef void push(self, int kind, const uint8_t *data, size_t n, uint32_t number) noexcept nogil
    cdef int record(self, bint on) except -1
    cdef list take(self)


@cython.final
cdef class Journal:
    cdef bint on
    cdef bint lost
    cdef JEnt *ents  # changes of this turn
    cdef size_t count, cap
    cdef zmsg *frames  # the entries' frames, one pool for the turn
    cdef size_t nframes, frames_cap
    cdef zmsg *held  # FBC01 reply parts held until stored
    cdef uint8_t *held_more
    cdef size_t nheld, held_cap

    cdef JEnt *add(self, int kind, const uint8_t *cid, int code, int nframes, uint32_t attempts,
                   int32_t tries, double timeout) noexcept nogil
    cdef void push(self, int kind, const uint8_t *cid, int code, zmsg *frames, int nframes,
                   uint32_t attempts, int32_t tries, double timeout) noexcept nogil
    cdef void push_finish(self, const uint8_t *cid, int code, zmsg *body, int nbody, zmsg *payload,
                          int npayload, uint32_t attempts, int32_t tries, double timeout) noexcept nogil
    cdef void clear(self) noexcept nogil
    cdef list take(self)
    cdef bytes encode(self, double now)
    cdef int hold(self, zmsg *part, bint more) noexcept nogil
    cdef int release(self, void *sock, Counters counters) except -1
    cdef void drop_held(self) noexcept nogil
    cdef inline bint pending(self) noexcept nogil


@cython.final
cdef class RequestIds:
    cdef CidIndex m

    cdef const uint8_t *_key(self, bytes key) except NULL
    cdef inline CEnt *entry(self, const uint8_t *key) noexcept nogil
    cdef inline void prefetch(self, const uint8_t *key) noexcept nogil
    cdef inline int add(self, const uint8_t *key, uint32_t value) noexcept nogil
    cdef inline void remove(self, CEnt *e) noexcept nogil
    cdef void clear(self) noexcept nogil


@cython.final
cdef class RequestTable:
    cdef Req *reqs
    cdef uint32_t cap
    cdef uint32_t used  # slots below this have been handed out; the rest are untouched memory
    cdef uint32_t free_head
    cdef size_t count
    cdef uint8_t epoch[8]

    cdef int alloc(self) noexcept nogil
    cdef void release(self, uint32_t s) noexcept nogil
    cdef inline bint live(self, uint64_t handle) noexcept nogil
    cdef void write_id(self, uint32_t s, uint8_t *out) noexcept nogil
    cdef int find(self, const uint8_t *tid, size_t n) noexcept nogil
    cdef void clear(self) noexcept nogil


@cython.final
cdef class IdleWorkers:
    cdef Wk *slots
    cdef uint32_t cap
    cdef uint32_t free_head
    cdef Ring ring
    cdef size_t live
    cdef AddrIndex index

    cdef int alloc(self) noexcept nogil
    cdef void release(self, uint32_t s) noexcept nogil
    cdef int find(self, const uint8_t *key, size_t keylen) noexcept nogil
    cdef int push_key(self, uint8_t *key, size_t keylen, zmsg *frames, int nenv, int32_t session) noexcept nogil
    cdef int push_env(self, zmsg *frames, int nenv) noexcept nogil
    cdef void remove_slot(self, uint32_t s) noexcept nogil
    cdef int pop_slot(self) noexcept nogil
    cdef void clear(self) noexcept nogil
    cdef int _key_slot(self, bytes address)


@cython.final
cdef class DeadlineHeap:
    cdef HeapEnt *ents
    cdef size_t count, cap
    cdef int64_t *pos  # key -> index in ents, -1 when absent
    cdef size_t pos_cap

    cdef inline void _place(self, size_t i, HeapEnt e) noexcept nogil
    cdef void _sift_up(self, size_t i) noexcept nogil
    cdef void _sift_down(self, size_t i) noexcept nogil
    cdef int insert(self, uint32_t key, double deadline) noexcept nogil
    cdef bint delete(self, uint32_t key) noexcept nogil
    cdef uint32_t pop_min(self) noexcept nogil
    cdef void clear(self) noexcept nogil


@cython.final
cdef class JobQueue:
    cdef RequestTable table
    cdef Ring waiting  # new requests, FIFO
    cdef Ring retry  # requests whose attempt ended unanswered, served before `waiting`
    cdef size_t count  # queued requests (tombstones not counted)
    cdef size_t limit  # SIZE_MAX: unbounded
    cdef double timeout  # a new request's attempt timeout, < 0: none
    cdef int32_t tries  # a new request's tries, -1: unlimited

    cdef inline int push(self, uint32_t s) noexcept nogil
    cdef inline int requeue(self, uint32_t s) noexcept nogil
    cdef inline bint full(self) noexcept nogil
    cdef Ring *next(self) noexcept nogil
    cdef void clear(self) noexcept nogil


@cython.final
cdef class WorkerSessions:
    cdef RequestTable table
    cdef IdleWorkers idle
    cdef Clock clock
    cdef void *s_workers
    cdef Sess *sess
    cdef uint32_t cap
    cdef uint32_t free_head
    cdef uint32_t count
    cdef AddrIndex index
    cdef double heartbeat
    cdef int liveness
    cdef double next_tick  # next heartbeat to the workers
    cdef double next_check  # earliest time a worker may have gone silent too long
    cdef int64_t polls  # the loop's polls so far: a gone session waits for the next one
    cdef uint8_t *keybuf  # the current worker message's address key
    cdef size_t keybuf_cap
    cdef size_t keylen

    cdef int set_key(self, zmsg *m, int d) noexcept nogil
    cdef int find(self) noexcept nogil
    cdef inline void touch(self, uint32_t s) noexcept nogil
    cdef int add(self, zmsg *m, int d) noexcept nogil
    cdef void release(self, uint32_t s) noexcept nogil
    cdef void release_all(self) noexcept nogil
    cdef void offer(self, uint32_t s) noexcept nogil
    cdef void attach(self, uint32_t rs, uint32_t s) noexcept nogil
    cdef void detach(self, uint32_t rs, bint by_worker=*) noexcept nogil
    cdef void settle_ghost(self, int s) noexcept nogil
    cdef int send_env(self, zmsg *env, int nenv, int command, bint more, bint v2) noexcept nogil
    cdef inline int send(self, uint32_t s, int command, bint more) noexcept nogil


@cython.final
cdef class KeptOutcomes:
    cdef RequestIds ids
    cdef Journal journal
    cdef Counters counters
    cdef Done *done
    cdef uint32_t cap
    cdef uint32_t used  # slots below this have been handed out; the rest are untouched memory
    cdef uint32_t free_head
    cdef Ring fifo  # kept outcome slots, oldest first (only the front leaves)
    cdef size_t retained_bytes
    cdef uint32_t count  # kept outcomes (tombstones not counted)
    cdef uint32_t dead  # of which dead
    cdef double retention
    cdef size_t retention_bytes

    cdef void keep(self, CEnt *e, const uint8_t *cid, int code, zmsg *body, int nbody, zmsg *payload,
                   int npayload, uint32_t attempts, int32_t tries, double timeout, double finished) noexcept nogil
    cdef void not_kept(self, CEnt *e, const uint8_t *cid) noexcept nogil
    cdef void forget_first(self) noexcept nogil
    cdef void release_frames(self, Done *o) noexcept nogil
    cdef void withdraw(self, uint32_t d) noexcept nogil
    cdef int dead_list(self, uint32_t *found, int limit) noexcept nogil
    cdef void forget_due(self, double now) noexcept nogil
    cdef inline double first_expiry(self) noexcept nogil
    cdef void release_all(self) noexcept nogil
    cdef int restore(self, bytes cid, bytes code, body, int attempts, int tries, double age, payload,
                     timeout) except -1


# -- core/reply_batches.pxi ----------------------------------------------------------

cdef struct Batch:
    zmsg identity  # the client's (a shared copy)
    uint8_t *head  # REPLY_RECORD_SIZE records
    size_t nhead, head_cap  # bytes
    zmsg *body  # the records' body frames, in order
    int nbody, body_cap
    int count  # records


@cython.final
cdef class ReplyBatches:
    cdef Batch *b
    cdef int n, cap
    cdef int last  # the batch found last

    cdef int find(self, zmsg *identity) noexcept nogil
    cdef bint full(self, int i, int nbody) noexcept nogil
    cdef int add(self, int i, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil
    cdef void reset(self, int i) noexcept nogil
    cdef void clear(self) noexcept nogil


# -- core/client_side.pxi ------------------------------------------------------------

@cython.final
cdef class ClientSide:
    cdef RequestTable table
    cdef RequestIds ids
    cdef KeptOutcomes kept
    cdef Journal journal
    cdef JobQueue queue
    cdef WorkerSessions sessions
    cdef IdleWorkers idle
    cdef DeadlineHeap heap
    cdef Counters counters
    cdef Clock clock
    cdef void *s_requests
    cdef ReplyBatches batches  # its own: the FBC02 replies of the current turn

    cdef int on_client(self, zmsg *m, int n) noexcept nogil
    cdef int submit(self, zmsg *m, int n, const uint8_t *cid) noexcept nogil
    cdef int on_batch(self, zmsg *m, int n) noexcept nogil
    cdef int submit_job(self, zmsg *me, bint v2, const uint8_t *cid, uint32_t flags, uint32_t timeout_ms,
                        uint32_t tries, zmsg *payload, int npayload) noexcept nogil
    cdef int reject(self, zmsg *me, bint v2, const uint8_t *cid, int reason, const char *text) noexcept nogil
    cdef bint is_waiter(self, Req *r, zmsg *me) noexcept nogil
    cdef int add_waiter(self, Req *r, zmsg *me, bint v2) noexcept nogil
    cdef int reply(self, zmsg *identity, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil
    cdef int emit(self, zmsg *part, bint more) noexcept nogil
    cdef int to_client(self, zmsg *identity, bint v2, int code, const uint8_t *cid, zmsg *body,
                       int nbody) noexcept nogil
    cdef int flush_batch(self, int i) noexcept nogil
    cdef int flush_batches(self) noexcept nogil
    cdef int reply_outcome(self, zmsg *identity, uint32_t d) noexcept nogil
    cdef int reply_stats(self, zmsg *m, const uint8_t *cid) noexcept nogil
    cdef int reply_status(self, zmsg *m, const uint8_t *cid, uint32_t v) noexcept nogil
    cdef int cancel(self, zmsg *m, uint32_t rs) noexcept nogil
    cdef int conclude(self, Req *r, int code, zmsg *body, int nbody) noexcept nogil
    cdef int reply_dead(self, zmsg *m, const uint8_t *cid, uint32_t limit) noexcept nogil
    cdef int requeue(self, zmsg *m, const uint8_t *cid, uint32_t v) noexcept nogil
    cdef int requeue_all(self, zmsg *m, const uint8_t *cid) noexcept nogil
    cdef int reply_requeued(self, zmsg *m, const uint8_t *cid, uint32_t count) noexcept nogil
    cdef int requeue_dead(self, CEnt *e, uint32_t d) noexcept nogil
    cdef int restore(self, bytes cid, payload, timeout, int tries, int attempts) except -1


@cython.final
cdef class Attempts:
    cdef RequestTable table
    cdef DeadlineHeap heap
    cdef JobQueue queue
    cdef WorkerSessions sessions
    cdef ClientSide client
    cdef Counters counters
    cdef Events events
    cdef Clock clock
    cdef void *s_requests

    cdef int answer(self, zmsg *tid, zmsg *body, int nbody, int from_s) noexcept nogil
    cdef void prefetch_answer(self, const uint8_t *tid) noexcept nogil
    cdef int answer_id(self, const uint8_t *tid, zmsg *body, int nbody, int from_s) noexcept nogil
    cdef int deliver(self, Req *r, zmsg *body, int nbody) noexcept nogil
    cdef int expire(self, double now) noexcept nogil
    cdef int retry_or_abort(self, uint32_t s) noexcept nogil


@cython.final
cdef class WorkerSide:
    cdef WorkerSessions sessions
    cdef IdleWorkers idle
    cdef RequestTable table
    cdef DeadlineHeap heap
    cdef JobQueue queue
    cdef Attempts attempts
    cdef Journal journal
    cdef Counters counters
    cdef Events events
    cdef void *s_workers
    cdef double max_extend  # seconds: the most one EXTEND moves a deadline from now

    cdef int on_ready(self, zmsg *m, int n) noexcept nogil
    cdef int worker_ready(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil
    cdef int worker_failed(self, zmsg *m, int s, int d) noexcept nogil
    cdef int fail_attempt(self, const uint8_t *tid, int s, zmsg *text) noexcept nogil
    cdef int worker_answers(self, zmsg *m, int s, int d, int nb) noexcept nogil
    cdef int worker_extend(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil
    cdef int worker_return(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil
    cdef void worker_event(self, int kind, uint32_t s) noexcept nogil
    cdef int forget(self, uint32_t s, bint requeue=*) noexcept nogil
    cdef int tick(self, double now) noexcept nogil
    cdef int probe(self) noexcept nogil
    cdef int dispatch(self, double now) noexcept nogil
    cdef int dispatch_batch(self, uint32_t sidx, size_t share, double now) noexcept nogil
    cdef int unreachable(self, uint32_t sidx) noexcept nogil
    cdef void start_attempt(self, uint32_t rs, int sidx, double now) noexcept nogil
    cdef int disconnect_all(self) noexcept nogil


@cython.final
cdef class BrokerCore:
    cdef object _sockets  # keeps the pyzmq sockets alive while we hold their handles
    cdef void *s_requests
    cdef void *s_workers
    cdef void *s_answers
    cdef zmsg *scratch  # the message being handled
    cdef int scratch_cap
    cdef bint closed
    cdef Clock clock
    cdef Counters counters
    cdef Events event_queue
    cdef Journal store_journal
    cdef RequestTable table
    cdef IdleWorkers idle
    cdef DeadlineHeap heap
    cdef RequestIds ids  # FBC01 request id -> request slot, or kept outcome slot | DONE_BIT
    cdef JobQueue queue
    cdef WorkerSessions sessions
    cdef KeptOutcomes kept
    cdef ClientSide client_side
    cdef Attempts attempts
    cdef WorkerSide worker_side

    cdef int _loop(self, int wake_fd, double max_wait, bint stop_on_drop, bint stop_on_event) noexcept nogil
    cdef int _drain(self, void *sock, int which) noexcept nogil
    cdef int _recv(self, void *sock) noexcept nogil
    cdef int _on_request(self, int n) noexcept nogil
    cdef int _answer_empty(self, int nenv) noexcept nogil
    cdef int _on_answer(self, int n) noexcept nogil
