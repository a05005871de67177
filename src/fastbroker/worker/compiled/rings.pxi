# Included by worker/_session.pyx: the growable rings of slot numbers, and two helpers
# for zmq_msg_t arrays.

# -- rings ------------------------------------------------------------------------------

cdef int _ring_grow(Ring *r) noexcept nogil:
    cdef int cap = r.cap * 2 if r.cap else 16
    cdef long long *items = <long long *>malloc(cap * sizeof(long long))
    cdef int i
    global _out_of_memory
    if items == NULL:
        _out_of_memory = 1
        return -1
    for i in range(r.count):
        items[i] = r.items[(r.head + i) % r.cap]
    free(r.items)
    r.items = items
    r.cap = cap
    r.head = 0
    return 0


cdef inline void _ring_push(Ring *r, long long value) noexcept nogil:
    if r.count == r.cap and _ring_grow(r) < 0:
        return
    r.items[(r.head + r.count) % r.cap] = value
    r.count += 1


cdef inline void _ring_push_front(Ring *r, long long value) noexcept nogil:
    if r.count == r.cap and _ring_grow(r) < 0:
        return
    r.head = (r.head + r.cap - 1) % r.cap
    r.items[r.head] = value
    r.count += 1


cdef inline long long _ring_pop(Ring *r) noexcept nogil:
    cdef long long value = r.items[r.head]
    r.head = (r.head + 1) % r.cap
    r.count -= 1
    return value


cdef inline long long _ring_at(Ring *r, int i) noexcept nogil:
    return r.items[(r.head + i) % r.cap]


cdef void _ring_remove(Ring *r, long long value) noexcept nogil:
    """Take every `value` out, keeping the others' order."""
    cdef int i, kept = 0
    cdef long long item
    for i in range(r.count):
        item = r.items[(r.head + i) % r.cap]
        if item != value:
            r.items[(r.head + kept) % r.cap] = item
            kept += 1
    r.count = kept


cdef inline void _put_bytes(zmsg *m, const void *data, size_t size) noexcept nogil:
    global _out_of_memory
    if zmsg_init_size(m, size) != 0:
        _out_of_memory = 1
        zmsg_init(m)
        return
    if size:
        memcpy(zmsg_data(m), data, size)


cdef inline void _close_all(zmsg *frames, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        zmsg_close(&frames[i])
