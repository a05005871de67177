# core/idle_workers.pxi: IdleWorkers, the FIFO of workers ready for a job, with O(1)
# removal by address.
#
# Owns: its Wk slots (struct in _core.pxd), their envelope frames, its ring and its
# AddrIndex (keys).
# Touches: nothing else. Users: WorkerSessions.offer (FBW01 workers with spare credit),
# WorkerSide (REQ workers' "ready", dispatch), ClientSide (whether any is idle).


cdef class IdleWorkers:
    """Workers that asked for a job, oldest first.

    A worker is known by its address (the routing frames before the delimiter);
    a second "ready" from the same address replaces its first one in O(1).
    """

    def __cinit__(self):
        self.free_head = NO_SLOT

    def __dealloc__(self):
        self.clear()

    cdef void clear(self) noexcept nogil:
        """Forget every worker and free all memory (as a new IdleWorkers)."""
        cdef uint32_t i
        for i in range(self.cap):
            if self.slots[i].used:
                close_msgs(self.slots[i].env, self.slots[i].nenv)
                free(self.slots[i].env)
        free(self.slots)
        self.slots = NULL
        self.cap = 0
        self.free_head = NO_SLOT
        self.live = 0
        ring_clear(&self.ring)
        aidx_free(&self.index)

    cdef int alloc(self) noexcept nogil:
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
        s = self.alloc()
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
