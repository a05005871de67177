# core/reply_batches.pxi: ReplyBatches, the FBC02 replies of one loop turn, gathered
# per client so that each client gets them in one REPLIES message (docs/PROTOCOL.md
# section 12).
#
# Owns: one Batch per client replied to in this turn: a copy of its identity frame,
# the header records and the body frames (copies sharing the outcome's buffers).
# Touches: nothing else. ClientSide adds to it and sends it (flush_batches) at the
# start of every loop turn, so no reply waits for more than the turn that made it.


cdef class ReplyBatches:
    """Batches by client identity; a turn's replies mostly go to one client, so the
    last one found is looked at first."""

    def __dealloc__(self):
        cdef int i
        self.clear()
        for i in range(self.cap):
            free(self.b[i].head)
            free(self.b[i].body)
        free(self.b)

    cdef int find(self, zmsg *identity) noexcept nogil:
        """The index of identity's batch, made if needed; -1 when out of memory."""
        cdef int i
        cdef size_t sz = zmsg_size(identity)
        cdef Batch *grown
        if self.last < self.n and same_frame(&self.b[self.last].identity, identity):
            return self.last
        for i in range(self.n):
            if same_frame(&self.b[i].identity, identity):
                self.last = i
                return i
        if self.n == self.cap:
            grown = <Batch *>realloc(self.b, (self.cap * 2 if self.cap else 8) * sizeof(Batch))
            if grown == NULL:
                return -1
            self.b = grown
            self.cap = self.cap * 2 if self.cap else 8
            for i in range(self.n, self.cap):
                memset(&self.b[i], 0, sizeof(Batch))
        i = self.n
        zmsg_init(&self.b[i].identity)
        zmsg_copy(&self.b[i].identity, identity)
        self.b[i].nhead = 0
        self.b[i].nbody = 0
        self.b[i].count = 0
        self.n += 1
        self.last = i
        return i

    cdef bint full(self, int i, int nbody) noexcept nogil:
        """Whether batch i cannot take a record with nbody frames: its message would go
        past MAX_BATCH records or MAX_FRAMES frames."""
        return self.b[i].count and (self.b[i].count == MAX_BATCH or self.b[i].nbody + nbody + 3 > MAX_FRAMES)

    cdef int add(self, int i, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil:
        """One record (and copies of its body frames) on batch i; -1 when out of memory."""
        cdef Batch *b = &self.b[i]
        cdef uint8_t *rec
        cdef uint8_t *head
        cdef zmsg *frames
        cdef size_t ncap
        cdef int k
        if b.nhead + REPLY_RECORD_SIZE > b.head_cap:
            ncap = b.head_cap * 2 if b.head_cap else 32 * REPLY_RECORD_SIZE
            head = <uint8_t *>realloc(b.head, ncap)
            if head == NULL:
                return -1
            b.head = head
            b.head_cap = ncap
        if b.nbody + nbody > b.body_cap:
            ncap = max(<size_t>(b.body_cap * 2), <size_t>(b.nbody + nbody), <size_t>32)
            frames = <zmsg *>realloc(b.body, ncap * sizeof(zmsg))
            if frames == NULL:
                return -1
            b.body = frames
            b.body_cap = <int>ncap
        rec = b.head + b.nhead
        memcpy(rec, cid, REQUEST_ID_SIZE)
        rec[16] = <uint8_t>code
        rec[17] = (nbody >> 8) & 0xFF
        rec[18] = nbody & 0xFF
        b.nhead += REPLY_RECORD_SIZE
        for k in range(nbody):
            zmsg_init(&b.body[b.nbody + k])
            zmsg_copy(&b.body[b.nbody + k], &body[k])
        b.nbody += nbody
        b.count += 1
        return 0

    cdef void reset(self, int i) noexcept nogil:
        """Batch i empty (its frames closed), kept for the rest of the turn."""
        close_msgs(self.b[i].body, self.b[i].nbody)
        self.b[i].nbody = 0
        self.b[i].nhead = 0
        self.b[i].count = 0

    cdef void clear(self) noexcept nogil:
        """Every batch gone (the end of a turn, or close()); the buffers are kept."""
        cdef int i
        for i in range(self.n):
            self.reset(i)
            zmsg_close(&self.b[i].identity)
        self.n = 0
        self.last = 0
