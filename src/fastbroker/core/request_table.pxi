# core/request_table.pxi: RequestTable, the slot array of every request in the broker,
# addressed by the task id itself, so lookup is O(1) with no hashing; the generation
# makes stale ids (late twins) miss.
#
# Owns: the Req slots (struct and ReqState in _core.pxd) and the frames each holds.
# Touches: nothing else. Every handler reads and writes the Req fields of the slots
# it is given; only this class allocates and releases them.


assert sizeof(Req) == 96, sizeof(Req)


cdef class RequestTable:
    """Requests in the broker, keyed by 16-byte task ids (epoch, slot, generation)."""

    def __cinit__(self, bytes epoch=None):
        if epoch is None:
            epoch = os.urandom(8)
        if len(epoch) != 8:
            raise ValueError("epoch must be 8 bytes")
        memcpy(self.epoch, <const char *>epoch, 8)
        self.free_head = NO_SLOT

    def __dealloc__(self):
        self.clear()

    cdef void clear(self) noexcept nogil:
        """Forget every request and free all memory (as a new RequestTable; the
        epoch stays)."""
        cdef uint32_t i
        for i in range(self.used):
            if self.reqs[i].state != FREE:
                close_msgs(self.reqs[i].frames, self.reqs[i].nframes)
                free(self.reqs[i].frames)
                if self.reqs[i].fail != NULL:
                    close_msgs(self.reqs[i].fail, 2)
                    free(self.reqs[i].fail)
        free(self.reqs)
        self.reqs = NULL
        self.cap = self.used = 0
        self.count = 0
        self.free_head = NO_SLOT

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
        self.reqs[s].v2_waiters = 0
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
