# core/ring.pxi: Ring, a FIFO of 64-bit handles (slot << 32 | generation). A handle
# whose generation no longer matches its slot is a tombstone; the ring's users drop
# those when they reach the front.
#
# It is a linked list of fixed-size blocks (like CPython's deque): a push that finds
# the tail block full links a new block, a pop that empties the head block unlinks
# it. So push and pop are O(1) at any size, and growing never copies: a ring holding
# a million handles takes one more the way it takes the first, where a ring in one
# buffer would copy the million into a buffer twice the size, a pause in the middle
# of the loop. One emptied block is kept as a spare, so a queue whose length swings
# around a block boundary does not malloc and free at every swing. Emptying a ring
# for good (ring_empty, when the core closes) keeps its blocks as spares until
# ring_clear, as a ring in one buffer kept its buffer.
#
# Owns: the Ring's blocks (Ring and RingBlock in _core.pxd).
# Touches: nothing else. Users: IdleWorkers, JobQueue, KeptOutcomes.


cdef RingBlock *ring_new_block(Ring *r) noexcept nogil:
    """A block for the tail: a spare one, or a new one; NULL when out of memory."""
    cdef RingBlock *b = r.spare
    if b != NULL:
        r.spare = b.next
    else:
        b = <RingBlock *>malloc(sizeof(RingBlock))
        if b == NULL:
            return NULL
    b.next = NULL
    return b


cdef int ring_push(Ring *r, uint64_t v) noexcept nogil:
    """Append v; -1 when out of memory (the ring is then unchanged)."""
    cdef RingBlock *b
    if r.tail_i == RING_BLOCK or r.tail == NULL:
        b = ring_new_block(r)
        if b == NULL:
            return -1
        if r.tail == NULL:
            r.head = b
            r.head_i = 0
        else:
            r.tail.next = b
        r.tail = b
        r.tail_i = 0
    r.tail.items[r.tail_i] = v
    r.tail_i += 1
    r.count += 1
    return 0


cdef inline uint64_t ring_front(Ring *r) noexcept nogil:
    """The oldest handle; the ring must not be empty."""
    return r.head.items[r.head_i]


cdef inline bint ring_peek(Ring *r, size_t k, uint64_t *v) noexcept nogil:
    """The handle k places behind the front into *v, if it is in the front's block
    (for prefetching: one a block's length ahead is not worth a walk)."""
    if k >= r.count or r.head_i + k >= RING_BLOCK:
        return False
    v[0] = r.head.items[r.head_i + k]
    return True


cdef void ring_next_block(Ring *r) noexcept nogil:
    # The head block is used up and handles remain, so a next block exists.
    cdef RingBlock *old = r.head
    r.head = old.next
    r.head_i = 0
    if r.spare == NULL:
        old.next = NULL
        r.spare = old
    else:
        free(old)


cdef inline void ring_drop_front(Ring *r) noexcept nogil:
    """Remove the oldest handle; the ring must not be empty."""
    r.count -= 1
    r.head_i += 1
    if r.count == 0:
        # Empty: head and tail are the same block; start it again from the top.
        r.head_i = 0
        r.tail_i = 0
    elif r.head_i == RING_BLOCK:
        ring_next_block(r)


cdef void ring_empty(Ring *r) noexcept nogil:
    """Forget every handle but keep the blocks, as spares, until ring_clear."""
    if r.tail != NULL:
        r.tail.next = r.spare  # head ... tail, then the spares there were
        r.spare = r.head
    r.head = r.tail = NULL
    r.head_i = r.tail_i = r.count = 0


cdef void ring_clear(Ring *r) noexcept nogil:
    """Empty the ring and free all its blocks."""
    cdef RingBlock *b
    cdef RingBlock *nxt
    ring_empty(r)
    b = r.spare
    while b != NULL:
        nxt = b.next
        free(b)
        b = nxt
    r.spare = NULL


cdef inline uint64_t make_handle(uint32_t slot, uint32_t gen) noexcept nogil:
    return (<uint64_t>slot << 32) | gen
