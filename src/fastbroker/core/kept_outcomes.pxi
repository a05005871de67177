# core/kept_outcomes.pxi: KeptOutcomes, finished FBC01 requests' outcomes, kept for
# RESULT and duplicate SUBMITs, and forgotten past `retention` seconds or when they
# hold more than `retention_bytes`, oldest first.
#
# A FAILED or TIMED_OUT outcome keeps its request's payload too: it is *dead* (the
# dead-letter), listed by DEAD and run again by REQUEUE, which leaves a tombstone
# (gone) in the FIFO: only the front leaves it.
#
# Owns: the Done slots (struct in _core.pxd), their bodies and dead payloads, their
# FIFO, the bytes retained.
# Touches: RequestIds (an id's entry points at its outcome: slot | DONE_BIT; forgetting
# an outcome removes the id), Journal (J_FORGET), Counters (CNT_EXPIRED_RESULTS).
# Users: ClientSide (keep on conclude, replies, DEAD, REQUEUE), BrokerCore (the loop's
# expiry).

cdef enum:
    FORGET_AHEAD = 8  # forget_first prefetches the outcomes this many (and twice as many) ahead


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

    cdef void keep(self, CEnt *e, const uint8_t *cid, int code, zmsg *body, int nbody, zmsg *payload,
                   int npayload, uint32_t attempts, int32_t tries, double timeout, double finished) noexcept nogil:
        """Keep an outcome for RESULT, and a dead one's payload (payload: NULL unless
        the request was given up, FAILED or TIMED_OUT); ids entry e (the id's) then
        points to it."""
        cdef int w
        cdef uint32_t d, ncap
        cdef size_t size = RESULT_OVERHEAD
        cdef Done *grown
        cdef Done *o
        for w in range(nbody):
            size += zmsg_size(&body[w])
        for w in range(npayload):
            size += zmsg_size(&payload[w])
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
        o.payload = NULL
        if nbody:
            o.body = <zmsg *>malloc(nbody * sizeof(zmsg))
        if payload != NULL and npayload:
            o.payload = <zmsg *>malloc(npayload * sizeof(zmsg))
        if (nbody and o.body == NULL) or (payload != NULL and npayload and o.payload == NULL) \
                or ring_push(&self.fifo, d) < 0:
            free(o.body)
            free(o.payload)
            o.body = NULL
            o.payload = NULL
            self.not_kept(e, cid)
            return
        if d == self.free_head:
            self.free_head = o.next_free
        else:
            self.used += 1
        memcpy(o.cid, cid, REQUEST_ID_SIZE)
        o.code = <uint8_t>code
        o.nbody = nbody
        o.npayload = npayload if o.payload != NULL else 0
        o.size = size
        keep_frames(o.body, body, nbody)
        keep_frames(o.payload, payload, o.npayload)
        o.finished = finished
        o.attempts = attempts
        o.tries = tries
        o.timeout = timeout
        o.gone = False
        e.value = d | DONE_BIT
        self.retained_bytes += o.size
        self.count += 1
        if o.payload != NULL:
            self.dead += 1
        while self.retained_bytes > self.retention_bytes:
            self.forget_first()

    cdef void not_kept(self, CEnt *e, const uint8_t *cid) noexcept nogil:
        # Out of memory: the id is unknown again (and so in the store).
        self.ids.remove(e)
        if self.journal.on:
            self.journal.push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void forget_first(self) noexcept nogil:
        """Forget the oldest kept outcome (a requeued one only frees its slot: its id
        belongs to the new request)."""
        cdef uint32_t d = <uint32_t>ring_front(&self.fifo)
        cdef Done *o = &self.done[d]
        cdef CEnt *e
        cdef uint64_t ahead
        # The oldest outcomes were last touched long ago: their Done, their id's slot and
        # their body are cache misses, one after another. Ask for those of the outcomes
        # that go next now (the Done first, its id and body a few calls later, once the
        # Done is in), so that each call finds them in the cache.
        if ring_peek(&self.fifo, 2 * FORGET_AHEAD, &ahead):
            prefetch(&self.done[<uint32_t>ahead])
        if ring_peek(&self.fifo, FORGET_AHEAD, &ahead):
            self.ids.prefetch(self.done[<uint32_t>ahead].cid)
            prefetch(self.done[<uint32_t>ahead].body)
        ring_drop_front(&self.fifo)
        o.next_free = self.free_head
        self.free_head = d
        if o.gone:
            return
        e = self.ids.entry(o.cid)
        if e != NULL:
            self.ids.remove(e)
        self.release_frames(o)
        self.retained_bytes -= o.size
        self.count -= 1
        self.counters.add(CNT_EXPIRED_RESULTS)
        if self.journal.on:
            self.journal.push(J_FORGET, o.cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void release_frames(self, Done *o) noexcept nogil:
        """Free o's body and payload (a dead one is dead no more)."""
        if o.payload != NULL:
            self.dead -= 1
        close_msgs(o.body, o.nbody)
        free(o.body)
        close_msgs(o.payload, o.npayload)
        free(o.payload)
        o.body = NULL
        o.nbody = 0
        o.payload = NULL
        o.npayload = 0

    cdef void withdraw(self, uint32_t d) noexcept nogil:
        """Take dead outcome d out (REQUEUE: its id goes to the new request, which the
        caller made from d's payload, moved out); it stays in the FIFO as a tombstone
        until it reaches the front."""
        cdef Done *o = &self.done[d]
        self.release_frames(o)
        o.gone = True
        self.retained_bytes -= o.size
        self.count -= 1
        if self.journal.on:
            self.journal.push(J_FORGET, o.cid, 0, NULL, 0, 0, 0, 0.0)

    cdef int dead_list(self, uint32_t *found, int limit) noexcept nogil:
        """Up to `limit` dead outcome slots into `found`, oldest first (a scan of the
        FIFO); returns how many."""
        cdef RingBlock *b = self.fifo.head
        cdef size_t i = self.fifo.head_i, k
        cdef uint32_t d
        cdef int n = 0
        if limit <= 0:
            return 0
        for k in range(self.fifo.count):
            if i == RING_BLOCK:
                b = b.next
                i = 0
            d = <uint32_t>b.items[i]
            i += 1
            if self.done[d].payload != NULL and not self.done[d].gone:
                found[n] = d
                n += 1
                if n == limit:
                    break
        return n

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
        # A free slot has no frames (NULL, 0): every slot handed out can be freed.
        for d in range(self.used):
            self.release_frames(&self.done[d])
            self.done[d].next_free = d + 1 if d + 1 < self.used else NO_SLOT
        self.free_head = 0 if self.used else NO_SLOT
        ring_empty(&self.fifo)
        self.retained_bytes = 0
        self.count = 0
        self.dead = 0

    cdef int restore(self, bytes cid, bytes code, body, int attempts, int tries, double age, payload,
                     timeout) except -1:
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first); a
        payload makes a FAILED or TIMED_OUT outcome dead (it is ignored on another)."""
        cdef int i, n, npayload = 0
        cdef zmsg *frames
        cdef const uint8_t *key
        cdef int c
        body = [bytes(f) for f in body]
        if len(cid) != REQUEST_ID_SIZE or code not in (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT,
                                                       protocol.R_CANCELLED):
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        key = <const uint8_t *><const char *>cid
        if self.ids.entry(key) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        c = (<const uint8_t *><const char *>code)[0]
        payload = [bytes(f) for f in payload] if payload and (c == R_FAILED or c == R_TIMED_OUT) else []
        timeout = check_timeout(timeout)
        n = len(body)
        npayload = len(payload)
        frames = <zmsg *>malloc((n + npayload if n + npayload else 1) * sizeof(zmsg))
        if frames == NULL or self.ids.add(key, 0) < 0:
            free(frames)
            raise MemoryError()
        for i, frame in enumerate(body + payload):
            zmsg_init_size(&frames[i], len(frame))
            memcpy(zmsg_data(&frames[i]), <const char *>frame, len(frame))
        self.keep(self.ids.entry(key), key, c, frames, n, &frames[n] if npayload else NULL, npayload,
                  attempts, tries, -1.0 if timeout is None else timeout, monotonic_now() - max(age, 0.0))
        close_msgs(frames, n + npayload)
        free(frames)
        return 0
