# core/frames.pxi: helpers on libzmq messages (zmq_msg_t arrays).
#
# Owns: nothing; these functions act on the frames they are given.
# Touches: only those frames.


cdef void close_msgs(zmsg *msgs, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        zmsg_close(&msgs[i])


cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    """A big-endian unsigned 32-bit integer."""
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void store_u32(uint8_t *p, uint32_t v) noexcept nogil:
    """Write v as a big-endian unsigned 32-bit integer."""
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline bint same_frame(zmsg *a, zmsg *b) noexcept nogil:
    """Whether two frames hold the same bytes."""
    cdef size_t sz = zmsg_size(a)
    return zmsg_size(b) == sz and memcmp(zmsg_data(a), zmsg_data(b), sz) == 0


cdef int find_delimiter(zmsg *m, int n) noexcept nogil:
    """Index of the first empty frame of m[0:n], or -1."""
    cdef int i
    for i in range(n):
        if zmsg_size(&m[i]) == 0:
            return i
    return -1


cdef void own_small_frames(zmsg *frames, int n) noexcept nogil:
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


cdef void keep_frames(zmsg *kept, zmsg *frames, int n) noexcept nogil:
    """Set up kept[0:n] (uninitialised) as lasting copies of frames[0:n], for an outcome
    kept for minutes: a frame of 34 B to 8 KiB gets a buffer of its own (as in
    own_small_frames: a shared receive buffer would stay alive with it); a larger one,
    which has its own buffer already, is shared, not copied."""
    cdef int i
    cdef size_t sz
    for i in range(n):
        sz = zmsg_size(&frames[i])
        if sz > MAX_VSM_SIZE and sz <= KEEP_COPY_MAX and zmsg_init_size(&kept[i], sz) == 0:
            memcpy(zmsg_data(&kept[i]), zmsg_data(&frames[i]), sz)
            continue
        zmsg_init(&kept[i])
        zmsg_copy(&kept[i], &frames[i])
