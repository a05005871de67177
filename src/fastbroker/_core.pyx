# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled broker core: the routing loop and its three structures, run without the GIL.

Same public interface as ``_core_py`` (see ``_common`` for the shared constants);
``tests/test_core_api.py`` checks that the two stay in step.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memcmp, memset, strlen
from libc.errno cimport EINTR, EAGAIN, EHOSTUNREACH
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import os

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from fastbroker import _common, protocol
from fastbroker._common import check_count, check_heartbeat, check_timeout, check_tries

from fastbroker._protocol cimport *
from fastbroker._zmqdl cimport (zmsg, zpollitem, ZPOLLIN, ZDONTWAIT, ZSNDMORE, ZETERM, zmsg_init, zmsg_init_size, zmsg_data, zmsg_size, zmsg_more,
                               zmsg_close, zmsg_copy, zmsg_move, zmsg_send, zmsg_recv, zpoll, zerrno, fbz_load)

cdef const char *_load_error = fbz_load(os.fsencode(_pyzmq_backend.__file__))
if _load_error != NULL:
    raise ImportError("fastbroker._core: " + (<bytes>_load_error).decode())

# libzmq's sizes (4.3): a frame up to MAX_VSM_SIZE bytes is kept inside its zmq_msg_t;
# a larger one received may lie in the receiver's shared buffer of in_batch_size bytes.
cdef enum:
    MAX_VSM_SIZE = 33
    KEEP_COPY_MAX = 8192

cdef enum:
    RECV_DROPPED = 0x7FFFFFFF  # _recv's "message read and dropped"

# Every protocol constant comes from _protocol.pxd, generated from protocol.py; check
# that this build was made from the protocol.py it runs with.
protocol.check_compiled(compiled_values(), compiled_signatures())

cdef double LATENCY_BOUNDS[N_LATENCY - 1]
for _i, _b in enumerate(protocol.LATENCY_BOUNDS):
    LATENCY_BOUNDS[_i] = _b
cdef bytes STATS_NAMES = ",".join(protocol.stats_fields()).encode("ascii")
cdef bytes _BAD_OPTIONS = protocol.REJECT_REASONS[REJECT_BAD_OPTIONS].encode()
cdef bytes _QUEUE_FULL = protocol.REJECT_REASONS[REJECT_QUEUE_FULL].encode()
cdef const char *BAD_OPTIONS_TEXT = _BAD_OPTIONS  # the bytes above keep it alive
cdef const char *QUEUE_FULL_TEXT = _QUEUE_FULL


cdef struct JEnt:
    # One change for the durable store (see BrokerCore.journal_take).
    uint8_t kind
    uint8_t code
    uint8_t cid[16]
    uint32_t attempts
    int32_t tries
    double timeout  # < 0: none
    zmsg *frames  # payload (submit) or outcome body (finish): shared copies
    int nframes


cdef struct Ev:
    uint8_t kind
    uint8_t len
    uint32_t n
    uint8_t data[EVENT_DATA_MAX]


cdef uint32_t DONE_BIT = 0x80000000U  # client index value: a kept outcome's slot, not a request's

cdef uint32_t NO_SLOT = 0xFFFFFFFFU  # end of a free list

cdef enum ReqState:
    FREE = 0
    QUEUED = 1
    RUNNING = 2


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


def monotonic():
    """The clock deadlines are measured on (CLOCK_MONOTONIC, seconds)."""
    return monotonic_now()


cdef void close_msgs(zmsg *msgs, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        zmsg_close(&msgs[i])


cdef inline uint64_t hash_bytes(const uint8_t *p, size_t n) noexcept nogil:
    # FNV-1a: identities are short and chosen by peers; this only spreads them.
    cdef uint64_t h = 14695981039346656037ULL
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


# --------------------------------------------------------------------------
# Ring: a growable FIFO of 64-bit handles (slot << 32 | generation).
# A handle whose generation no longer matches its slot is a tombstone.
# --------------------------------------------------------------------------

cdef struct Ring:
    uint64_t *buf
    size_t cap  # power of two
    size_t head
    size_t count


cdef int ring_push(Ring *r, uint64_t v) noexcept nogil:
    cdef uint64_t *nbuf
    cdef size_t ncap, i
    if r.count == r.cap:
        ncap = r.cap * 2 if r.cap else 16
        nbuf = <uint64_t *>malloc(ncap * sizeof(uint64_t))
        if nbuf == NULL:
            return -1
        for i in range(r.count):
            nbuf[i] = r.buf[(r.head + i) & (r.cap - 1)]
        free(r.buf)
        r.buf = nbuf
        r.cap = ncap
        r.head = 0
    r.buf[(r.head + r.count) & (r.cap - 1)] = v
    r.count += 1
    return 0


cdef inline uint64_t ring_front(Ring *r) noexcept nogil:
    return r.buf[r.head]


cdef inline void ring_drop_front(Ring *r) noexcept nogil:
    r.head = (r.head + 1) & (r.cap - 1)
    r.count -= 1


cdef inline uint64_t make_handle(uint32_t slot, uint32_t gen) noexcept nogil:
    return (<uint64_t>slot << 32) | gen


# --------------------------------------------------------------------------
# Address index: worker address (length-prefixed routing frames) -> slot.
# Open addressing with linear probing; backward-shift deletion keeps probe
# chains intact without tombstones. The index owns its keys.
# --------------------------------------------------------------------------

cdef struct AEnt:
    uint64_t hash
    uint8_t *key  # NULL: empty
    size_t keylen
    uint32_t value


cdef struct AddrIndex:
    AEnt *ents
    size_t cap  # power of two
    size_t count


cdef uint8_t *make_key(zmsg *frames, int n, size_t *keylen) noexcept nogil:
    """Malloc'd length-prefixed concatenation of n routing frames, or NULL."""
    cdef size_t total = 0, off = 0, sz
    cdef int i
    cdef uint8_t *key
    for i in range(n):
        total += 4 + zmsg_size(&frames[i])
    key = <uint8_t *>malloc(total if total else 1)
    if key == NULL:
        return NULL
    for i in range(n):
        sz = zmsg_size(&frames[i])
        key[off] = sz & 0xFF
        key[off + 1] = (sz >> 8) & 0xFF
        key[off + 2] = (sz >> 16) & 0xFF
        key[off + 3] = (sz >> 24) & 0xFF
        memcpy(key + off + 4, zmsg_data(&frames[i]), sz)
        off += 4 + sz
    keylen[0] = total
    return key


cdef int aidx_find(AddrIndex *m, const uint8_t *key, size_t keylen, uint64_t h) noexcept nogil:
    """Entry index holding key, or -1."""
    cdef size_t i, mask
    if m.cap == 0:
        return -1
    mask = m.cap - 1
    i = h & mask
    while m.ents[i].key != NULL:
        if m.ents[i].hash == h and m.ents[i].keylen == keylen and memcmp(m.ents[i].key, key, keylen) == 0:
            return <int>i
        i = (i + 1) & mask
    return -1


cdef inline void aidx_place(AEnt *ents, size_t mask, AEnt e) noexcept nogil:
    cdef size_t i = e.hash & mask
    while ents[i].key != NULL:
        i = (i + 1) & mask
    ents[i] = e


cdef int aidx_insert(AddrIndex *m, uint8_t *key, size_t keylen, uint64_t h, uint32_t value) noexcept nogil:
    """Add key (not present) -> value, taking ownership of key. -1 when out of memory
    (the key then stays the caller's)."""
    cdef size_t i, ncap
    cdef AEnt *nents
    cdef AEnt e
    if (m.count + 1) * 2 > m.cap:
        ncap = m.cap * 2 if m.cap else 16
        nents = <AEnt *>malloc(ncap * sizeof(AEnt))
        if nents == NULL:
            return -1
        memset(nents, 0, ncap * sizeof(AEnt))
        for i in range(m.cap):
            if m.ents[i].key != NULL:
                aidx_place(nents, ncap - 1, m.ents[i])
        free(m.ents)
        m.ents = nents
        m.cap = ncap
    e.hash = h
    e.key = key
    e.keylen = keylen
    e.value = value
    aidx_place(m.ents, m.cap - 1, e)
    m.count += 1
    return 0


cdef void aidx_delete(AddrIndex *m, size_t i) noexcept nogil:
    """Remove entry i and free its key."""
    cdef size_t mask = m.cap - 1
    cdef size_t j = i, k
    free(m.ents[i].key)
    m.ents[i].key = NULL
    m.count -= 1
    while True:
        j = (j + 1) & mask
        if m.ents[j].key == NULL:
            return
        k = m.ents[j].hash & mask
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            m.ents[i] = m.ents[j]
            m.ents[j].key = NULL
            i = j


cdef void aidx_free(AddrIndex *m) noexcept nogil:
    cdef size_t i
    for i in range(m.cap):
        free(m.ents[i].key)
    free(m.ents)
    m.ents = NULL
    m.cap = m.count = 0


# --------------------------------------------------------------------------
# Request-id index: 16-byte FBC01 request id -> value, keys stored inline.
# Open addressing with linear probing. It grows without a pause: a full table
# is replaced by one twice its size, and the old one's entries move over a
# few at every insert, while lookups search both. The old table only loses
# entries (to tombstones, so its probe chains stay whole); the new one is an
# ordinary table with backward-shift deletion.
# --------------------------------------------------------------------------

cdef enum:
    CID_EMPTY = 0
    CID_TOMB = 1
    CID_MOVES_PER_INSERT = 8  # old buckets moved per insert: done long before the next growth


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


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64's finalizer: every input bit reaches every output bit, so
    # sequential or patterned ids spread as well as random ones.
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline uint64_t cid_hash(const CidIndex *m, const uint8_t *key) noexcept nogil:
    cdef uint64_t a, b
    memcpy(&a, key, 8)
    memcpy(&b, key + 8, 8)
    return mix64(a ^ mix64(b ^ m.seed))


cdef inline uint32_t cid_tag(uint64_t h) noexcept nogil:
    return <uint32_t>(h >> 32) | 2


cdef inline CEnt *cid_probe(CEnt *ents, size_t cap, const uint8_t *key, uint64_t h) noexcept nogil:
    cdef size_t mask = cap - 1
    cdef size_t i = h & mask
    cdef uint32_t tag = cid_tag(h)
    while ents[i].tag != CID_EMPTY:
        if ents[i].tag == tag and memcmp(ents[i].key, key, 16) == 0:
            return &ents[i]
        i = (i + 1) & mask
    return NULL


cdef CEnt *cidx_find(CidIndex *m, const uint8_t *key) noexcept nogil:
    """The entry holding key, or NULL. Valid until the next insert or delete."""
    cdef uint64_t h
    cdef CEnt *e
    if m.cap == 0:
        return NULL
    h = cid_hash(m, key)
    e = cid_probe(m.ents, m.cap, key, h)
    if e == NULL and m.old != NULL:
        e = cid_probe(m.old, m.old_cap, key, h)
    return e


cdef inline void cid_place(CEnt *ents, size_t cap, const uint8_t *key, uint64_t h, uint32_t value) noexcept nogil:
    cdef size_t mask = cap - 1
    cdef size_t i = h & mask
    while ents[i].tag != CID_EMPTY:
        i = (i + 1) & mask
    memcpy(ents[i].key, key, 16)
    ents[i].value = value
    ents[i].tag = cid_tag(h)


cdef void cid_move_some(CidIndex *m, size_t n) noexcept nogil:
    cdef CEnt *e
    while n and m.old != NULL:
        e = &m.old[m.old_next]
        if e.tag > CID_TOMB:
            cid_place(m.ents, m.cap, e.key, cid_hash(m, e.key), e.value)
            e.tag = CID_TOMB
        m.old_next += 1
        n -= 1
        if m.old_next == m.old_cap:
            free(m.old)
            m.old = NULL
            m.old_cap = m.old_next = 0


cdef int cidx_insert(CidIndex *m, const uint8_t *key, uint32_t value) noexcept nogil:
    """Add key (not present) -> value. -1 when out of memory."""
    cdef size_t ncap
    cdef CEnt *nents
    if (m.count + 1) * 2 > m.cap:
        if m.old != NULL:
            cid_move_some(m, m.old_cap)  # not reached at the pace below; kept as a bound
        ncap = m.cap * 2 if m.cap else 64
        nents = <CEnt *>calloc(ncap, sizeof(CEnt))
        if nents == NULL:
            return -1
        m.old = m.ents
        m.old_cap = m.cap
        m.old_next = 0
        m.ents = nents
        m.cap = ncap
    cid_place(m.ents, m.cap, key, cid_hash(m, key), value)
    m.count += 1
    cid_move_some(m, CID_MOVES_PER_INSERT)
    return 0


cdef void cidx_delete(CidIndex *m, CEnt *e) noexcept nogil:
    """Remove the entry e (from cidx_find)."""
    cdef size_t mask, i, j, k
    m.count -= 1
    if m.old != NULL and e >= m.old and e < m.old + m.old_cap:
        e.tag = CID_TOMB
        return
    mask = m.cap - 1
    i = <size_t>(e - m.ents)
    j = i
    m.ents[i].tag = CID_EMPTY
    while True:
        j = (j + 1) & mask
        if m.ents[j].tag == CID_EMPTY:
            return
        k = cid_hash(m, m.ents[j].key) & mask
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            m.ents[i] = m.ents[j]
            m.ents[j].tag = CID_EMPTY
            i = j


cdef void cidx_free(CidIndex *m) noexcept nogil:
    free(m.ents)
    free(m.old)
    m.ents = m.old = NULL
    m.cap = m.count = m.old_cap = m.old_next = 0


cdef class RequestIds:
    """The 16-byte request-id index on its own (for tests): id -> 32-bit value."""

    cdef CidIndex m

    def __cinit__(self, seed=None):
        self.m.seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed

    def __dealloc__(self):
        cidx_free(&self.m)

    cdef const uint8_t *_key(self, bytes key) except NULL:
        if len(key) != REQUEST_ID_SIZE:
            raise ValueError("a request id is 16 bytes")
        return <const uint8_t *><const char *>key

    def insert(self, bytes key, uint32_t value):
        """Add key -> value; KeyError if key is there already."""
        cdef const uint8_t *k = self._key(key)
        if cidx_find(&self.m, k) != NULL:
            raise KeyError(key)
        if cidx_insert(&self.m, k, value) < 0:
            raise MemoryError()

    def get(self, bytes key):
        """The value of key, or None."""
        cdef CEnt *e = cidx_find(&self.m, self._key(key))
        return None if e == NULL else e.value

    def delete(self, bytes key):
        """Remove key; False if it was not there."""
        cdef CEnt *e = cidx_find(&self.m, self._key(key))
        if e == NULL:
            return False
        cidx_delete(&self.m, e)
        return True

    @property
    def growing(self):
        """True while entries of a smaller table are still being moved over."""
        return self.m.old != NULL

    def __len__(self):
        return self.m.count


# --------------------------------------------------------------------------
# Idle workers: FIFO of ready workers with O(1) removal by address.
# --------------------------------------------------------------------------

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


cdef class IdleWorkers:
    """Workers that asked for a job, oldest first.

    A worker is known by its address (the routing frames before the delimiter);
    a second "ready" from the same address replaces its first one in O(1).
    """

    cdef Wk *slots
    cdef uint32_t cap
    cdef uint32_t free_head
    cdef Ring ring
    cdef size_t live
    cdef AddrIndex index

    def __cinit__(self):
        self.free_head = NO_SLOT

    def __dealloc__(self):
        cdef uint32_t i
        for i in range(self.cap):
            if self.slots[i].used:
                close_msgs(self.slots[i].env, self.slots[i].nenv)
                free(self.slots[i].env)
        free(self.slots)
        free(self.ring.buf)
        aidx_free(&self.index)

    cdef int _alloc(self) noexcept nogil:
        cdef uint32_t s, ncap, i
        cdef Wk *nslots
        if self.free_head == NO_SLOT:
            ncap = self.cap * 2 if self.cap else 16
            nslots = <Wk *>realloc(self.slots, ncap * sizeof(Wk))
            if nslots == NULL:
                return -1
            self.slots = nslots
            memset(&self.slots[self.cap], 0, (ncap - self.cap) * sizeof(Wk))
            for i in range(self.cap, ncap):
                self.slots[i].next_free = i + 1 if i + 1 < ncap else NO_SLOT
            self.free_head = self.cap
            self.cap = ncap
        s = self.free_head
        self.free_head = self.slots[s].next_free
        self.slots[s].used = True
        return <int>s

    cdef void release(self, uint32_t s) noexcept nogil:
        """Forget worker slot s (it was popped or removed)."""
        cdef Wk *w = &self.slots[s]
        cdef int i
        if w.key != NULL:
            i = aidx_find(&self.index, w.key, w.keylen, w.hash)
            if i >= 0:
                aidx_delete(&self.index, i)
        close_msgs(w.env, w.nenv)
        free(w.env)
        w.env = NULL
        w.key = NULL
        w.nenv = 0
        w.used = False
        w.gen += 1
        w.next_free = self.free_head
        self.free_head = s

    cdef int find(self, const uint8_t *key, size_t keylen) noexcept nogil:
        """Slot of the idle worker with this address key, or -1."""
        cdef int i = aidx_find(&self.index, key, keylen, hash_bytes(key, keylen))
        return <int>self.index.ents[i].value if i >= 0 else -1

    cdef int push_key(self, uint8_t *key, size_t keylen, zmsg *frames, int nenv, int32_t session) noexcept nogil:
        """Append a worker: takes ownership of key and moves nenv frames in. A worker
        already idle at that address is replaced. Returns 0, or -1 when out of memory
        (key and frames then stay the caller's)."""
        cdef int i, s, found
        cdef zmsg *env = NULL
        cdef uint64_t h = hash_bytes(key, keylen)
        if nenv:
            env = <zmsg *>malloc(nenv * sizeof(zmsg))
            if env == NULL:
                return -1
        found = aidx_find(&self.index, key, keylen, h)
        if found >= 0:
            self.remove_slot(self.index.ents[found].value)
        s = self._alloc()
        if s < 0:
            free(env)
            return -1
        # On failure below, releasing the slot moves its generation on, which
        # turns a ring entry already pushed into a tombstone.
        self.slots[s].key = NULL
        if ring_push(&self.ring, make_handle(s, self.slots[s].gen)) < 0 or \
                aidx_insert(&self.index, key, keylen, h, <uint32_t>s) < 0:
            self.release(s)
            free(env)
            return -1
        for i in range(nenv):
            zmsg_init(&env[i])
            zmsg_move(&env[i], &frames[i])
        self.slots[s].key = key
        self.slots[s].keylen = keylen
        self.slots[s].hash = h
        self.slots[s].env = env
        self.slots[s].nenv = nenv
        self.slots[s].session = session
        self.live += 1
        return 0

    cdef int push_env(self, zmsg *frames, int nenv) noexcept nogil:
        """An original REQ worker is ready: take ownership of its nenv routing frames
        (delimiter included). Returns 0, or -1 when out of memory."""
        cdef size_t keylen
        cdef uint8_t *key = make_key(frames, nenv - 1, &keylen)
        cdef int rc
        if key == NULL:
            return -1
        rc = self.push_key(key, keylen, frames, nenv, -1)
        if rc < 0:
            free(key)
        return rc

    cdef void remove_slot(self, uint32_t s) noexcept nogil:
        # The ring entry becomes a tombstone: its generation no longer matches.
        self.release(s)
        self.live -= 1

    cdef int pop_slot(self) noexcept nogil:
        """Oldest live idle worker's slot, or -1. The caller releases it."""
        cdef uint64_t h
        cdef uint32_t s
        while self.ring.count:
            h = ring_front(&self.ring)
            ring_drop_front(&self.ring)
            s = <uint32_t>(h >> 32)
            if self.slots[s].used and self.slots[s].gen == <uint32_t>h:
                self.live -= 1
                return <int>s
        return -1

    # -- Python interface (tests, benchmarks) ------------------------------

    cdef int _key_slot(self, bytes address):
        cdef size_t n = len(address)
        cdef uint8_t key[260]
        if n > 255:
            return -1  # too long to have been pushed
        key[0] = n & 0xFF
        key[1] = key[2] = key[3] = 0
        memcpy(key + 4, <const char *>address, n)
        return self.find(key, n + 4)

    def push(self, bytes address):
        """Mark the worker at `address` idle (again: its earlier entry is replaced)."""
        cdef zmsg frames[2]
        if len(address) > 255:
            raise ValueError("a worker address is at most 255 bytes")
        zmsg_init_size(&frames[0], len(address))
        memcpy(zmsg_data(&frames[0]), <const char *>address, len(address))
        zmsg_init(&frames[1])
        rc = self.push_env(frames, 2)
        close_msgs(frames, 2)
        if rc < 0:
            raise MemoryError()

    def pop(self):
        """Address of the oldest idle worker, removed; None if there is none."""
        cdef int s = self.pop_slot()
        if s < 0:
            return None
        cdef Wk *w = &self.slots[s]
        address = (<char *>w.key)[4:w.keylen]
        self.release(s)
        return address

    def remove(self, bytes address):
        """Forget an idle worker; False if it was not idle."""
        cdef int s = self._key_slot(address)
        if s < 0:
            return False
        self.remove_slot(s)
        return True

    def __contains__(self, bytes address):
        return self._key_slot(address) >= 0

    def __len__(self):
        return self.live


# --------------------------------------------------------------------------
# Deadline heap: binary min-heap of (deadline, key) with a key -> position index,
# so an answered attempt leaves the heap in O(log n) without a scan.
# --------------------------------------------------------------------------

cdef struct HeapEnt:
    double deadline
    uint32_t key


cdef class DeadlineHeap:
    """Attempt deadlines, soonest first; keys are small integers (request slots)."""

    cdef HeapEnt *ents
    cdef size_t count, cap
    cdef int64_t *pos  # key -> index in ents, -1 when absent
    cdef size_t pos_cap

    def __dealloc__(self):
        free(self.ents)
        free(self.pos)

    cdef inline void _place(self, size_t i, HeapEnt e) noexcept nogil:
        self.ents[i] = e
        self.pos[e.key] = <int64_t>i

    cdef void _sift_up(self, size_t i) noexcept nogil:
        cdef HeapEnt e = self.ents[i]
        cdef size_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if self.ents[parent].deadline <= e.deadline:
                break
            self._place(i, self.ents[parent])
            i = parent
        self._place(i, e)

    cdef void _sift_down(self, size_t i) noexcept nogil:
        cdef HeapEnt e = self.ents[i]
        cdef size_t child
        while True:
            child = 2 * i + 1
            if child >= self.count:
                break
            if child + 1 < self.count and self.ents[child + 1].deadline < self.ents[child].deadline:
                child += 1
            if e.deadline <= self.ents[child].deadline:
                break
            self._place(i, self.ents[child])
            i = child
        self._place(i, e)

    cdef int insert(self, uint32_t key, double deadline) noexcept nogil:
        """Add or move key's deadline. Returns -1 when out of memory."""
        cdef size_t ncap, i
        cdef HeapEnt *nents
        cdef int64_t *npos
        if key >= self.pos_cap:
            ncap = self.pos_cap * 2 if self.pos_cap else 16
            while ncap <= key:
                ncap *= 2
            npos = <int64_t *>realloc(self.pos, ncap * sizeof(int64_t))
            if npos == NULL:
                return -1
            for i in range(self.pos_cap, ncap):
                npos[i] = -1
            self.pos = npos
            self.pos_cap = ncap
        if self.pos[key] >= 0:
            self.delete(key)
        if self.count == self.cap:
            ncap = self.cap * 2 if self.cap else 16
            nents = <HeapEnt *>realloc(self.ents, ncap * sizeof(HeapEnt))
            if nents == NULL:
                return -1
            self.ents = nents
            self.cap = ncap
        self.ents[self.count].deadline = deadline
        self.ents[self.count].key = key
        self.count += 1
        self._sift_up(self.count - 1)
        return 0

    cdef bint delete(self, uint32_t key) noexcept nogil:
        cdef int64_t i
        cdef HeapEnt moved
        if key >= self.pos_cap or self.pos[key] < 0:
            return False
        i = self.pos[key]
        self.pos[key] = -1
        self.count -= 1
        if <size_t>i < self.count:
            # Move the last entry into the hole, then restore heap order either way.
            moved = self.ents[self.count]
            self._place(<size_t>i, moved)
            self._sift_down(<size_t>i)
            self._sift_up(<size_t>self.pos[moved.key])
        return True

    cdef uint32_t pop_min(self) noexcept nogil:
        """Remove and return the soonest key; the heap must not be empty."""
        cdef uint32_t key = self.ents[0].key
        self.delete(key)
        return key

    # -- Python interface ---------------------------------------------------

    def push(self, key, double deadline):
        """Set key's deadline (an existing one is replaced)."""
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            raise ValueError(f"key must be in [0, {protocol.HEAP_KEY_LIMIT})")
        if self.insert(<uint32_t>key, deadline) < 0:
            raise MemoryError()

    def remove(self, key):
        """Forget key's deadline; False if it had none."""
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            return False
        return self.delete(<uint32_t>key)

    def peek(self):
        """(deadline, key) of the soonest deadline, or None."""
        if self.count == 0:
            return None
        return (self.ents[0].deadline, self.ents[0].key)

    def pop(self):
        """Remove and return (deadline, key) of the soonest deadline; IndexError if empty."""
        if self.count == 0:
            raise IndexError("pop from an empty DeadlineHeap")
        cdef double d = self.ents[0].deadline
        return (d, self.pop_min())

    def __len__(self):
        return self.count


# --------------------------------------------------------------------------
# Request table: slot array addressed by the task id itself, so lookup is O(1)
# with no hashing; the generation makes stale ids (late twins) miss.
# --------------------------------------------------------------------------

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
    zmsg *frames  # REQ: routing envelope (no delimiter) then payload; FBC01: waiters then payload
    double timeout  # per attempt, < 0: none
    uint8_t cid[16]  # the client's request id
    zmsg *fail  # FBC01: the latest FAILED's type and message, or NULL
    double arrived  # when it entered the broker (for the latency histogram)


assert sizeof(Req) == 96, sizeof(Req)


cdef class RequestTable:
    """Requests in the broker, keyed by 16-byte task ids (epoch, slot, generation)."""

    cdef Req *reqs
    cdef uint32_t cap
    cdef uint32_t used  # slots below this have been handed out; the rest are untouched memory
    cdef uint32_t free_head
    cdef size_t count
    cdef uint8_t epoch[8]

    def __cinit__(self, bytes epoch=None):
        if epoch is None:
            epoch = os.urandom(8)
        if len(epoch) != 8:
            raise ValueError("epoch must be 8 bytes")
        memcpy(self.epoch, <const char *>epoch, 8)
        self.free_head = NO_SLOT

    def __dealloc__(self):
        cdef uint32_t i
        for i in range(self.used):
            if self.reqs[i].state != FREE:
                close_msgs(self.reqs[i].frames, self.reqs[i].nframes)
                free(self.reqs[i].frames)
                if self.reqs[i].fail != NULL:
                    close_msgs(self.reqs[i].fail, 2)
                    free(self.reqs[i].fail)
        free(self.reqs)

    cdef int alloc(self) noexcept nogil:
        """A free slot, marked QUEUED with no frames; -1 when out of memory."""
        cdef uint32_t s, ncap
        cdef Req *nreqs
        if self.free_head != NO_SLOT:
            s = self.free_head
            self.free_head = self.reqs[s].next_free
        else:
            if self.used == self.cap:
                # Only realloc: new slots are set up one at a time as they are first
                # used, so growing a large table is no pause of its size.
                if self.cap >= 0x7FFFFFFF:
                    return -1
                ncap = self.cap * 2 if self.cap else 64
                nreqs = <Req *>realloc(self.reqs, ncap * sizeof(Req))
                if nreqs == NULL:
                    return -1
                self.reqs = nreqs
                self.cap = ncap
            s = self.used
            self.used += 1
            self.reqs[s].gen = 0
        self.reqs[s].state = QUEUED
        self.reqs[s].frames = NULL
        self.reqs[s].nframes = 0
        self.reqs[s].nenv = 0
        self.reqs[s].attempts = 0
        self.reqs[s].worker = -1
        self.reqs[s].failed_on = -1
        self.reqs[s].wprev = NO_SLOT
        self.reqs[s].wnext = NO_SLOT
        self.reqs[s].client = False
        self.reqs[s].fail = NULL
        self.reqs[s].timeout = -1.0
        self.count += 1
        return <int>s

    cdef void release(self, uint32_t s) noexcept nogil:
        cdef Req *r = &self.reqs[s]
        close_msgs(r.frames, r.nframes)
        free(r.frames)
        r.frames = NULL
        r.nframes = 0
        if r.fail != NULL:
            close_msgs(r.fail, 2)
            free(r.fail)
            r.fail = NULL
        r.state = FREE
        r.gen += 1
        r.next_free = self.free_head
        self.free_head = s
        self.count -= 1

    cdef inline bint live(self, uint64_t handle) noexcept nogil:
        cdef uint32_t s = <uint32_t>(handle >> 32)
        return s < self.used and self.reqs[s].state != FREE and self.reqs[s].gen == <uint32_t>handle

    cdef void write_id(self, uint32_t s, uint8_t *out) noexcept nogil:
        cdef uint32_t gen = self.reqs[s].gen
        cdef int i
        memcpy(out, self.epoch, 8)
        for i in range(4):
            out[8 + i] = (s >> (8 * i)) & 0xFF
            out[12 + i] = (gen >> (8 * i)) & 0xFF

    cdef int find(self, const uint8_t *tid, size_t n) noexcept nogil:
        """Slot of the live request with this task id, or -1."""
        cdef uint32_t s = 0, gen = 0
        cdef int i
        if n != TASK_ID_SIZE or memcmp(tid, self.epoch, 8) != 0:
            return -1
        for i in range(4):
            s |= (<uint32_t>tid[8 + i]) << (8 * i)
            gen |= (<uint32_t>tid[12 + i]) << (8 * i)
        if self.live(make_handle(s, gen)):
            return <int>s
        return -1

    # -- Python interface ---------------------------------------------------

    def add(self):
        """Register an (empty) request and return its task id."""
        cdef int s = self.alloc()
        if s < 0:
            raise MemoryError()
        cdef uint8_t tid[16]
        self.write_id(s, tid)
        return (<char *>tid)[:16]

    def discard(self, bytes task_id):
        """Forget a request; False if the id is unknown or stale."""
        cdef int s = self.find(<const uint8_t *><const char *>task_id, len(task_id))
        if s < 0:
            return False
        self.release(s)
        return True

    def __contains__(self, bytes task_id):
        return self.find(<const uint8_t *><const char *>task_id, len(task_id)) >= 0

    def __len__(self):
        return self.count


# --------------------------------------------------------------------------
# The broker loop.
# --------------------------------------------------------------------------

cdef struct Sess:
    uint32_t gen
    uint32_t next_free
    bint used
    zmsg *env  # routing frames and the empty delimiter; copies are sent
    int nenv
    const uint8_t *key  # owned by BrokerCore.sess_index
    size_t keylen
    uint64_t hash
    uint32_t credit
    uint32_t inflight  # jobs it holds, ghosts included
    uint32_t ghosts  # jobs it still works on that ended without it (timed out, answered elsewhere)
    double expiry
    uint32_t jobs  # first request slot of its job list, NO_SLOT if none


cdef struct Done:
    # A finished FBC01 request's outcome, kept for RESULT and duplicate SUBMITs.
    uint32_t next_free
    uint8_t cid[16]
    uint8_t code
    zmsg *body  # answer frames (OK) or type and message (FAILED); shared, not copied
    int nbody
    double finished
    size_t size  # body bytes + RESULT_OVERHEAD
    uint32_t attempts
    int32_t tries


cdef class BrokerCore:
    """Routes requests to workers that asked, with per-attempt deadlines and tries.

    ``run()`` polls the three sockets and a wake fd with the GIL released; it
    returns to Python when the fd is readable, a signal interrupts the poll,
    ``max_wait`` seconds pass, or (with ``stop_on_drop``) a message was dropped.
    """

    cdef object _sockets  # keeps the pyzmq sockets alive while we hold their handles
    cdef void *s_requests
    cdef void *s_workers
    cdef void *s_answers
    cdef RequestTable table
    cdef IdleWorkers idle
    cdef DeadlineHeap heap
    cdef Ring waiting  # new requests, FIFO
    cdef Ring retry  # timed-out requests, served before `waiting`
    cdef size_t n_queued
    cdef double _timeout  # < 0: none
    cdef int32_t _tries  # -1: unlimited
    cdef uint64_t counters[N_COUNTERS]
    cdef uint64_t drops[16]
    cdef int last_drop_reason
    cdef zmsg *scratch
    cdef int scratch_cap
    cdef bint closed
    cdef double now  # the loop turn's clock reading, for handlers
    # DEALER worker sessions
    cdef Sess *sess
    cdef uint32_t sess_cap
    cdef uint32_t sess_free
    cdef uint32_t n_sessions
    cdef AddrIndex sess_index
    cdef double _heartbeat
    cdef int _liveness
    cdef double next_tick  # next heartbeat to the workers
    cdef double next_check  # earliest time a worker may have gone silent too long
    cdef uint8_t *keybuf  # the current worker message's address key
    cdef size_t keybuf_cap
    cdef size_t keylen
    # FBC01 clients: request id -> request slot, or kept outcome slot | DONE_BIT
    cdef CidIndex cids
    cdef Done *done
    cdef uint32_t done_cap
    cdef uint32_t done_used  # slots below this have been handed out; the rest are untouched memory
    cdef uint32_t done_free
    cdef Ring done_fifo  # kept outcome slots, oldest first (only the front leaves)
    cdef size_t retained_bytes
    cdef double retention
    cdef size_t retention_bytes
    cdef size_t _max_queue  # SIZE_MAX: unbounded
    # Answered requests' latency, and the events kept for the log (record_events)
    cdef uint64_t latency_counts[N_LATENCY]
    cdef double latency_sum
    cdef Ev *evq
    cdef size_t ev_count
    cdef bint ev_on
    # Durable store support: changes of this turn, and FBC01 replies held until stored
    cdef bint journal_on
    cdef bint journal_lost
    cdef JEnt *jents
    cdef size_t jcount, jcap
    cdef zmsg *held
    cdef uint8_t *held_more
    cdef size_t nheld, held_cap
    cdef bytes stats_names  # keeps names_ptr's buffer alive
    cdef const char *names_ptr
    cdef size_t names_len

    def __cinit__(self, requests, workers, answers, timeout=None, tries=None, *,
                  heartbeat=protocol.DEFAULT_HEARTBEAT, liveness=protocol.DEFAULT_LIVENESS, bytes epoch=None,
                  retention=protocol.DEFAULT_RETENTION, retention_bytes=protocol.DEFAULT_RETENTION_BYTES,
                  max_queue=None):
        max_queue = _common.check_max_queue(max_queue)
        self._max_queue = <size_t>-1 if max_queue is None else max_queue
        self.stats_names = STATS_NAMES
        self.names_ptr = self.stats_names
        self.names_len = len(self.stats_names)
        self.retention = _common.check_retention(retention)
        self.retention_bytes = _common.check_retention_bytes(retention_bytes)
        self.done_free = NO_SLOT
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        self._heartbeat = check_heartbeat(heartbeat)
        self._liveness = check_count("liveness", liveness, protocol.MIN_LIVENESS, protocol.MAX_LIVENESS)
        self.sess_free = NO_SLOT
        # A secret seed: a client cannot pick ids that all land in one probe chain.
        self.cids.seed = int.from_bytes(os.urandom(8), "little")
        self._sockets = (requests, workers, answers)
        self.s_requests = <void *><size_t>requests.underlying
        self.s_workers = <void *><size_t>workers.underlying
        self.s_answers = <void *><size_t>answers.underlying
        self.table = RequestTable(epoch)
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        self._timeout = -1.0 if timeout is None else timeout
        self._tries = -1 if tries is None else tries
        self.last_drop_reason = -1
        self.scratch_cap = 64
        self.scratch = <zmsg *>malloc(self.scratch_cap * sizeof(zmsg))
        if self.scratch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.evq)
        self._clear_journal()
        free(self.jents)
        close_msgs(self.held, <int>self.nheld)
        free(self.held)
        free(self.held_more)
        self._release_sessions()
        self._release_outcomes()
        free(self.done)
        free(self.done_fifo.buf)
        free(self.sess)
        free(self.keybuf)
        free(self.scratch)
        free(self.waiting.buf)
        free(self.retry.buf)

    cdef void _release_sessions(self) noexcept nogil:
        cdef uint32_t s
        for s in range(self.sess_cap):
            if self.sess[s].used:
                close_msgs(self.sess[s].env, self.sess[s].nenv)
                free(self.sess[s].env)
                self.sess[s].used = False
        aidx_free(&self.sess_index)
        self.n_sessions = 0

    cdef void _release_outcomes(self) noexcept nogil:
        cdef uint32_t d
        while self.done_fifo.count:
            d = <uint32_t>ring_front(&self.done_fifo)
            ring_drop_front(&self.done_fifo)
            close_msgs(self.done[d].body, self.done[d].nbody)
            free(self.done[d].body)
            self.done[d].body = NULL
            self.done[d].next_free = self.done_free
            self.done_free = d
        cidx_free(&self.cids)
        self.retained_bytes = 0

    def disconnect_workers(self):
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        cdef uint32_t s
        cdef int count = 0
        if self.closed:
            return 0
        for s in range(self.sess_cap):
            if self.sess[s].used:
                self._send_env(self.sess[s].env, self.sess[s].nenv, CMD_DISCONNECT, False)
                # Closing: a job on its last try must not be reported as aborted.
                self._forget(s, False)
                count += 1
        return count

    def close(self):
        """Release every message the core holds (queued jobs, idle workers)."""
        self.closed = True
        self._release_sessions()
        self._release_outcomes()
        self._clear_journal()
        close_msgs(self.held, <int>self.nheld)
        self.nheld = 0
        self.table = RequestTable()
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        self.waiting.count = self.retry.count = 0
        self.n_queued = 0

    @property
    def timeout(self):
        return None if self._timeout < 0 else self._timeout

    @property
    def tries(self):
        return None if self._tries < 0 else self._tries

    @property
    def heartbeat(self):
        return self._heartbeat

    @property
    def max_queue(self):
        return None if self._max_queue == <size_t>-1 else self._max_queue

    @property
    def liveness(self):
        return self._liveness

    @property
    def last_drop(self):
        """Reason text of the latest dropped message, or None."""
        return None if self.last_drop_reason < 0 else protocol.DROP_REASONS[self.last_drop_reason]

    def stats(self):
        """Counters since start and current gauges, as a dict of ints."""
        cdef int i
        result = {name: self.counters[i] for i, name in enumerate(protocol.COUNTERS)}
        result["queued"] = self.n_queued
        result["running"] = self.table.count - self.n_queued
        result["idle_workers"] = self.idle.live
        result["workers"] = self.n_sessions
        result["retained"] = self.done_fifo.count
        result["retained_bytes"] = self.retained_bytes
        result["drops"] = {protocol.DROP_REASONS[i]: self.drops[i]
                           for i in range(len(protocol.DROP_REASONS)) if self.drops[i]}
        result["latency"] = {
            "bounds": protocol.LATENCY_BOUNDS,
            "counts": [self.latency_counts[i] for i in range(N_LATENCY)],
            "count": sum(self.latency_counts[i] for i in range(N_LATENCY)),
            "sum": self.latency_sum,
        }
        return result

    def record_events(self, bint on):
        """Keep worker and abort events for events() (off: none are kept)."""
        if on and self.evq == NULL:
            self.evq = <Ev *>malloc(EVENT_QUEUE * sizeof(Ev))
            if self.evq == NULL:
                raise MemoryError()
        self.ev_on = on
        if not on:
            self.ev_count = 0

    def events(self):
        """Events since the last call, oldest first: (kind, data, n); see protocol.EVENT_KINDS."""
        cdef size_t i
        result = [(protocol.EVENT_KINDS[self.evq[i].kind], (<char *>self.evq[i].data)[:self.evq[i].len], self.evq[i].n)
                  for i in range(self.ev_count)]
        self.ev_count = 0
        return result

    # -- durable store support --------------------------------------------------

    def journal(self, bint on):
        """Journal on: FBC01 changes are recorded for journal_take(), every FBC01 reply
        is held until release_held(), and run() returns RUN_JOURNAL after a turn that
        left either. So nothing is promised to a client before it is stored."""
        self.journal_on = on

    cdef void _clear_journal(self) noexcept nogil:
        cdef size_t i
        for i in range(self.jcount):
            close_msgs(self.jents[i].frames, self.jents[i].nframes)
            free(self.jents[i].frames)
        self.jcount = 0

    def journal_take(self):
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries),
        ("forget", id). MemoryError if changes were lost for lack of memory."""
        cdef size_t i
        cdef JEnt *j
        if self.journal_lost:
            self._clear_journal()
            raise MemoryError("fastbroker: journal entries lost for lack of memory")
        result = []
        for i in range(self.jcount):
            j = &self.jents[i]
            cid = (<char *>j.cid)[:REQUEST_ID_SIZE]
            frames = [(<char *>zmsg_data(&j.frames[k]))[:zmsg_size(&j.frames[k])] for k in range(j.nframes)]
            if j.kind == J_SUBMIT:
                result.append(("submit", cid, frames, None if j.timeout < 0 else j.timeout, j.tries))
            elif j.kind == J_START:
                result.append(("start", cid, j.attempts))
            elif j.kind == J_FINISH:
                result.append(("finish", cid, bytes([j.code]), frames, j.attempts, j.tries))
            else:
                result.append(("forget", cid))
        self._clear_journal()
        return result

    def release_held(self):
        """Send the replies held since the last call; returns how many messages."""
        cdef size_t i
        cdef int e, count = 0
        cdef bint first = True, skip = False
        for i in range(self.nheld):
            if skip:
                zmsg_close(&self.held[i])
            elif zmsg_send(&self.held[i], self.s_requests, (ZSNDMORE if self.held_more[i] else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&self.held[i])
                if e == ZETERM:
                    close_msgs(&self.held[i + 1], <int>(self.nheld - i - 1))
                    self.nheld = 0
                    raise zmq.ZMQError(e)
                skip = first  # a client that is gone loses the whole reply
            if not self.held_more[i]:
                count += 1
                first = True
                skip = False
            else:
                first = False
        self.nheld = 0
        return count

    def restore_request(self, bytes cid, payload, timeout, int tries, int attempts):
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        cdef int s, i
        cdef Req *r
        cdef int32_t tries_left
        payload = [bytes(f) for f in payload]
        if len(cid) != REQUEST_ID_SIZE or not payload:
            raise ValueError("a request needs a 16-byte id and a payload")
        if cidx_find(&self.cids, <const uint8_t *><const char *>cid) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        tries_left = -1 if tries < 0 else max(tries - attempts, 0)
        if tries_left == 0:
            raise ValueError(f"request {cid.hex()} has no tries left")
        timeout = check_timeout(timeout)
        s = self.table.alloc()
        if s < 0:
            raise MemoryError()
        r = &self.table.reqs[s]
        r.frames = <zmsg *>malloc(len(payload) * sizeof(zmsg))
        if r.frames == NULL or ring_push(&self.waiting, make_handle(s, r.gen)) < 0:
            self.table.release(s)
            raise MemoryError()
        if cidx_insert(&self.cids, <const uint8_t *><const char *>cid, <uint32_t>s) < 0:
            self.table.release(s)
            raise MemoryError()
        for i, frame in enumerate(payload):
            zmsg_init_size(&r.frames[i], len(frame))
            memcpy(zmsg_data(&r.frames[i]), <const char *>frame, len(frame))
        r.nframes = len(payload)
        r.nenv = 0
        r.client = True
        memcpy(r.cid, <const char *>cid, REQUEST_ID_SIZE)
        r.tries_left = tries_left
        r.tries = tries
        r.attempts = attempts
        r.timeout = -1.0 if timeout is None else timeout
        r.arrived = monotonic_now()
        self.n_queued += 1

    def restore_outcome(self, bytes cid, bytes code, body, int attempts, int tries, double age):
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first)."""
        cdef int i, n
        cdef zmsg *frames
        body = [bytes(f) for f in body]
        if len(cid) != REQUEST_ID_SIZE or code not in (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED):
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        if cidx_find(&self.cids, <const uint8_t *><const char *>cid) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        n = len(body)
        frames = <zmsg *>malloc((n if n else 1) * sizeof(zmsg))
        if frames == NULL or cidx_insert(&self.cids, <const uint8_t *><const char *>cid, 0) < 0:
            free(frames)
            raise MemoryError()
        for i, frame in enumerate(body):
            zmsg_init_size(&frames[i], len(frame))
            memcpy(zmsg_data(&frames[i]), <const char *>frame, len(frame))
        self._keep(cidx_find(&self.cids, <const uint8_t *><const char *>cid), <const uint8_t *><const char *>cid, (<const uint8_t *><const char *>code)[0], frames, n,
                   attempts, tries, monotonic_now() - max(age, 0.0))
        close_msgs(frames, n)
        free(frames)

    cdef void _event(self, int kind, const uint8_t *data, size_t n, uint32_t count) noexcept nogil:
        cdef Ev *e
        if not self.ev_on:
            return
        if self.ev_count == EVENT_QUEUE:
            self.counters[CNT_EVENTS_LOST] += 1
            return
        e = &self.evq[self.ev_count]
        self.ev_count += 1
        e.kind = <uint8_t>kind
        e.len = <uint8_t>(n if n < EVENT_DATA_MAX else EVENT_DATA_MAX)
        e.n = count
        memcpy(e.data, data, e.len)

    cdef void _worker_event(self, int kind, uint32_t s) noexcept nogil:
        self._event(kind, <const uint8_t *>zmsg_data(&self.sess[s].env[0]), zmsg_size(&self.sess[s].env[0]), 0)

    def run(self, int wake_fd=-1, max_wait=None, bint stop_on_drop=False, bint stop_on_event=False):
        """Serve until woken; returns one of RUN_*. Raises zmq.ZMQError on a socket error."""
        if self.closed:
            raise RuntimeError("BrokerCore is closed")
        cdef double wait = -1.0 if max_wait is None else max(0.0, float(max_wait))
        cdef int rc
        with nogil:
            rc = self._loop(wake_fd, wait, stop_on_drop, stop_on_event)
        if rc < 0:
            raise zmq.ZMQError(-rc)
        return rc

    # -- loop ---------------------------------------------------------------

    cdef int _loop(self, int wake_fd, double max_wait, bint stop_on_drop, bint stop_on_event) noexcept nogil:
        cdef zpollitem items[4]
        cdef double now = monotonic_now()
        cdef double t_end = now + max_wait if max_wait >= 0 else -1.0
        cdef double next_t, t_done
        cdef long ms
        cdef int rc, nitems = 4 if wake_fd >= 0 else 3
        items[0].socket = self.s_requests
        items[1].socket = self.s_workers
        items[2].socket = self.s_answers
        items[3].socket = NULL
        items[3].fd = wake_fd
        for rc in range(4):
            items[rc].events = ZPOLLIN
        cdef bint polled = False
        self.last_drop_reason = -1
        while True:
            now = monotonic_now()
            self.now = now
            rc = self._expire(now)
            if rc < 0:
                return rc
            if self.done_fifo.count:
                self._forget_outcomes(now)
            if self.n_sessions and (now >= self.next_tick or now >= self.next_check):
                rc = self._tick(now)
                if rc < 0:
                    return rc
            rc = self._dispatch(now)
            if rc < 0:
                return rc
            if stop_on_drop and self.last_drop_reason >= 0:
                return RUN_DROP
            if stop_on_event and self.ev_count:
                return RUN_EVENT
            if self.journal_on and (self.jcount or self.nheld or self.journal_lost):
                return RUN_JOURNAL
            # Poll at least once, and act on what was read before returning.
            if polled and t_end >= 0 and now >= t_end:
                return RUN_TIMEOUT
            polled = True
            next_t = t_end
            if self.heap.count and (next_t < 0 or self.heap.ents[0].deadline < next_t):
                next_t = self.heap.ents[0].deadline
            if self.n_sessions and (next_t < 0 or self.next_tick < next_t):
                next_t = self.next_tick
            if self.n_sessions and self.next_check < next_t:
                next_t = self.next_check
            if self.done_fifo.count:
                t_done = self.done[<uint32_t>ring_front(&self.done_fifo)].finished + self.retention
                if next_t < 0 or t_done < next_t:
                    next_t = t_done
            if next_t < 0:
                ms = -1
            elif next_t <= now:
                ms = 0
            else:
                # Round up: waking before the deadline would only spin.
                ms = <long>((next_t - now) * 1000.0) + 1
            for rc in range(4):
                items[rc].revents = 0
            rc = zpoll(items, nitems, ms)
            if rc < 0:
                rc = zerrno()
                if rc == EINTR:
                    return RUN_WOKEN
                return -rc
            if nitems == 4 and items[3].revents:
                return RUN_WOKEN
            self.now = monotonic_now()
            # Ready messages first, so jobs arriving in the same turn find them.
            if items[1].revents:
                rc = self._drain(self.s_workers, 1)
                if rc < 0:
                    return rc
            if items[2].revents:
                rc = self._drain(self.s_answers, 2)
                if rc < 0:
                    return rc
            if items[0].revents:
                rc = self._drain(self.s_requests, 0)
                if rc < 0:
                    return rc

    cdef int _drain(self, void *sock, int which) noexcept nogil:
        """Receive up to RECV_BATCH whole messages from sock and handle each."""
        cdef int k, n, rc
        for k in range(RECV_BATCH):
            n = self._recv(sock)
            if n == 0:
                return 0
            if n < 0:
                return n
            if n == RECV_DROPPED:
                continue
            if which == 0:
                rc = self._on_request(n)
            elif which == 1:
                rc = self._on_ready(n)
            else:
                rc = self._on_answer(n)
            # Frames a handler moved out are empty now; closing them is free.
            close_msgs(self.scratch, n)
            if rc < 0:
                return rc
        return 0

    cdef int _recv(self, void *sock) noexcept nogil:
        """Receive one multipart message into scratch. Returns its frame count,
        0 if none is waiting, RECV_DROPPED if it was too large to keep, or -errno."""
        cdef int n = 0, e, more
        cdef zmsg *grown
        cdef zmsg *slot
        cdef zmsg sink
        cdef bint overflow = False, out_of_memory = False
        while True:
            if not overflow and n == self.scratch_cap:
                grown = NULL
                if n < MAX_FRAMES:
                    grown = <zmsg *>realloc(self.scratch, 2 * self.scratch_cap * sizeof(zmsg))
                if grown == NULL:
                    overflow = True
                    if n < MAX_FRAMES:
                        out_of_memory = True
                else:
                    self.scratch = grown
                    self.scratch_cap *= 2
            # Past the limit the rest of the message is read into a sink and discarded.
            slot = &sink if overflow else &self.scratch[n]
            zmsg_init(slot)
            if zmsg_recv(slot, sock, ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(slot)
                close_msgs(self.scratch, n)
                return 0 if (n == 0 and e == EAGAIN) else -e
            more = zmsg_more(slot)
            if overflow:
                zmsg_close(slot)
            else:
                n += 1
            if not more:
                if overflow:
                    close_msgs(self.scratch, n)
                    self._drop(DROP_OUT_OF_MEMORY if out_of_memory else DROP_TOO_MANY_FRAMES)
                    return RECV_DROPPED
                return n

    cdef inline void _drop(self, int reason) noexcept nogil:
        self.counters[CNT_DROPPED] += 1
        self.drops[reason] += 1
        self.last_drop_reason = reason

    cdef int _delimiter(self, int n) noexcept nogil:
        cdef int i
        for i in range(n):
            if zmsg_size(&self.scratch[i]) == 0:
                return i
        return -1

    cdef void _own_small_frames(self, zmsg *frames, int n) noexcept nogil:
        """Give each frame of 34 B to 8 KiB a buffer of its own, for a request that will
        wait in the queue: such a frame may lie in libzmq's shared receive buffer (8 KiB
        of data plus its reference counts, ~18 KB), which it would keep alive while it
        waits. A request sent to a worker at once is not copied."""
        cdef int i
        cdef size_t sz
        cdef zmsg own
        for i in range(n):
            sz = zmsg_size(&frames[i])
            if sz > MAX_VSM_SIZE and sz <= KEEP_COPY_MAX and zmsg_init_size(&own, sz) == 0:
                memcpy(zmsg_data(&own), zmsg_data(&frames[i]), sz)
                zmsg_move(&frames[i], &own)  # releases the shared one
                zmsg_close(&own)

    cdef int _on_request(self, int n) noexcept nogil:
        cdef int d, s, i
        cdef Req *r
        if n >= 2 and zmsg_size(&self.scratch[1]) == SIGNATURE_SIZE and \
                memcmp(zmsg_data(&self.scratch[1]), CLIENT_SIGNATURE, SIGNATURE_SIZE) == 0:
            return self._on_client(n)
        d = self._delimiter(n)
        if d < 1:
            self._drop(DROP_REQUEST_NO_DELIMITER)
            return 0
        if d == n - 1:
            self._drop(DROP_REQUEST_NO_PAYLOAD)
            return 0
        if self.n_queued >= self._max_queue:
            # The original protocol's only "no": the empty answer, at once.
            self.counters[CNT_REJECTED] += 1
            return self._answer_empty(d + 1)
        s = self.table.alloc()
        if s < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # The empty delimiter is not kept (64 bytes a job): the answer gets a new one.
        r.frames = <zmsg *>malloc((n - 1) * sizeof(zmsg))
        if r.frames == NULL or ring_push(&self.waiting, make_handle(s, r.gen)) < 0:
            self.table.release(s)
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        for i in range(d):
            zmsg_init(&r.frames[i])
            zmsg_move(&r.frames[i], &self.scratch[i])
        for i in range(d + 1, n):
            zmsg_init(&r.frames[i - 1])
            zmsg_move(&r.frames[i - 1], &self.scratch[i])
        r.nframes = n - 1
        r.nenv = d
        if self.n_queued or not self.idle.live:
            self._own_small_frames(&r.frames[d], n - 1 - d)
        r.tries_left = self._tries
        r.tries = self._tries
        r.timeout = self._timeout
        r.arrived = self.now
        self.n_queued += 1
        self.counters[CNT_REQUESTS] += 1
        return 0

    cdef int _on_ready(self, int n) noexcept nogil:
        """A message on the workers endpoint: an original REQ worker's ready, or FBW01."""
        cdef int d = self._delimiter(n)
        cdef int nb, s, rc
        cdef uint8_t command
        if d < 1:
            self._drop(DROP_READY_NO_DELIMITER)
            return 0
        nb = n - d - 1
        if nb == 1:
            if self.idle.push_env(self.scratch, d + 1) < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
            self.counters[CNT_READY] += 1
            return 0
        if nb == 0 or zmsg_size(&self.scratch[d + 1]) != SIGNATURE_SIZE or \
                memcmp(zmsg_data(&self.scratch[d + 1]), WORKER_SIGNATURE, SIGNATURE_SIZE) != 0:
            self._drop(DROP_READY_BAD_FRAMES)
            return 0
        if zmsg_size(&self.scratch[d + 2]) != 1:
            self._drop(DROP_WORKER_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&self.scratch[d + 2]))[0]
        if command < CMD_READY or command > CMD_DISCONNECT or command == CMD_TASK:
            self._drop(DROP_WORKER_BAD_COMMAND)
            return 0
        if self._address_key(d) < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        s = self._sess_find()
        if s >= 0:
            self.sess[s].expiry = self.now + self._heartbeat * self._liveness
        if command == CMD_READY:
            return self._worker_ready(s, d, nb)
        if command == CMD_ANSWER:
            if nb < 4:
                self._drop(DROP_WORKER_BAD_FRAMES)
                return 0
            # Accepted even from a worker the broker has forgotten: the job may
            # still be waiting for it. That worker is told to register again.
            rc = self._answer(&self.scratch[d + 3], &self.scratch[d + 4], nb - 3, s)
            if s < 0 and rc >= 0:
                rc = self._send_env(self.scratch, d + 1, CMD_DISCONNECT, False)
            return rc if rc < 0 else 0
        if nb != (5 if command == CMD_FAILED else 2):
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if command == CMD_DISCONNECT:
            if s >= 0:
                self.counters[CNT_WORKERS_LEFT] += 1
                self._worker_event(EV_WORKER_LEFT, <uint32_t>s)
                return self._forget(<uint32_t>s)
            return 0
        if s < 0:
            # HEARTBEAT or FAILED from a worker this broker does not know (it was
            # restarted, or took the worker for dead): make it register again.
            rc = self._send_env(self.scratch, d + 1, CMD_DISCONNECT, False)
            if rc < 0:
                return rc
        if command == CMD_FAILED:
            return self._worker_failed(s, d)
        return 0

    cdef int _address_key(self, int d) noexcept nogil:
        """Write the length-prefixed routing frames scratch[0:d] into keybuf/keylen."""
        cdef size_t total = 0, off = 0, sz
        cdef int i
        cdef uint8_t *grown
        for i in range(d):
            total += 4 + zmsg_size(&self.scratch[i])
        if total > self.keybuf_cap:
            grown = <uint8_t *>realloc(self.keybuf, total)
            if grown == NULL:
                return -1
            self.keybuf = grown
            self.keybuf_cap = total
        for i in range(d):
            sz = zmsg_size(&self.scratch[i])
            self.keybuf[off] = sz & 0xFF
            self.keybuf[off + 1] = (sz >> 8) & 0xFF
            self.keybuf[off + 2] = (sz >> 16) & 0xFF
            self.keybuf[off + 3] = (sz >> 24) & 0xFF
            memcpy(self.keybuf + off + 4, zmsg_data(&self.scratch[i]), sz)
            off += 4 + sz
        self.keylen = total
        return 0

    cdef int _sess_find(self) noexcept nogil:
        """Session slot of the worker whose key is in keybuf, or -1."""
        cdef int i = aidx_find(&self.sess_index, self.keybuf, self.keylen, hash_bytes(self.keybuf, self.keylen))
        return <int>self.sess_index.ents[i].value if i >= 0 else -1

    cdef int _worker_ready(self, int s, int d, int nb) noexcept nogil:
        cdef const uint8_t *c
        cdef uint32_t credit
        if nb != 3 or zmsg_size(&self.scratch[d + 3]) != 4:
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        c = <const uint8_t *>zmsg_data(&self.scratch[d + 3])
        credit = (<uint32_t>c[0] << 24) | (<uint32_t>c[1] << 16) | (<uint32_t>c[2] << 8) | c[3]
        if credit > MAX_CREDIT:
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if s < 0:
            s = self._sess_new(d)
            if s < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
        self.sess[s].credit = credit
        self.counters[CNT_READY] += 1
        self._offer(<uint32_t>s)
        return 0

    cdef int _worker_failed(self, int s, int d) noexcept nogil:
        cdef int rs
        cdef Req *r
        if zmsg_size(&self.scratch[d + 3]) != TASK_ID_SIZE:
            self._drop(DROP_ANSWER_BAD_ID)
            return 0
        rs = self.table.find(<const uint8_t *>zmsg_data(&self.scratch[d + 3]), TASK_ID_SIZE)
        if rs < 0 or s < 0 or self.table.reqs[rs].worker != s:
            # Not the attempt in progress (answered, timed out, or another worker's).
            self._drop(DROP_ANSWER_UNKNOWN)
            self._settle_ghost(s)
            return 0
        self.counters[CNT_FAILED] += 1
        self.heap.delete(<uint32_t>rs)
        self._detach(<uint32_t>rs)
        r = &self.table.reqs[rs]
        r.failed_on = s
        r.failed_on_gen = self.sess[s].gen
        if r.client:
            if r.fail == NULL:
                r.fail = <zmsg *>malloc(2 * sizeof(zmsg))
                if r.fail != NULL:
                    zmsg_init(&r.fail[0])
                    zmsg_init(&r.fail[1])
            # Without memory for the text, the outcome is still FAILED-less: TIMED_OUT.
            if r.fail != NULL:
                zmsg_move(&r.fail[0], &self.scratch[d + 4])
                zmsg_move(&r.fail[1], &self.scratch[d + 5])
        return self._retry_or_abort(<uint32_t>rs)

    # -- sessions ---------------------------------------------------------------

    cdef int _sess_new(self, int d) noexcept nogil:
        """Register the worker whose routing frames are scratch[0:d] (key in keybuf)."""
        cdef uint32_t s, ncap, i
        cdef Sess *grown
        cdef Sess *w
        cdef uint8_t *key
        cdef size_t keylen = self.keylen
        cdef uint64_t h = hash_bytes(self.keybuf, keylen)
        if self.sess_free == NO_SLOT:
            ncap = self.sess_cap * 2 if self.sess_cap else 16
            grown = <Sess *>realloc(self.sess, ncap * sizeof(Sess))
            if grown == NULL:
                return -1
            self.sess = grown
            memset(&self.sess[self.sess_cap], 0, (ncap - self.sess_cap) * sizeof(Sess))
            for i in range(self.sess_cap, ncap):
                self.sess[i].next_free = i + 1 if i + 1 < ncap else NO_SLOT
            self.sess_free = self.sess_cap
            self.sess_cap = ncap
        key = <uint8_t *>malloc(keylen if keylen else 1)
        if key == NULL:
            return -1
        memcpy(key, self.keybuf, keylen)
        s = self.sess_free
        w = &self.sess[s]
        w.env = <zmsg *>malloc((d + 1) * sizeof(zmsg))
        if w.env == NULL or aidx_insert(&self.sess_index, key, keylen, h, s) < 0:
            free(w.env)
            w.env = NULL
            free(key)
            return -1
        self.sess_free = w.next_free
        for i in range(<uint32_t>(d + 1)):
            zmsg_init(&w.env[i])
            zmsg_copy(&w.env[i], &self.scratch[i])
        w.nenv = d + 1
        w.used = True
        w.key = key
        w.keylen = keylen
        w.hash = h
        w.credit = 0
        w.inflight = 0
        w.ghosts = 0
        w.jobs = NO_SLOT
        w.expiry = self.now + self._heartbeat * self._liveness
        self.n_sessions += 1
        if self.n_sessions == 1:
            self.next_tick = self.now + self._heartbeat
            self.next_check = w.expiry
        elif w.expiry < self.next_check:
            self.next_check = w.expiry
        self.counters[CNT_WORKERS_JOINED] += 1
        self._worker_event(EV_WORKER_JOINED, s)
        return <int>s

    cdef void _sess_release(self, uint32_t s) noexcept nogil:
        cdef Sess *w = &self.sess[s]
        cdef int i = aidx_find(&self.sess_index, w.key, w.keylen, w.hash)
        if i >= 0:
            aidx_delete(&self.sess_index, i)  # frees the key
        close_msgs(w.env, w.nenv)
        free(w.env)
        w.env = NULL
        w.key = NULL
        w.nenv = 0
        w.used = False
        w.gen += 1
        w.next_free = self.sess_free
        self.sess_free = s
        self.n_sessions -= 1

    cdef void _offer(self, uint32_t s) noexcept nogil:
        """Keep the worker in the idle FIFO exactly while it has spare credit."""
        cdef Sess *w = &self.sess[s]
        cdef int slot = self.idle.find(w.key, w.keylen)
        cdef uint8_t *key
        if w.inflight < w.credit:
            if slot < 0:
                key = <uint8_t *>malloc(w.keylen if w.keylen else 1)
                if key != NULL:
                    memcpy(key, w.key, w.keylen)
                    if self.idle.push_key(key, w.keylen, NULL, 0, <int32_t>s) < 0:
                        free(key)
        elif slot >= 0:
            self.idle.remove_slot(<uint32_t>slot)

    cdef void _attach(self, uint32_t rs, uint32_t s) noexcept nogil:
        cdef Req *r = &self.table.reqs[rs]
        cdef Sess *w = &self.sess[s]
        r.worker = <int32_t>s
        r.wprev = NO_SLOT
        r.wnext = w.jobs
        if w.jobs != NO_SLOT:
            self.table.reqs[w.jobs].wprev = rs
        w.jobs = rs
        w.inflight += 1

    cdef void _detach(self, uint32_t rs, bint by_worker=True) noexcept nogil:
        """The attempt in progress is over. If its worker ended it (answer, FAILED,
        death), its credit is free; if it ended without the worker (timeout, an
        answer from another attempt), the worker is still busy with it: the credit
        stays taken, as a ghost, until the worker answers or fails it."""
        cdef Req *r = &self.table.reqs[rs]
        cdef Sess *w
        cdef int32_t s = r.worker
        if s < 0:
            return
        w = &self.sess[s]
        if r.wprev != NO_SLOT:
            self.table.reqs[r.wprev].wnext = r.wnext
        else:
            w.jobs = r.wnext
        if r.wnext != NO_SLOT:
            self.table.reqs[r.wnext].wprev = r.wprev
        r.worker = -1
        r.wprev = NO_SLOT
        r.wnext = NO_SLOT
        if by_worker:
            w.inflight -= 1
            self._offer(<uint32_t>s)
        else:
            w.ghosts += 1

    cdef void _settle_ghost(self, int s) noexcept nogil:
        """Worker s answered or failed a job that had ended without it: free that credit."""
        if s >= 0 and self.sess[s].ghosts:
            self.sess[s].ghosts -= 1
            self.sess[s].inflight -= 1
            self._offer(<uint32_t>s)

    cdef int _forget(self, uint32_t s, bint requeue=True) noexcept nogil:
        """The worker is gone: its jobs go back to the front of the queue at once
        (unless the broker is closing: requeue=False leaves them to their fate)."""
        cdef uint32_t rs, prev
        cdef int rc, result = 0
        self.sess[s].credit = 0  # so detaching its jobs does not offer it again
        self._offer(s)
        # The list holds the newest job first; requeue the oldest first, so the
        # jobs keep the order in which they were sent.
        rs = self.sess[s].jobs
        while rs != NO_SLOT and self.table.reqs[rs].wnext != NO_SLOT:
            rs = self.table.reqs[rs].wnext
        while rs != NO_SLOT:
            prev = self.table.reqs[rs].wprev
            self._detach(rs)
            if requeue:
                self.heap.delete(rs)
                self.counters[CNT_REQUEUED] += 1
                rc = self._retry_or_abort(rs)
                if rc < 0:
                    result = rc
            rs = prev
        self._sess_release(s)
        return result

    cdef int _tick(self, double now) noexcept nogil:
        """Forget workers silent past liveness, at the moment the earliest one may
        be; heartbeat the others every interval. Expiries only move later, so the
        earliest one seen in a scan is when the next scan is due."""
        cdef uint32_t s
        cdef int rc = 0
        cdef bint beat = now >= self.next_tick
        cdef double earliest = now + self._heartbeat * self._liveness
        if beat:
            self.next_tick = now + self._heartbeat
        for s in range(self.sess_cap):
            if not self.sess[s].used:
                continue
            if now >= self.sess[s].expiry:
                self.counters[CNT_WORKERS_DEAD] += 1
                self._worker_event(EV_WORKER_DEAD, s)
                rc = self._forget(s)
            else:
                if self.sess[s].expiry < earliest:
                    earliest = self.sess[s].expiry
                if beat:
                    rc = self._send_env(self.sess[s].env, self.sess[s].nenv, CMD_HEARTBEAT, False)
            if rc < 0:
                return rc
        self.next_check = earliest
        return 0

    cdef int _send_env(self, zmsg *env, int nenv, int command, bint more) noexcept nogil:
        """Send copies of env, the signature and a command to a worker; the body, if
        any, follows (more=True). Returns 0, 1 if the worker is unreachable, or -errno."""
        cdef zmsg part
        cdef int i, e
        for i in range(nenv):
            zmsg_init(&part)
            zmsg_copy(&part, &env[i])
            if zmsg_send(&part, self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&part)
                if e == ZETERM:
                    return -e
                return 1 if i == 0 else 0
        zmsg_init_size(&part, SIGNATURE_SIZE)
        memcpy(zmsg_data(&part), WORKER_SIGNATURE, SIGNATURE_SIZE)
        if zmsg_send(&part, self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
            zmsg_close(&part)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>command
        if zmsg_send(&part, self.s_workers, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
            zmsg_close(&part)
        return 0

    # -- the FBC01 client protocol (docs/PROTOCOL.md section 10) -------------------

    cdef int _on_client(self, int n) noexcept nogil:
        cdef uint8_t command
        cdef const uint8_t *cid
        cdef CEnt *e
        cdef uint32_t v
        if n < 3 or zmsg_size(&self.scratch[2]) != 1:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&self.scratch[2]))[0]
        if command < C_SUBMIT or command > C_STATS:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if n < 4 or zmsg_size(&self.scratch[3]) != REQUEST_ID_SIZE:
            self._drop(DROP_CLIENT_BAD_ID)
            return 0
        cid = <const uint8_t *>zmsg_data(&self.scratch[3])
        if command == C_SUBMIT:
            return self._client_submit(n, cid)
        if n != 4:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if command == C_STATS:
            return self._reply_stats(cid)
        e = cidx_find(&self.cids, cid)
        if e == NULL:
            return self._reply(&self.scratch[0], R_UNKNOWN, cid, NULL, 0)
        v = e.value
        if command == C_STATUS:
            return self._reply_status(cid, v)
        if v & DONE_BIT:
            # RESULT, or CANCEL of a finished request: its outcome.
            return self._reply_outcome(&self.scratch[0], v & ~DONE_BIT)
        if command == C_CANCEL:
            return self._cancel(v)
        if self._add_waiter(&self.table.reqs[v]) < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        return self._reply_status(cid, v)

    cdef int _client_submit(self, int n, const uint8_t *cid) noexcept nogil:
        cdef const uint8_t *o
        cdef size_t olen
        cdef uint32_t flags = 0, timeout_ms = 0, tries = 0, v
        cdef int i, s, rc = 0
        cdef Req *r
        cdef CEnt *e
        if n < 6:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        olen = zmsg_size(&self.scratch[4])
        o = <const uint8_t *>zmsg_data(&self.scratch[4])
        if olen == OPTIONS_SIZE:
            flags = o[0]
            timeout_ms = (<uint32_t>o[1] << 24) | (<uint32_t>o[2] << 16) | (<uint32_t>o[3] << 8) | o[4]
            tries = (<uint32_t>o[5] << 24) | (<uint32_t>o[6] << 16) | (<uint32_t>o[7] << 8) | o[8]
        if (olen != 0 and olen != OPTIONS_SIZE) or (flags & ~(<uint32_t>OPT_KNOWN_FLAGS)) or \
                timeout_ms > MAX_REQUEST_TIMEOUT_MS:
            return self._reject(cid, REJECT_BAD_OPTIONS, BAD_OPTIONS_TEXT)
        e = cidx_find(&self.cids, cid)
        if e != NULL:
            # The same id again: it runs once; this sender is told the outcome too.
            self.counters[CNT_DUPLICATES] += 1
            v = e.value
            if not v & DONE_BIT and self._add_waiter(&self.table.reqs[v]) < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
            if not flags & OPT_NO_ACK:
                rc = self._reply(&self.scratch[0], R_ACCEPTED, cid, NULL, 0)
            if rc >= 0 and v & DONE_BIT:
                rc = self._reply_outcome(&self.scratch[0], v & ~DONE_BIT)
            return rc
        if self.n_queued >= self._max_queue:
            return self._reject(cid, REJECT_QUEUE_FULL, QUEUE_FULL_TEXT)
        s = self.table.alloc()
        if s < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # Frames kept: the sender's identity (its first waiter), then the payload.
        r.frames = <zmsg *>malloc((n - 4) * sizeof(zmsg))
        if r.frames == NULL:
            self.table.release(s)
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        if ring_push(&self.waiting, make_handle(s, r.gen)) < 0 or \
                cidx_insert(&self.cids, cid, <uint32_t>s) < 0:
            self.table.release(s)  # a ring entry already pushed turns into a tombstone
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        zmsg_init(&r.frames[0])
        zmsg_copy(&r.frames[0], &self.scratch[0])
        for i in range(5, n):
            zmsg_init(&r.frames[i - 4])
            zmsg_move(&r.frames[i - 4], &self.scratch[i])
        r.nframes = n - 4
        r.nenv = 1
        if self.n_queued or not self.idle.live:
            self._own_small_frames(&r.frames[1], n - 5)
        r.client = True
        memcpy(r.cid, cid, REQUEST_ID_SIZE)
        if tries == 0:
            r.tries_left = self._tries
        else:
            r.tries_left = <int32_t>(tries if tries < MAX_REQUEST_TRIES else MAX_REQUEST_TRIES)
        r.tries = r.tries_left
        r.timeout = self._timeout if timeout_ms == 0 else timeout_ms / 1000.0
        r.arrived = self.now
        self.n_queued += 1
        self.counters[CNT_REQUESTS] += 1
        if self.journal_on:
            self._journal_push(J_SUBMIT, cid, 0, &r.frames[1], r.nframes - 1, 0, r.tries, r.timeout)
        if not flags & OPT_NO_ACK:
            return self._reply(&self.scratch[0], R_ACCEPTED, cid, NULL, 0)
        return 0

    cdef int _reject(self, const uint8_t *cid, int reason, const char *text) noexcept nogil:
        cdef zmsg extra[2]
        cdef size_t n = strlen(text)
        cdef int rc
        self.counters[CNT_REJECTED] += 1
        zmsg_init_size(&extra[0], 1)
        (<uint8_t *>zmsg_data(&extra[0]))[0] = <uint8_t>reason
        zmsg_init_size(&extra[1], n)
        memcpy(zmsg_data(&extra[1]), text, n)
        rc = self._reply(&self.scratch[0], R_REJECTED, cid, extra, 2)
        close_msgs(extra, 2)
        return rc

    cdef int _answer_empty(self, int nenv) noexcept nogil:
        """Send the empty answer to the REQ client whose envelope is scratch[0:nenv]."""
        cdef zmsg part
        cdef int i, e
        for i in range(nenv + 1):
            zmsg_init(&part)
            if i < nenv:
                zmsg_copy(&part, &self.scratch[i])
            if zmsg_send(&part, self.s_requests, (ZSNDMORE if i < nenv else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&part)
                return -e if e == ZETERM else 0
        return 0

    cdef bint _is_waiter(self, Req *r) noexcept nogil:
        """Whether the current message's sender (scratch[0]) is one of r's waiters."""
        cdef int i
        cdef zmsg *me = &self.scratch[0]
        cdef size_t sz = zmsg_size(me)
        for i in range(r.nenv):
            if zmsg_size(&r.frames[i]) == sz and memcmp(zmsg_data(&r.frames[i]), zmsg_data(me), sz) == 0:
                return True
        return False

    cdef int _add_waiter(self, Req *r) noexcept nogil:
        """Make the current message's sender (scratch[0]) one of r's waiters."""
        cdef int i
        cdef zmsg *grown
        cdef zmsg *me = &self.scratch[0]
        if self._is_waiter(r):
            return 0
        if r.nenv == MAX_WAITERS:
            # Full: the oldest waiter gives way.
            for i in range(1, r.nenv):
                zmsg_move(&r.frames[i - 1], &r.frames[i])
            zmsg_copy(&r.frames[r.nenv - 1], me)
            return 0
        grown = <zmsg *>realloc(r.frames, (r.nframes + 1) * sizeof(zmsg))
        if grown == NULL:
            return -1
        r.frames = grown
        # Shift the payload up one place to make room after the waiters.
        zmsg_init(&r.frames[r.nframes])
        i = r.nframes
        while i > r.nenv:
            zmsg_move(&r.frames[i], &r.frames[i - 1])
            i -= 1
        zmsg_copy(&r.frames[r.nenv], me)
        r.nenv += 1
        r.nframes += 1
        return 0

    cdef int _reply(self, zmsg *identity, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil:
        """Send [identity, FBC01, code, cid, body...] to a client; every frame is a
        copy (shared buffer). A client that is gone or not reading loses it."""
        cdef zmsg part
        cdef int i, rc
        zmsg_init(&part)
        zmsg_copy(&part, identity)
        rc = self._emit(&part, True)
        if rc != 0:
            return rc if rc < 0 else 0
        zmsg_init_size(&part, SIGNATURE_SIZE)
        memcpy(zmsg_data(&part), CLIENT_SIGNATURE, SIGNATURE_SIZE)
        self._emit(&part, True)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>code
        self._emit(&part, True)
        zmsg_init_size(&part, REQUEST_ID_SIZE)
        memcpy(zmsg_data(&part), cid, REQUEST_ID_SIZE)
        self._emit(&part, nbody > 0)
        for i in range(nbody):
            zmsg_init(&part)
            zmsg_copy(&part, &body[i])
            self._emit(&part, i + 1 < nbody)
        return 0

    cdef int _emit(self, zmsg *part, bint more) noexcept nogil:
        """Send one part of a reply to a client, or, with the journal on, hold it
        until release_held(). Returns 0, 1 if it could not go (peer gone, HWM), or
        -errno; the part is consumed either way."""
        cdef zmsg *grown
        cdef uint8_t *gmore
        cdef size_t ncap
        cdef int e
        if not self.journal_on:
            if zmsg_send(part, self.s_requests, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(part)
                return -e if e == ZETERM else 1
            return 0
        if self.nheld == self.held_cap:
            ncap = self.held_cap * 2 if self.held_cap else 256
            grown = <zmsg *>realloc(self.held, ncap * sizeof(zmsg))
            if grown != NULL:
                self.held = grown
                gmore = <uint8_t *>realloc(self.held_more, ncap)
                if gmore != NULL:
                    self.held_more = gmore
                    self.held_cap = ncap
            if self.nheld == self.held_cap:
                zmsg_close(part)
                return 1
        zmsg_init(&self.held[self.nheld])
        zmsg_move(&self.held[self.nheld], part)
        zmsg_close(part)
        self.held_more[self.nheld] = more
        self.nheld += 1
        return 0

    cdef void _journal_push(self, int kind, const uint8_t *cid, int code, zmsg *frames, int nframes,
                            uint32_t attempts, int32_t tries, double timeout) noexcept nogil:
        cdef JEnt *grown
        cdef JEnt *j
        cdef size_t ncap
        cdef int i
        if self.jcount == self.jcap:
            ncap = self.jcap * 2 if self.jcap else 256
            grown = <JEnt *>realloc(self.jents, ncap * sizeof(JEnt))
            if grown == NULL:
                self.journal_lost = True  # the store cannot be trusted now: run() says so
                return
            self.jents = grown
            self.jcap = ncap
        j = &self.jents[self.jcount]
        j.frames = NULL
        if nframes:
            j.frames = <zmsg *>malloc(nframes * sizeof(zmsg))
            if j.frames == NULL:
                self.journal_lost = True
                return
        self.jcount += 1
        j.kind = <uint8_t>kind
        j.code = <uint8_t>code
        memcpy(j.cid, cid, REQUEST_ID_SIZE)
        j.attempts = attempts
        j.tries = tries
        j.timeout = timeout
        j.nframes = nframes
        for i in range(nframes):
            zmsg_init(&j.frames[i])
            zmsg_copy(&j.frames[i], &frames[i])

    cdef int _reply_outcome(self, zmsg *identity, uint32_t d) noexcept nogil:
        return self._reply(identity, self.done[d].code, self.done[d].cid, self.done[d].body, self.done[d].nbody)

    cdef int _reply_stats(self, const uint8_t *cid) noexcept nogil:
        cdef uint64_t v[N_STATS]
        cdef uint64_t count = 0
        cdef zmsg body[2]
        cdef uint8_t *p
        cdef int i, k, rc
        cdef const char *names = self.names_ptr
        cdef size_t nlen = self.names_len
        for i in range(N_COUNTERS):
            v[i] = self.counters[i]
        v[N_COUNTERS] = self.n_queued
        v[N_COUNTERS + 1] = self.table.count - self.n_queued
        v[N_COUNTERS + 2] = self.idle.live
        v[N_COUNTERS + 3] = self.n_sessions
        v[N_COUNTERS + 4] = self.done_fifo.count
        v[N_COUNTERS + 5] = self.retained_bytes
        for i in range(N_LATENCY):
            v[N_COUNTERS + N_GAUGES + i] = self.latency_counts[i]
            count += self.latency_counts[i]
        v[N_STATS - 2] = count
        v[N_STATS - 1] = <uint64_t>(self.latency_sum * 1e6)
        zmsg_init_size(&body[0], nlen)
        memcpy(zmsg_data(&body[0]), names, nlen)
        zmsg_init_size(&body[1], 8 * N_STATS)
        p = <uint8_t *>zmsg_data(&body[1])
        for i in range(N_STATS):
            for k in range(8):
                p[8 * i + k] = (v[i] >> (56 - 8 * k)) & 0xFF
        rc = self._reply(&self.scratch[0], R_STATS, cid, body, 2)
        close_msgs(body, 2)
        return rc

    cdef int _reply_status(self, const uint8_t *cid, uint32_t v) noexcept nogil:
        cdef zmsg body[3]
        cdef uint8_t *p
        cdef uint32_t attempts, tries
        cdef int state, rc, i
        if v & DONE_BIT:
            state = STATE_DONE
            attempts = self.done[v & ~DONE_BIT].attempts
            tries = <uint32_t>max(self.done[v & ~DONE_BIT].tries, 0)
        else:
            state = STATE_QUEUED if self.table.reqs[v].state == QUEUED else STATE_RUNNING
            attempts = self.table.reqs[v].attempts
            tries = <uint32_t>max(self.table.reqs[v].tries, 0)
        zmsg_init_size(&body[0], 1)
        (<uint8_t *>zmsg_data(&body[0]))[0] = <uint8_t>state
        zmsg_init_size(&body[1], 4)
        zmsg_init_size(&body[2], 4)
        for i in range(4):
            (<uint8_t *>zmsg_data(&body[1]))[i] = (attempts >> (24 - 8 * i)) & 0xFF
            (<uint8_t *>zmsg_data(&body[2]))[i] = (tries >> (24 - 8 * i)) & 0xFF
        rc = self._reply(&self.scratch[0], R_STATUS, cid, body, 3)
        close_msgs(body, 3)
        return rc

    cdef int _cancel(self, uint32_t rs) noexcept nogil:
        """The client (scratch[0]) cancelled request rs."""
        cdef Req *r = &self.table.reqs[rs]
        cdef zmsg part
        cdef int rc
        if r.state == QUEUED:
            # Its queue entry turns into a tombstone when the slot is released.
            self.n_queued -= 1
        else:
            self.heap.delete(rs)
            if r.worker >= 0:
                # Tell its FBW01 worker, which may abandon the job; the credit stays
                # taken (a ghost) until the worker answers or fails it.
                rc = self._send_env(self.sess[r.worker].env, self.sess[r.worker].nenv, CMD_CANCEL, True)
                if rc < 0:
                    return rc
                if rc == 0:
                    zmsg_init_size(&part, TASK_ID_SIZE)
                    self.table.write_id(rs, <uint8_t *>zmsg_data(&part))
                    if zmsg_send(&part, self.s_workers, ZDONTWAIT) < 0:
                        zmsg_close(&part)
            self._detach(rs, False)
        self.counters[CNT_CANCELLED] += 1
        rc = self._conclude(r, R_CANCELLED, NULL, 0)
        # Not made a waiter: on a full list it would push out a submitter.
        if rc >= 0 and not self._is_waiter(r):
            rc = self._reply(&self.scratch[0], R_CANCELLED, r.cid, NULL, 0)
        self.table.release(rs)
        return rc

    cdef int _conclude(self, Req *r, int code, zmsg *body, int nbody) noexcept nogil:
        """Tell every waiter of a finished FBC01 request its outcome, and keep the
        outcome for RESULT (the caller releases the request)."""
        cdef int w, rc, result = 0
        cdef CEnt *e
        for w in range(r.nenv):
            rc = self._reply(&r.frames[w], code, r.cid, body, nbody)
            if rc < 0:
                result = rc
        e = cidx_find(&self.cids, r.cid)
        if e == NULL:
            return result
        if self.journal_on:
            self._journal_push(J_FINISH, r.cid, code, body, nbody, r.attempts, r.tries, 0.0)
        self._keep(e, r.cid, code, body, nbody, r.attempts, r.tries, self.now)
        return result

    cdef void _keep(self, CEnt *e, const uint8_t *cid, int code, zmsg *body, int nbody,
                    uint32_t attempts, int32_t tries, double finished) noexcept nogil:
        """Keep an outcome for RESULT; cids entry e (the id's) then points to it."""
        cdef int w
        cdef uint32_t d, ncap
        cdef size_t size = RESULT_OVERHEAD, sz
        cdef Done *grown
        cdef Done *o
        for w in range(nbody):
            size += zmsg_size(&body[w])
        if self.retention <= 0 or size > self.retention_bytes:
            # Not kept (too big alone: forgotten at once, the others stay).
            cidx_delete(&self.cids, e)
            if self.retention > 0:
                self.counters[CNT_EXPIRED_RESULTS] += 1
            if self.journal_on:
                self._journal_push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)
            return
        if self.done_free == NO_SLOT and self.done_used == self.done_cap:
            # Only realloc, as for requests: slots are set up when first used.
            ncap = self.done_cap * 2 if self.done_cap else 64
            grown = <Done *>realloc(self.done, ncap * sizeof(Done))
            if grown == NULL:
                self._not_kept(e, cid)
                return
            self.done = grown
            self.done_cap = ncap
        d = self.done_free if self.done_free != NO_SLOT else self.done_used
        o = &self.done[d]
        o.body = NULL
        if nbody:
            o.body = <zmsg *>malloc(nbody * sizeof(zmsg))
        if (nbody and o.body == NULL) or ring_push(&self.done_fifo, d) < 0:
            free(o.body)
            o.body = NULL
            self._not_kept(e, cid)
            return
        if d == self.done_free:
            self.done_free = o.next_free
        else:
            self.done_used += 1
        memcpy(o.cid, cid, REQUEST_ID_SIZE)
        o.code = <uint8_t>code
        o.nbody = nbody
        o.size = size
        for w in range(nbody):
            sz = zmsg_size(&body[w])
            if sz > MAX_VSM_SIZE and sz <= KEEP_COPY_MAX:
                # A frame this size may lie in libzmq's shared receive buffer (8 KiB
                # of data plus its reference counts, ~18 KB), which it would keep
                # alive for as long as the outcome is kept: a copy of its own costs
                # its size instead. Larger frames have buffers of their own: shared.
                if zmsg_init_size(&o.body[w], sz) == 0:
                    memcpy(zmsg_data(&o.body[w]), zmsg_data(&body[w]), sz)
                    continue
            zmsg_init(&o.body[w])
            zmsg_copy(&o.body[w], &body[w])
        o.finished = finished
        o.attempts = attempts
        o.tries = tries
        e.value = d | DONE_BIT
        self.retained_bytes += o.size
        while self.retained_bytes > self.retention_bytes:
            self._forget_first_outcome()

    cdef void _not_kept(self, CEnt *e, const uint8_t *cid) noexcept nogil:
        # Out of memory: the id is unknown again (and so in the store).
        cidx_delete(&self.cids, e)
        if self.journal_on:
            self._journal_push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void _forget_first_outcome(self) noexcept nogil:
        cdef uint32_t d = <uint32_t>ring_front(&self.done_fifo)
        cdef Done *o = &self.done[d]
        cdef CEnt *e = cidx_find(&self.cids, o.cid)
        ring_drop_front(&self.done_fifo)
        if e != NULL:
            cidx_delete(&self.cids, e)
        close_msgs(o.body, o.nbody)
        free(o.body)
        o.body = NULL
        o.nbody = 0
        self.retained_bytes -= o.size
        o.next_free = self.done_free
        self.done_free = d
        self.counters[CNT_EXPIRED_RESULTS] += 1
        if self.journal_on:
            self._journal_push(J_FORGET, o.cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void _forget_outcomes(self, double now) noexcept nogil:
        while self.done_fifo.count and \
                self.done[<uint32_t>ring_front(&self.done_fifo)].finished + self.retention <= now:
            self._forget_first_outcome()

    # -- answers ------------------------------------------------------------------

    cdef int _on_answer(self, int n) noexcept nogil:
        if n < 2:
            self._drop(DROP_ANSWER_TOO_SHORT)
            return 0
        return self._answer(&self.scratch[0], &self.scratch[1], n - 1, -1)

    cdef int _answer(self, zmsg *tid, zmsg *body, int nbody, int from_s) noexcept nogil:
        """Deliver the first answer for a task; later ones are dropped. from_s is
        the answering DEALER worker's session, -1 for a PUSH answer."""
        cdef int s, rc
        cdef bint own
        cdef Req *r
        if zmsg_size(tid) != TASK_ID_SIZE:
            self._drop(DROP_ANSWER_BAD_ID)
            return 0
        s = self.table.find(<const uint8_t *>zmsg_data(tid), TASK_ID_SIZE)
        if s < 0:
            self._drop(DROP_ANSWER_UNKNOWN)
            self._settle_ghost(from_s)
            return 0
        r = &self.table.reqs[s]
        own = from_s >= 0 and r.worker == from_s
        if not own:
            self._settle_ghost(from_s)
        rc = self._send_to_client(r, body, nbody)
        self._record_latency(self.now - r.arrived)
        if r.state == QUEUED:
            # Answered by an earlier attempt while waiting for a retry: the queue
            # entry turns into a tombstone when the slot's generation moves on.
            self.n_queued -= 1
            self.counters[CNT_LATE_ANSWERS] += 1
        else:
            self.heap.delete(<uint32_t>s)
            self._detach(<uint32_t>s, own)
        self.table.release(<uint32_t>s)
        self.counters[CNT_ANSWERED] += 1
        return rc

    cdef void _record_latency(self, double seconds) noexcept nogil:
        cdef int i = 0
        while i < N_LATENCY - 1 and seconds > LATENCY_BOUNDS[i]:
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum += seconds

    cdef int _send_to_client(self, Req *r, zmsg *body, int nbody) noexcept nogil:
        """Send r's envelope, the empty delimiter, then body (moved). A client that
        is gone or not reading loses its answer: ROUTER drops it, as in the
        original broker."""
        cdef int i, e
        cdef zmsg delimiter
        if r.client:
            return self._conclude(r, R_OK, body, nbody)
        for i in range(r.nenv):
            if zmsg_send(&r.frames[i], self.s_requests, ZSNDMORE | ZDONTWAIT) < 0:
                e = zerrno()
                return -e if e == ZETERM else 0
        zmsg_init(&delimiter)
        if zmsg_send(&delimiter, self.s_requests, ZSNDMORE | ZDONTWAIT) < 0:
            zmsg_close(&delimiter)
            e = zerrno()
            return -e if e == ZETERM else 0
        for i in range(nbody):
            if zmsg_send(&body[i], self.s_requests, (ZSNDMORE if i + 1 < nbody else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                return -e if e == ZETERM else 0
        return 0

    cdef int _expire(self, double now) noexcept nogil:
        cdef uint32_t s
        cdef int rc
        while self.heap.count and self.heap.ents[0].deadline <= now:
            s = self.heap.pop_min()
            self.counters[CNT_TIMEOUTS] += 1
            self._detach(s, False)
            rc = self._retry_or_abort(s)
            if rc < 0:
                return rc
        return 0

    cdef int _retry_or_abort(self, uint32_t s) noexcept nogil:
        """An attempt ended without an answer: queue the job ahead of new requests,
        or, with no tries left, send the client the empty answer."""
        cdef Req *r = &self.table.reqs[s]
        cdef zmsg empty
        cdef uint8_t tid[TASK_ID_SIZE]
        cdef int rc
        # Without memory to requeue, give up on the job rather than lose track of it.
        if r.tries_left == 0 or ring_push(&self.retry, make_handle(s, r.gen)) < 0:
            if not r.client:
                if self.ev_on:
                    self.table.write_id(s, tid)
                    self._event(EV_ABORTED, tid, TASK_ID_SIZE, r.attempts)
                zmsg_init(&empty)
                rc = self._send_to_client(r, &empty, 1)
                zmsg_close(&empty)
            elif r.fail != NULL:
                self._event(EV_FAILED, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self._conclude(r, R_FAILED, r.fail, 2)
            else:
                self._event(EV_TIMED_OUT, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self._conclude(r, R_TIMED_OUT, NULL, 0)
            self.table.release(s)
            self.counters[CNT_ABORTED] += 1
            return rc
        r.state = QUEUED
        self.n_queued += 1
        self.counters[CNT_RETRIED] += 1
        return 0

    cdef Ring *_next_queue(self) noexcept nogil:
        """The queue whose front is the request to dispatch next, or NULL.
        Tombstones met on the way are dropped."""
        cdef Ring *q = &self.retry
        cdef uint64_t h
        while True:
            while q.count:
                h = ring_front(q)
                if self.table.live(h) and self.table.reqs[<uint32_t>(h >> 32)].state == QUEUED:
                    return q
                ring_drop_front(q)
            if q == &self.waiting:
                return NULL
            q = &self.waiting

    cdef int _dispatch(self, double now) noexcept nogil:
        cdef int s, w, w2, i, e, nenv, sidx, rc
        cdef Req *r
        cdef Wk *wk
        cdef zmsg part
        cdef Ring *q
        while self.idle.live:
            q = self._next_queue()
            if q == NULL:
                return 0
            s = <int>(ring_front(q) >> 32)
            w = self.idle.pop_slot()
            if w < 0:
                return 0
            sidx = self.idle.slots[w].session
            r = &self.table.reqs[s]
            if sidx >= 0 and r.failed_on == sidx and r.failed_on_gen == self.sess[sidx].gen and self.idle.live:
                # Retry a failed job on another worker when one is idle.
                w2 = self.idle.pop_slot()
                self.idle.release(w)
                self._offer(<uint32_t>sidx)
                w = w2
                sidx = self.idle.slots[w].session
            wk = &self.idle.slots[w]
            # ROUTER_MANDATORY makes the first frame fail for a worker that is gone;
            # the job then stays at the front for the next idle worker.
            if sidx >= 0:
                self.idle.release(w)
                rc = self._send_env(self.sess[sidx].env, self.sess[sidx].nenv, CMD_TASK, True)
                if rc < 0:
                    return rc
                if rc == 1:
                    self.counters[CNT_UNREACHABLE_WORKERS] += 1
                    self.counters[CNT_WORKERS_DEAD] += 1
                    self._worker_event(EV_WORKER_DEAD, <uint32_t>sidx)
                    rc = self._forget(<uint32_t>sidx)
                    if rc < 0:
                        return rc
                    continue
            else:
                if zmsg_send(&wk.env[0], self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
                    e = zerrno()
                    self.idle.release(w)
                    if e == ZETERM:
                        return -e
                    self.counters[CNT_UNREACHABLE_WORKERS] += 1
                    continue
                for i in range(1, wk.nenv):
                    zmsg_send(&wk.env[i], self.s_workers, ZSNDMORE | ZDONTWAIT)
                self.idle.release(w)
            r = &self.table.reqs[s]
            zmsg_init_size(&part, TASK_ID_SIZE)
            self.table.write_id(<uint32_t>s, <uint8_t *>zmsg_data(&part))
            nenv = r.nenv
            if zmsg_send(&part, self.s_workers, (ZSNDMORE if r.nframes > nenv else 0) | ZDONTWAIT) < 0:
                zmsg_close(&part)
            for i in range(nenv, r.nframes):
                # zmq_msg_copy shares the payload buffer (reference count), so a
                # retry can send it again without the bytes being copied.
                zmsg_init(&part)
                zmsg_copy(&part, &r.frames[i])
                if zmsg_send(&part, self.s_workers, (ZSNDMORE if i + 1 < r.nframes else 0) | ZDONTWAIT) < 0:
                    zmsg_close(&part)
            ring_drop_front(q)
            self.n_queued -= 1
            r.state = RUNNING
            r.attempts += 1
            if self.journal_on and r.client:
                self._journal_push(J_START, r.cid, 0, NULL, 0, r.attempts, 0, 0.0)
            r.failed_on = -1
            if r.tries_left > 0:
                r.tries_left -= 1
            if r.timeout >= 0:
                # Without memory for a deadline the attempt simply has none.
                self.heap.insert(<uint32_t>s, now + r.timeout)
            if sidx >= 0:
                self._attach(<uint32_t>s, <uint32_t>sidx)
                self._offer(<uint32_t>sidx)
            self.counters[CNT_DISPATCHED] += 1
        return 0
