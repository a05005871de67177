# core/ring.pxi: Ring, a growable FIFO of 64-bit handles (slot << 32 | generation).
# A handle whose generation no longer matches its slot is a tombstone; the ring's
# users drop those when they reach the front.
#
# Owns: the Ring struct's buffer (declared in _core.pxd).
# Touches: nothing else. Users: IdleWorkers, JobQueue, KeptOutcomes.


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


cdef void ring_clear(Ring *r) noexcept nogil:
    """Empty the ring and free its memory."""
    free(r.buf)
    r.buf = NULL
    r.cap = r.head = r.count = 0


cdef inline uint64_t make_handle(uint32_t slot, uint32_t gen) noexcept nogil:
    return (<uint64_t>slot << 32) | gen
