# core/kept_outcomes.pxi: KeptOutcomes, finished FBC01 requests' outcomes, kept for
# RESULT and duplicate SUBMITs, and forgotten past `retention` seconds or when they
# hold more than `retention_bytes`, oldest first.
#
# Owns: the Done slots (struct in _core.pxd) and their bodies, their FIFO, the bytes
# retained.
# Touches: RequestIds (an id's entry points at its outcome: slot | DONE_BIT; forgetting
# an outcome removes the id), Journal (J_FORGET), Counters (CNT_EXPIRED_RESULTS).
# Users: ClientSide (keep on conclude, replies), BrokerCore (the loop's expiry).


cdef class KeptOutcomes:
    """Outcome slots grow by realloc alone, set up when first used (a high-water mark,
    `used`, beside the free list), so a million kept outcomes grow without a pause."""

    def __cinit__(self, RequestIds ids, Journal journal, Counters counters, double retention, size_t retention_bytes):
        self.ids = ids
        self.journal = journal
        self.counters = counters
        self.retention = retention
        self.retention_bytes = retention_bytes
        self.free_head = NO_SLOT

    def __dealloc__(self):
        self.release_all()
        free(self.done)
        ring_clear(&self.fifo)

    cdef void keep(self, CEnt *e, const uint8_t *cid, int code, zmsg *body, int nbody,
                   uint32_t attempts, int32_t tries, double finished) noexcept nogil:
        """Keep an outcome for RESULT; ids entry e (the id's) then points to it."""
        cdef int w
        cdef uint32_t d, ncap
        cdef size_t size = RESULT_OVERHEAD, sz
        cdef Done *grown
        cdef Done *o
        for w in range(nbody):
            size += zmsg_size(&body[w])
        if self.retention <= 0 or size > self.retention_bytes:
            # Not kept (too big alone: forgotten at once, the others stay).
            self.ids.remove(e)
            if self.retention > 0:
                self.counters.add(CNT_EXPIRED_RESULTS)
            if self.journal.on:
                self.journal.push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)
            return
        if self.free_head == NO_SLOT and self.used == self.cap:
            # Only realloc, as for requests: slots are set up when first used.
            ncap = self.cap * 2 if self.cap else 64
            grown = <Done *>realloc(self.done, ncap * sizeof(Done))
            if grown == NULL:
                self.not_kept(e, cid)
                return
            self.done = grown
            self.cap = ncap
        d = self.free_head if self.free_head != NO_SLOT else self.used
        o = &self.done[d]
        o.body = NULL
        if nbody:
            o.body = <zmsg *>malloc(nbody * sizeof(zmsg))
        if (nbody and o.body == NULL) or ring_push(&self.fifo, d) < 0:
            free(o.body)
            o.body = NULL
            self.not_kept(e, cid)
            return
        if d == self.free_head:
            self.free_head = o.next_free
        else:
            self.used += 1
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
            self.forget_first()

    cdef void not_kept(self, CEnt *e, const uint8_t *cid) noexcept nogil:
        # Out of memory: the id is unknown again (and so in the store).
        self.ids.remove(e)
        if self.journal.on:
            self.journal.push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void forget_first(self) noexcept nogil:
        cdef uint32_t d = <uint32_t>ring_front(&self.fifo)
        cdef Done *o = &self.done[d]
        cdef CEnt *e = self.ids.entry(o.cid)
        ring_drop_front(&self.fifo)
        if e != NULL:
            self.ids.remove(e)
        close_msgs(o.body, o.nbody)
        free(o.body)
        o.body = NULL
        o.nbody = 0
        self.retained_bytes -= o.size
        o.next_free = self.free_head
        self.free_head = d
        self.counters.add(CNT_EXPIRED_RESULTS)
        if self.journal.on:
            self.journal.push(J_FORGET, o.cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void forget_due(self, double now) noexcept nogil:
        """Forget the outcomes kept `retention` seconds or longer."""
        while self.fifo.count and \
                self.done[<uint32_t>ring_front(&self.fifo)].finished + self.retention <= now:
            self.forget_first()

    cdef inline double first_expiry(self) noexcept nogil:
        """When the oldest kept outcome is due to be forgotten; there must be one."""
        return self.done[<uint32_t>ring_front(&self.fifo)].finished + self.retention

    cdef void release_all(self) noexcept nogil:
        """Free every kept outcome's body (closing; their ids are the caller's to
        clear). The slots and the FIFO's blocks stay until the object goes."""
        cdef uint32_t d
        # A free slot has no body (NULL, 0 frames): every slot handed out can be freed.
        for d in range(self.used):
            close_msgs(self.done[d].body, self.done[d].nbody)
            free(self.done[d].body)
            self.done[d].body = NULL
            self.done[d].nbody = 0
            self.done[d].next_free = d + 1 if d + 1 < self.used else NO_SLOT
        self.free_head = 0 if self.used else NO_SLOT
        ring_empty(&self.fifo)
        self.retained_bytes = 0

    cdef int restore(self, bytes cid, bytes code, body, int attempts, int tries, double age) except -1:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first)."""
        cdef int i, n
        cdef zmsg *frames
        cdef const uint8_t *key
        body = [bytes(f) for f in body]
        if len(cid) != REQUEST_ID_SIZE or code not in (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT,
                                                       protocol.R_CANCELLED):
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        key = <const uint8_t *><const char *>cid
        if self.ids.entry(key) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        n = len(body)
        frames = <zmsg *>malloc((n if n else 1) * sizeof(zmsg))
        if frames == NULL or self.ids.add(key, 0) < 0:
            free(frames)
            raise MemoryError()
        for i, frame in enumerate(body):
            zmsg_init_size(&frames[i], len(frame))
            memcpy(zmsg_data(&frames[i]), <const char *>frame, len(frame))
        self.keep(self.ids.entry(key), key, (<const uint8_t *><const char *>code)[0], frames, n,
                  attempts, tries, monotonic_now() - max(age, 0.0))
        close_msgs(frames, n)
        free(frames)
        return 0
