# core/worker_sessions.pxi: WorkerSessions, the FBW01 (DEALER) workers the broker knows:
# their Sess slots and free list, the address index, each one's credit, jobs and
# liveness, and the heartbeat timing.
#
# Owns: the Sess slots (struct in _core.pxd) and their envelopes, the AddrIndex and its
# keys, the address key of the worker message being handled (keybuf).
# Touches: the Req fields that link a request into its worker's job list (worker,
# wprev, wnext), IdleWorkers (offer: a worker is idle exactly while it has spare
# credit), and the workers socket (send). Users: WorkerSide, ClientSide (cancel), and
# BrokerCore (gauges, the loop's timing).


cdef class WorkerSessions:
    """DEALER worker sessions by slot; a slot's generation moves on when it is freed."""

    def __cinit__(self, RequestTable table, IdleWorkers idle, Clock clock, workers, double heartbeat, int liveness):
        self.table = table
        self.idle = idle
        self.clock = clock
        self.s_workers = <void *><size_t>workers.underlying
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.free_head = NO_SLOT

    def __dealloc__(self):
        self.release_all()
        free(self.sess)
        free(self.keybuf)

    cdef int set_key(self, zmsg *m, int d) noexcept nogil:
        """Write the length-prefixed routing frames m[0:d] into keybuf/keylen."""
        cdef size_t total = 0, off = 0, sz
        cdef int i
        cdef uint8_t *grown
        for i in range(d):
            total += 4 + zmsg_size(&m[i])
        if total > self.keybuf_cap:
            grown = <uint8_t *>realloc(self.keybuf, total)
            if grown == NULL:
                return -1
            self.keybuf = grown
            self.keybuf_cap = total
        for i in range(d):
            sz = zmsg_size(&m[i])
            self.keybuf[off] = sz & 0xFF
            self.keybuf[off + 1] = (sz >> 8) & 0xFF
            self.keybuf[off + 2] = (sz >> 16) & 0xFF
            self.keybuf[off + 3] = (sz >> 24) & 0xFF
            memcpy(self.keybuf + off + 4, zmsg_data(&m[i]), sz)
            off += 4 + sz
        self.keylen = total
        return 0

    cdef int find(self) noexcept nogil:
        """Session slot of the worker whose key is in keybuf, or -1."""
        cdef int i = aidx_find(&self.index, self.keybuf, self.keylen, hash_bytes(self.keybuf, self.keylen))
        return <int>self.index.ents[i].value if i >= 0 else -1

    cdef inline void touch(self, uint32_t s) noexcept nogil:
        """Worker s was heard from: it lives for `liveness` heartbeats from now."""
        self.sess[s].expiry = self.clock.now + self.heartbeat * self.liveness

    cdef int add(self, zmsg *m, int d) noexcept nogil:
        """Register the worker whose routing frames are m[0:d] (key in keybuf)."""
        cdef uint32_t s, ncap, i
        cdef Sess *grown
        cdef Sess *w
        cdef uint8_t *key
        cdef size_t keylen = self.keylen
        cdef uint64_t h = hash_bytes(self.keybuf, keylen)
        if self.free_head == NO_SLOT:
            ncap = self.cap * 2 if self.cap else 16
            grown = <Sess *>realloc(self.sess, ncap * sizeof(Sess))
            if grown == NULL:
                return -1
            self.sess = grown
            memset(&self.sess[self.cap], 0, (ncap - self.cap) * sizeof(Sess))
            for i in range(self.cap, ncap):
                self.sess[i].next_free = i + 1 if i + 1 < ncap else NO_SLOT
            self.free_head = self.cap
            self.cap = ncap
        key = <uint8_t *>malloc(keylen if keylen else 1)
        if key == NULL:
            return -1
        memcpy(key, self.keybuf, keylen)
        s = self.free_head
        w = &self.sess[s]
        w.env = <zmsg *>malloc((d + 1) * sizeof(zmsg))
        if w.env == NULL or aidx_insert(&self.index, key, keylen, h, s) < 0:
            free(w.env)
            w.env = NULL
            free(key)
            return -1
        self.free_head = w.next_free
        for i in range(<uint32_t>(d + 1)):
            zmsg_init(&w.env[i])
            zmsg_copy(&w.env[i], &m[i])
        w.nenv = d + 1
        w.used = True
        w.key = key
        w.keylen = keylen
        w.hash = h
        w.credit = 0
        w.inflight = 0
        w.ghosts = 0
        w.jobs = NO_SLOT
        w.v2 = False
        w.gone = -1
        w.expiry = self.clock.now + self.heartbeat * self.liveness
        self.count += 1
        if self.count == 1:
            self.next_tick = self.clock.now + self.heartbeat
            self.next_check = w.expiry
        elif w.expiry < self.next_check:
            self.next_check = w.expiry
        return <int>s

    cdef void release(self, uint32_t s) noexcept nogil:
        cdef Sess *w = &self.sess[s]
        cdef int i = aidx_find(&self.index, w.key, w.keylen, w.hash)
        if i >= 0:
            aidx_delete(&self.index, i)  # frees the key
        close_msgs(w.env, w.nenv)
        free(w.env)
        w.env = NULL
        w.key = NULL
        w.nenv = 0
        w.used = False
        w.gen += 1
        w.next_free = self.free_head
        self.free_head = s
        self.count -= 1

    cdef void release_all(self) noexcept nogil:
        """Forget every session at once (closing: their jobs are not touched)."""
        cdef uint32_t s
        for s in range(self.cap):
            if self.sess[s].used:
                close_msgs(self.sess[s].env, self.sess[s].nenv)
                free(self.sess[s].env)
                self.sess[s].used = False
        aidx_free(&self.index)
        self.count = 0

    # -- credit and job lists ---------------------------------------------------

    cdef void offer(self, uint32_t s) noexcept nogil:
        """Keep the worker in the idle FIFO exactly while it has spare credit (and is
        not gone)."""
        cdef Sess *w = &self.sess[s]
        cdef int slot = self.idle.find(w.key, w.keylen)
        cdef uint8_t *key
        if w.inflight < w.credit and w.gone < 0:
            if slot < 0:
                key = <uint8_t *>malloc(w.keylen if w.keylen else 1)
                if key != NULL:
                    memcpy(key, w.key, w.keylen)
                    if self.idle.push_key(key, w.keylen, NULL, 0, <int32_t>s) < 0:
                        free(key)
        elif slot >= 0:
            self.idle.remove_slot(<uint32_t>slot)

    cdef void attach(self, uint32_t rs, uint32_t s) noexcept nogil:
        cdef Req *r = &self.table.reqs[rs]
        cdef Sess *w = &self.sess[s]
        r.worker = <int32_t>s
        r.wprev = NO_SLOT
        r.wnext = w.jobs
        if w.jobs != NO_SLOT:
            self.table.reqs[w.jobs].wprev = rs
        w.jobs = rs
        w.inflight += 1

    cdef void detach(self, uint32_t rs, bint by_worker=True) noexcept nogil:
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
            self.offer(<uint32_t>s)
        else:
            w.ghosts += 1

    cdef void settle_ghost(self, int s) noexcept nogil:
        """Worker s answered or failed a job that had ended without it: free that credit."""
        if s >= 0 and self.sess[s].ghosts:
            self.sess[s].ghosts -= 1
            self.sess[s].inflight -= 1
            self.offer(<uint32_t>s)

    # -- sending ----------------------------------------------------------------

    cdef int send_env(self, zmsg *env, int nenv, int command, bint more, bint v2) noexcept nogil:
        """Send copies of env, the signature (FBW02 if v2) and a command to a worker; the
        body, if any, follows (more=True). Returns 0, 1 if the worker is unreachable, or
        -errno."""
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
        memcpy(zmsg_data(&part), WORKER_SIGNATURE_V2 if v2 else WORKER_SIGNATURE, SIGNATURE_SIZE)
        if zmsg_send(&part, self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
            zmsg_close(&part)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>command
        if zmsg_send(&part, self.s_workers, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
            zmsg_close(&part)
        return 0

    cdef inline int send(self, uint32_t s, int command, bint more) noexcept nogil:
        """send_env to session s, in its protocol."""
        return self.send_env(self.sess[s].env, self.sess[s].nenv, command, more, self.sess[s].v2)
