# core/client_side.pxi: ClientSide, the FBC01 client protocol (docs/PROTOCOL.md
# section 10): SUBMIT, RESULT, STATUS, CANCEL and STATS, the waiters of a request,
# every reply, the end of an FBC01 request (conclude: tell its waiters, keep it), and
# the dead-letter's DEAD, REQUEUE and REQUEUE_ALL.
#
# Owns: no state of its own (the FBC01 index is RequestIds, the outcomes KeptOutcomes).
# Touches: RequestTable (FBC01 requests: waiters, payload, options), RequestIds,
# JobQueue (new requests), KeptOutcomes (keep, read), Journal (changes; replies held
# while it is on), WorkerSessions (CANCEL to the worker running a job, detach),
# DeadlineHeap (cancel), IdleWorkers (read: whether a request will wait), Counters,
# and the requests socket (replies).

cdef bytes STATS_NAMES = ",".join(protocol.stats_fields()).encode("ascii")
cdef const char *STATS_NAMES_TEXT = STATS_NAMES  # the bytes above keep it alive
cdef size_t STATS_NAMES_LEN = len(STATS_NAMES)
cdef bytes _BAD_OPTIONS = protocol.REJECT_REASONS[REJECT_BAD_OPTIONS].encode()
cdef bytes _QUEUE_FULL = protocol.REJECT_REASONS[REJECT_QUEUE_FULL].encode()
cdef const char *BAD_OPTIONS_TEXT = _BAD_OPTIONS  # the bytes above keep it alive
cdef const char *QUEUE_FULL_TEXT = _QUEUE_FULL


cdef class ClientSide:
    """FBC01 messages on the requests endpoint: [identity, FBC01, command, id, ...]."""

    def __cinit__(self, RequestTable table, RequestIds ids, KeptOutcomes kept, Journal journal, JobQueue queue,
                  WorkerSessions sessions, IdleWorkers idle, DeadlineHeap heap, Counters counters, Clock clock,
                  requests):
        self.table = table
        self.ids = ids
        self.kept = kept
        self.journal = journal
        self.queue = queue
        self.sessions = sessions
        self.idle = idle
        self.heap = heap
        self.counters = counters
        self.clock = clock
        self.s_requests = <void *><size_t>requests.underlying
        self.batches = ReplyBatches()

    cdef int on_client(self, zmsg *m, int n) noexcept nogil:
        cdef uint8_t command
        cdef const uint8_t *cid
        cdef CEnt *e
        cdef uint32_t v
        if n < 3 or zmsg_size(&m[2]) != 1:
            self.counters.drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&m[2]))[0]
        if command < C_SUBMIT or command > C_REQUEUE_ALL:
            self.counters.drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if n < 4 or zmsg_size(&m[3]) != REQUEST_ID_SIZE:
            self.counters.drop(DROP_CLIENT_BAD_ID)
            return 0
        cid = <const uint8_t *>zmsg_data(&m[3])
        if command == C_SUBMIT:
            return self.submit(m, n, cid)
        if command == C_DEAD:
            if n != 5 or zmsg_size(&m[4]) != 4:
                self.counters.drop(DROP_CLIENT_BAD_COMMAND)
                return 0
            return self.reply_dead(m, cid, load_u32(<const uint8_t *>zmsg_data(&m[4])))
        if n != 4:
            self.counters.drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if command == C_STATS:
            return self.reply_stats(m, cid)
        if command == C_REQUEUE_ALL:
            return self.requeue_all(m, cid)
        e = self.ids.entry(cid)
        if e == NULL:
            return self.reply(&m[0], R_UNKNOWN, cid, NULL, 0)
        v = e.value
        if command == C_STATUS:
            return self.reply_status(m, cid, v)
        if command == C_REQUEUE:
            return self.requeue(m, cid, v)
        if v & DONE_BIT:
            # RESULT, or CANCEL of a finished request: its outcome.
            return self.reply_outcome(&m[0], v & ~DONE_BIT)
        if command == C_CANCEL:
            return self.cancel(m, v)
        if self.add_waiter(&self.table.reqs[v], &m[0], False) < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        return self.reply_status(m, cid, v)

    cdef int submit(self, zmsg *m, int n, const uint8_t *cid) noexcept nogil:
        """FBC01 SUBMIT: [identity, FBC01, SUBMIT, id, options, payload frames...]."""
        cdef const uint8_t *o
        cdef size_t olen
        cdef uint32_t flags = 0, timeout_ms = 0, tries = 0
        if n < 6:
            self.counters.drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        olen = zmsg_size(&m[4])
        o = <const uint8_t *>zmsg_data(&m[4])
        if olen == OPTIONS_SIZE:
            flags = o[0]
            timeout_ms = load_u32(o + 1)
            tries = load_u32(o + 5)
        elif olen != 0:
            flags = 0xFF  # neither empty nor 9 bytes: bad options
        return self.submit_job(&m[0], False, cid, flags, timeout_ms, tries, &m[5], n - 5)

    cdef int on_batch(self, zmsg *m, int n) noexcept nogil:
        """FBC02 SUBMIT: [identity, FBC02, SUBMIT, header, payload frames...]; the header
        is one SUBMIT_RECORD_SIZE record per request. A header that does not match the
        frames drops the whole message; a request with bad options is REJECTED alone."""
        cdef const uint8_t *h
        cdef size_t hsize
        cdef int count, j, nf, at, total = 0, rc
        if n < 4 or zmsg_size(&m[2]) != 1 or (<const uint8_t *>zmsg_data(&m[2]))[0] != C_SUBMIT:
            self.counters.drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        hsize = zmsg_size(&m[3])
        h = <const uint8_t *>zmsg_data(&m[3])
        count = <int>(hsize // SUBMIT_RECORD_SIZE)
        if hsize == 0 or hsize % SUBMIT_RECORD_SIZE or count > MAX_BATCH:
            self.counters.drop(DROP_CLIENT_BAD_BATCH)
            return 0
        for j in range(count):
            nf = (h[j * SUBMIT_RECORD_SIZE + 25] << 8) | h[j * SUBMIT_RECORD_SIZE + 26]
            if nf == 0:
                self.counters.drop(DROP_CLIENT_BAD_BATCH)
                return 0
            total += nf
        if total != n - 4:
            self.counters.drop(DROP_CLIENT_BAD_BATCH)
            return 0
        # Each submit_job looks its id up, a cache miss in a large table: ask for the ids
        # a few records ahead, so the misses overlap (all at once, most asks were dropped).
        for j in range(min(count, PREFETCH_AHEAD)):
            self.ids.prefetch(h + j * SUBMIT_RECORD_SIZE)
        at = 4
        for j in range(count):
            h = <const uint8_t *>zmsg_data(&m[3]) + j * SUBMIT_RECORD_SIZE
            if j + PREFETCH_AHEAD < count:
                self.ids.prefetch(h + PREFETCH_AHEAD * SUBMIT_RECORD_SIZE)
            nf = (h[25] << 8) | h[26]
            rc = self.submit_job(&m[0], True, h, h[16], load_u32(h + 17), load_u32(h + 21), &m[at], nf)
            if rc < 0:
                return rc
            at += nf
        return 0

    cdef int submit_job(self, zmsg *me, bint v2, const uint8_t *cid, uint32_t flags, uint32_t timeout_ms,
                        uint32_t tries, zmsg *payload, int npayload) noexcept nogil:
        """One request from client `me` (FBC01, or one record of an FBC02 batch): queued,
        or a duplicate, or REJECTED. Its payload frames are moved out when it is queued."""
        cdef uint32_t v
        cdef int i, s, rc = 0
        cdef Req *r
        cdef CEnt *e
        if (flags & ~(<uint32_t>OPT_KNOWN_FLAGS)) or timeout_ms > MAX_REQUEST_TIMEOUT_MS:
            return self.reject(me, v2, cid, REJECT_BAD_OPTIONS, BAD_OPTIONS_TEXT)
        e = self.ids.entry(cid)
        if e != NULL:
            # The same id again: it runs once; this sender is told the outcome too.
            self.counters.add(CNT_DUPLICATES)
            v = e.value
            if not v & DONE_BIT and self.add_waiter(&self.table.reqs[v], me, v2) < 0:
                self.counters.drop(DROP_OUT_OF_MEMORY)
                return 0
            if not flags & OPT_NO_ACK:
                rc = self.to_client(me, v2, R_ACCEPTED, cid, NULL, 0)
            if rc >= 0 and v & DONE_BIT:
                rc = self.to_client(me, v2, self.kept.done[v & ~DONE_BIT].code, cid,
                                    self.kept.done[v & ~DONE_BIT].body, self.kept.done[v & ~DONE_BIT].nbody)
            return rc
        if self.queue.full():
            return self.reject(me, v2, cid, REJECT_QUEUE_FULL, QUEUE_FULL_TEXT)
        s = self.table.alloc()
        if s < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # Frames kept: the sender's identity (its first waiter), then the payload.
        r.frames = <zmsg *>malloc((npayload + 1) * sizeof(zmsg))
        if r.frames == NULL:
            self.table.release(s)
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        if self.queue.push(<uint32_t>s) < 0 or self.ids.add(cid, <uint32_t>s) < 0:
            self.table.release(s)  # a ring entry already pushed turns into a tombstone
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        zmsg_init(&r.frames[0])
        zmsg_copy(&r.frames[0], me)
        for i in range(npayload):
            zmsg_init(&r.frames[i + 1])
            zmsg_move(&r.frames[i + 1], &payload[i])
        r.nframes = npayload + 1
        r.nenv = 1
        r.v2_waiters = 1 if v2 else 0
        if self.queue.count or not self.idle.live:
            own_small_frames(&r.frames[1], npayload)
        r.client = True
        memcpy(r.cid, cid, REQUEST_ID_SIZE)
        if tries == 0:
            r.tries_left = self.queue.tries
        else:
            r.tries_left = <int32_t>(tries if tries < MAX_REQUEST_TRIES else MAX_REQUEST_TRIES)
        r.tries = r.tries_left
        r.timeout = self.queue.timeout if timeout_ms == 0 else timeout_ms / 1000.0
        r.arrived = self.clock.now
        self.queue.count += 1
        self.counters.add(CNT_REQUESTS)
        if self.journal.on:
            self.journal.push(J_SUBMIT, cid, 0, &r.frames[1], r.nframes - 1, 0, r.tries, r.timeout)
        if not flags & OPT_NO_ACK:
            return self.to_client(me, v2, R_ACCEPTED, cid, NULL, 0)
        return 0

    cdef int reject(self, zmsg *me, bint v2, const uint8_t *cid, int reason, const char *text) noexcept nogil:
        cdef zmsg extra[2]
        cdef size_t n = strlen(text)
        cdef int rc
        self.counters.add(CNT_REJECTED)
        zmsg_init_size(&extra[0], 1)
        (<uint8_t *>zmsg_data(&extra[0]))[0] = <uint8_t>reason
        zmsg_init_size(&extra[1], n)
        memcpy(zmsg_data(&extra[1]), text, n)
        rc = self.to_client(me, v2, R_REJECTED, cid, extra, 2)
        close_msgs(extra, 2)
        return rc

    # -- waiters ----------------------------------------------------------------

    cdef bint is_waiter(self, Req *r, zmsg *me) noexcept nogil:
        """Whether the client `me` (an identity frame) is one of r's waiters."""
        cdef int i
        for i in range(r.nenv):
            if same_frame(&r.frames[i], me):
                return True
        return False

    cdef int add_waiter(self, Req *r, zmsg *me, bint v2) noexcept nogil:
        """Make the client `me` (the current message's sender, speaking FBC02 if v2) one
        of r's waiters. One that is already keeps the protocol it had."""
        cdef int i
        cdef zmsg *grown
        if self.is_waiter(r, me):
            return 0
        if r.nenv == MAX_WAITERS:
            # Full: the oldest waiter gives way.
            for i in range(1, r.nenv):
                zmsg_move(&r.frames[i - 1], &r.frames[i])
            zmsg_copy(&r.frames[r.nenv - 1], me)
            r.v2_waiters = (r.v2_waiters >> 1) | ((1 << (r.nenv - 1)) if v2 else 0)
            return 0
        grown = <zmsg *>realloc(r.frames, (r.nframes + 1) * sizeof(zmsg))
        if grown == NULL:
            return -1
        r.frames = grown
        # Shift the payload up one place to make room after the waiters.
        zmsg_init(&r.frames[r.nframes])
        i = r.nframes
        while i > r.nenv:
            zmsg_move(&r.frames[i], &r.frames[i - 1])
            i -= 1
        zmsg_copy(&r.frames[r.nenv], me)
        if v2:
            r.v2_waiters |= 1 << r.nenv
        r.nenv += 1
        r.nframes += 1
        return 0

    # -- replies ----------------------------------------------------------------

    cdef int reply(self, zmsg *identity, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil:
        """Send [identity, FBC01, code, cid, body...] to a client; every frame is a
        copy (shared buffer). A client that is gone or not reading loses it."""
        cdef zmsg part
        cdef int i, rc
        zmsg_init(&part)
        zmsg_copy(&part, identity)
        rc = self.emit(&part, True)
        if rc != 0:
            return rc if rc < 0 else 0
        zmsg_init_size(&part, SIGNATURE_SIZE)
        memcpy(zmsg_data(&part), CLIENT_SIGNATURE, SIGNATURE_SIZE)
        self.emit(&part, True)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>code
        self.emit(&part, True)
        zmsg_init_size(&part, REQUEST_ID_SIZE)
        memcpy(zmsg_data(&part), cid, REQUEST_ID_SIZE)
        self.emit(&part, nbody > 0)
        for i in range(nbody):
            zmsg_init(&part)
            zmsg_copy(&part, &body[i])
            self.emit(&part, i + 1 < nbody)
        return 0

    cdef int emit(self, zmsg *part, bint more) noexcept nogil:
        """Send one part of a reply to a client, or, with the journal on, hold it
        until release_held(). Returns 0, 1 if it could not go (peer gone, HWM: only
        the first part, the identity, can fail so; counted), or -errno; the part is
        consumed either way."""
        cdef int e
        if not self.journal.on:
            if zmsg_send(part, self.s_requests, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(part)
                return self.counters.reply_lost(e)
            return 0
        return self.journal.hold(part, more)

    cdef int to_client(self, zmsg *identity, bint v2, int code, const uint8_t *cid, zmsg *body,
                       int nbody) noexcept nogil:
        """A reply about request cid to a client: an FBC01 message now, or a record of
        this turn's REPLIES batch to an FBC02 client (sent by flush_batches)."""
        cdef int i, rc
        if not v2:
            return self.reply(identity, code, cid, body, nbody)
        i = self.batches.find(identity)
        if i < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        if self.batches.full(i, nbody):
            rc = self.flush_batch(i)
            if rc < 0:
                return rc
        if self.batches.add(i, code, cid, body, nbody) < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
        return 0

    cdef int flush_batch(self, int i) noexcept nogil:
        """Send batch i as [identity, FBC02, REPLIES, header, body frames...] and empty it."""
        cdef Batch *b = &self.batches.b[i]
        cdef zmsg part
        cdef int k, rc
        if not b.count:
            return 0
        zmsg_init(&part)
        zmsg_copy(&part, &b.identity)
        rc = self.emit(&part, True)
        if rc == 0:
            zmsg_init_size(&part, SIGNATURE_SIZE)
            memcpy(zmsg_data(&part), CLIENT_SIGNATURE_V2, SIGNATURE_SIZE)
            self.emit(&part, True)
            zmsg_init_size(&part, 1)
            (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>R_REPLIES
            self.emit(&part, True)
            zmsg_init_size(&part, b.nhead)
            memcpy(zmsg_data(&part), b.head, b.nhead)
            self.emit(&part, b.nbody > 0)
            for k in range(b.nbody):
                self.emit(&b.body[k], k + 1 < b.nbody)  # consumed: empty now
            b.nbody = 0
        self.batches.reset(i)
        return rc if rc < 0 else 0

    cdef int flush_batches(self) noexcept nogil:
        """Send every FBC02 client its replies of this turn (called at the start of each
        loop turn, so no reply waits longer than the turn that made it)."""
        cdef int i, rc, result = 0
        for i in range(self.batches.n):
            rc = self.flush_batch(i)
            if rc < 0:
                result = rc
        self.batches.clear()
        return result

    cdef int reply_outcome(self, zmsg *identity, uint32_t d) noexcept nogil:
        cdef Done *o = &self.kept.done[d]
        return self.reply(identity, o.code, o.cid, o.body, o.nbody)

    cdef int reply_stats(self, zmsg *m, const uint8_t *cid) noexcept nogil:
        cdef uint64_t v[N_STATS]
        cdef uint64_t count = 0
        cdef zmsg body[2]
        cdef uint8_t *p
        cdef int i, k, rc
        for i in range(N_COUNTERS):
            v[i] = self.counters.counts[i]
        v[N_COUNTERS] = self.queue.count
        v[N_COUNTERS + 1] = self.table.count - self.queue.count
        v[N_COUNTERS + 2] = self.idle.live
        v[N_COUNTERS + 3] = self.sessions.count
        v[N_COUNTERS + 4] = self.kept.count
        v[N_COUNTERS + 5] = self.kept.retained_bytes
        v[N_COUNTERS + 6] = self.kept.dead
        for i in range(N_LATENCY):
            v[N_COUNTERS + N_GAUGES + i] = self.counters.latency_counts[i]
            count += self.counters.latency_counts[i]
        v[N_STATS - 2] = count
        v[N_STATS - 1] = <uint64_t>(self.counters.latency_sum * 1e6)
        zmsg_init_size(&body[0], STATS_NAMES_LEN)
        memcpy(zmsg_data(&body[0]), STATS_NAMES_TEXT, STATS_NAMES_LEN)
        zmsg_init_size(&body[1], 8 * N_STATS)
        p = <uint8_t *>zmsg_data(&body[1])
        for i in range(N_STATS):
            for k in range(8):
                p[8 * i + k] = (v[i] >> (56 - 8 * k)) & 0xFF
        rc = self.reply(&m[0], R_STATS, cid, body, 2)
        close_msgs(body, 2)
        return rc

    cdef int reply_status(self, zmsg *m, const uint8_t *cid, uint32_t v) noexcept nogil:
        cdef zmsg body[3]
        cdef uint32_t attempts, tries
        cdef int state, rc, i
        if v & DONE_BIT:
            state = STATE_DONE
            attempts = self.kept.done[v & ~DONE_BIT].attempts
            tries = <uint32_t>max(self.kept.done[v & ~DONE_BIT].tries, 0)
        else:
            state = STATE_QUEUED if self.table.reqs[v].state == QUEUED else STATE_RUNNING
            attempts = self.table.reqs[v].attempts
            tries = <uint32_t>max(self.table.reqs[v].tries, 0)
        zmsg_init_size(&body[0], 1)
        (<uint8_t *>zmsg_data(&body[0]))[0] = <uint8_t>state
        zmsg_init_size(&body[1], 4)
        zmsg_init_size(&body[2], 4)
        for i in range(4):
            (<uint8_t *>zmsg_data(&body[1]))[i] = (attempts >> (24 - 8 * i)) & 0xFF
            (<uint8_t *>zmsg_data(&body[2]))[i] = (tries >> (24 - 8 * i)) & 0xFF
        rc = self.reply(&m[0], R_STATUS, cid, body, 3)
        close_msgs(body, 3)
        return rc

    # -- the end of an FBC01 request ----------------------------------------------

    cdef int cancel(self, zmsg *m, uint32_t rs) noexcept nogil:
        """The client (m[0]) cancelled request rs."""
        cdef Req *r = &self.table.reqs[rs]
        cdef zmsg part
        cdef int rc
        if r.state == QUEUED:
            # Its queue entry turns into a tombstone when the slot is released.
            self.queue.count -= 1
        else:
            self.heap.delete(rs)
            if r.worker >= 0:
                # Tell its FBW01 worker, which may abandon the job; the credit stays
                # taken (a ghost) until the worker answers or fails it.
                rc = self.sessions.send(<uint32_t>r.worker, CMD_CANCEL, True)
                if rc < 0:
                    return rc
                if rc == 0:
                    zmsg_init_size(&part, TASK_ID_SIZE)
                    self.table.write_id(rs, <uint8_t *>zmsg_data(&part))
                    if zmsg_send(&part, self.sessions.s_workers, ZDONTWAIT) < 0:
                        zmsg_close(&part)
            self.sessions.detach(rs, False)
        self.counters.add(CNT_CANCELLED)
        rc = self.conclude(r, R_CANCELLED, NULL, 0)
        # Not made a waiter: on a full list it would push out a submitter.
        if rc >= 0 and not self.is_waiter(r, &m[0]):
            rc = self.reply(&m[0], R_CANCELLED, r.cid, NULL, 0)
        self.table.release(rs)
        return rc

    cdef int conclude(self, Req *r, int code, zmsg *body, int nbody) noexcept nogil:
        """Tell every waiter of a finished FBC01 request its outcome, and keep the
        outcome for RESULT (the caller releases the request)."""
        cdef int w, rc, result = 0, npayload
        cdef CEnt *e
        cdef zmsg *payload
        for w in range(r.nenv):
            rc = self.to_client(&r.frames[w], r.v2_waiters & (1 << w), code, r.cid, body, nbody)
            if rc < 0:
                result = rc
        e = self.ids.entry(r.cid)
        if e == NULL:
            return result
        # A request given up keeps its payload: dead, until REQUEUE or retention.
        payload = &r.frames[r.nenv] if code == R_FAILED or code == R_TIMED_OUT else NULL
        npayload = r.nframes - r.nenv if payload != NULL else 0
        if self.journal.on:
            self.journal.push_finish(r.cid, code, body, nbody, payload, npayload, r.attempts, r.tries, r.timeout)
        self.kept.keep(e, r.cid, code, body, nbody, payload, npayload, r.attempts, r.tries, r.timeout,
                       self.clock.now)
        return result

    # -- the dead-letter ----------------------------------------------------------

    cdef int reply_dead(self, zmsg *m, const uint8_t *cid, uint32_t limit) noexcept nogil:
        """DEAD: how many dead requests are kept, and the oldest `limit` of them (at
        most MAX_DEAD_LIST): a record each, then its error's type and message."""
        cdef uint32_t found[MAX_DEAD_LIST]
        cdef int count, k, w, rc
        cdef zmsg *body
        cdef uint8_t *rec
        cdef Done *o
        cdef size_t size
        cdef double age
        count = self.kept.dead_list(found, <int>min(limit, <uint32_t>MAX_DEAD_LIST))
        body = <zmsg *>malloc((2 + 2 * count) * sizeof(zmsg))
        if body == NULL:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        zmsg_init_size(&body[0], 4)
        store_u32(<uint8_t *>zmsg_data(&body[0]), self.kept.dead)
        if zmsg_init_size(&body[1], <size_t>count * DEAD_RECORD_SIZE) < 0:
            zmsg_close(&body[0])
            free(body)
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        for k in range(count):
            o = &self.kept.done[found[k]]
            rec = <uint8_t *>zmsg_data(&body[1]) + k * DEAD_RECORD_SIZE
            memcpy(rec, o.cid, REQUEST_ID_SIZE)
            rec[16] = o.code
            store_u32(rec + 17, o.attempts)
            store_u32(rec + 21, <uint32_t>max(o.tries, 0))
            age = (self.clock.now - o.finished) * 1000.0
            store_u32(rec + 25, <uint32_t>min(max(age, 0.0), 4294967295.0))
            size = 0
            for w in range(o.npayload):
                size += zmsg_size(&o.payload[w])
            store_u32(rec + 29, <uint32_t>min(size, <size_t>0xFFFFFFFF))
            rec[33] = (o.npayload >> 8) & 0xFF
            rec[34] = o.npayload & 0xFF
            for w in range(2):
                zmsg_init(&body[2 + 2 * k + w])
                if o.code == R_FAILED and w < o.nbody:
                    zmsg_copy(&body[2 + 2 * k + w], &o.body[w])
        rc = self.reply(&m[0], R_DEAD, cid, body, 2 + 2 * count)
        close_msgs(body, 2 + 2 * count)
        free(body)
        return rc

    cdef int requeue(self, zmsg *m, const uint8_t *cid, uint32_t v) noexcept nogil:
        """REQUEUE of a known id (entry value v): REQUEUED if it was dead and is queued
        again, REJECTED if the queue is full, else its STATUS (it is not dead)."""
        cdef int rc
        if not v & DONE_BIT or self.kept.done[v & ~DONE_BIT].payload == NULL:
            return self.reply_status(m, cid, v)
        if self.queue.full():
            return self.reject(&m[0], False, cid, REJECT_QUEUE_FULL, QUEUE_FULL_TEXT)
        rc = self.requeue_dead(self.ids.entry(cid), v & ~DONE_BIT)
        if rc > 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        return self.reply_requeued(m, cid, 1)

    cdef int requeue_all(self, zmsg *m, const uint8_t *cid) noexcept nogil:
        """REQUEUE_ALL: every dead request queued again, oldest first, while the
        queue has room; REQUEUED says how many, and how many are still dead."""
        cdef uint32_t *found
        cdef uint32_t done = 0
        cdef int count, k
        cdef Done *o
        found = <uint32_t *>malloc((self.kept.dead + 1) * sizeof(uint32_t))
        if found == NULL:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        count = self.kept.dead_list(found, <int>self.kept.dead)
        for k in range(count):
            if self.queue.full():
                break
            o = &self.kept.done[found[k]]
            if self.requeue_dead(self.ids.entry(o.cid), found[k]) != 0:
                break
            done += 1
        free(found)
        return self.reply_requeued(m, cid, done)

    cdef int reply_requeued(self, zmsg *m, const uint8_t *cid, uint32_t count) noexcept nogil:
        cdef zmsg body[2]
        cdef int rc
        zmsg_init_size(&body[0], 4)
        store_u32(<uint8_t *>zmsg_data(&body[0]), count)
        zmsg_init_size(&body[1], 4)
        store_u32(<uint8_t *>zmsg_data(&body[1]), self.kept.dead)
        rc = self.reply(&m[0], R_REQUEUED, cid, body, 2)
        close_msgs(body, 2)
        return rc

    cdef int requeue_dead(self, CEnt *e, uint32_t d) noexcept nogil:
        """Queue dead outcome d (its id's entry e) again, behind those queued, as new:
        every try anew, no waiters (a client sends RESULT for its outcome). Returns 0,
        or 1 when out of memory (it stays dead)."""
        cdef Done *o = &self.kept.done[d]
        cdef Req *r
        cdef int s, i
        s = self.table.alloc()
        if s < 0:
            return 1
        r = &self.table.reqs[s]
        r.frames = <zmsg *>malloc(o.npayload * sizeof(zmsg))
        if r.frames == NULL or self.queue.push(<uint32_t>s) < 0:
            self.table.release(s)  # a ring entry already pushed turns into a tombstone
            return 1
        for i in range(o.npayload):
            zmsg_init(&r.frames[i])
            zmsg_move(&r.frames[i], &o.payload[i])
        r.nframes = <uint16_t>o.npayload
        r.nenv = 0
        r.client = True
        memcpy(r.cid, o.cid, REQUEST_ID_SIZE)
        r.tries_left = o.tries if o.tries != 0 else self.queue.tries
        r.tries = r.tries_left
        r.attempts = 0
        r.timeout = o.timeout
        r.arrived = self.clock.now
        self.kept.withdraw(d)  # the payload frames it closes are empty now
        e.value = <uint32_t>s
        self.queue.count += 1
        self.counters.add(CNT_DEAD_REQUEUED)
        if self.journal.on:
            self.journal.push(J_SUBMIT, r.cid, 0, r.frames, r.nframes, 0, r.tries, r.timeout)
        return 0

    # -- the durable store ------------------------------------------------------

    cdef int restore(self, bytes cid, payload, timeout, int tries, int attempts) except -1:
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        cdef int s, i
        cdef Req *r
        cdef int32_t tries_left
        cdef const uint8_t *key
        payload = [bytes(f) for f in payload]
        if len(cid) != REQUEST_ID_SIZE or not payload:
            raise ValueError("a request needs a 16-byte id and a payload")
        key = <const uint8_t *><const char *>cid
        if self.ids.entry(key) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        tries_left = -1 if tries < 0 else max(tries - attempts, 0)
        if tries_left == 0:
            raise ValueError(f"request {cid.hex()} has no tries left")
        timeout = check_timeout(timeout)
        s = self.table.alloc()
        if s < 0:
            raise MemoryError()
        r = &self.table.reqs[s]
        r.frames = <zmsg *>malloc(len(payload) * sizeof(zmsg))
        if r.frames == NULL or self.queue.push(<uint32_t>s) < 0:
            self.table.release(s)
            raise MemoryError()
        if self.ids.add(key, <uint32_t>s) < 0:
            self.table.release(s)
            raise MemoryError()
        for i, frame in enumerate(payload):
            zmsg_init_size(&r.frames[i], len(frame))
            memcpy(zmsg_data(&r.frames[i]), <const char *>frame, len(frame))
        r.nframes = len(payload)
        r.nenv = 0
        r.client = True
        memcpy(r.cid, key, REQUEST_ID_SIZE)
        r.tries_left = tries_left
        r.tries = tries
        r.attempts = attempts
        r.timeout = -1.0 if timeout is None else timeout
        r.arrived = monotonic_now()
        self.queue.count += 1
        return 0
