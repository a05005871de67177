# core/worker_side.pxi: WorkerSide, the workers endpoint: an original REQ worker's
# "ready" and the FBW01 commands (READY with credit, ANSWER, FAILED, HEARTBEAT,
# DISCONNECT, EXTEND, RETURN), the workers' liveness (tick: heartbeats out, silent ones forgotten),
# and dispatch, which sends queued jobs to idle workers.
#
# Owns: no state of its own (sessions are WorkerSessions', idle workers IdleWorkers').
# Touches: WorkerSessions, IdleWorkers, RequestTable (FAILED's text, attempts),
# DeadlineHeap (attempt deadlines), JobQueue (dispatch takes from it), Attempts (an
# answer; an attempt ended without one), Journal (J_START), Counters, Events, and the
# workers socket (TASK).


cdef class WorkerSide:
    """Messages on the workers endpoint: [routing frames..., b"", body...]."""

    def __cinit__(self, WorkerSessions sessions, IdleWorkers idle, RequestTable table, DeadlineHeap heap,
                  JobQueue queue, Attempts attempts, Journal journal, Counters counters, Events events, workers,
                  double max_extend):
        self.sessions = sessions
        self.idle = idle
        self.table = table
        self.heap = heap
        self.queue = queue
        self.attempts = attempts
        self.journal = journal
        self.counters = counters
        self.events = events
        self.s_workers = <void *><size_t>workers.underlying
        self.max_extend = max_extend

    cdef int on_ready(self, zmsg *m, int n) noexcept nogil:
        """A message on the workers endpoint: an original REQ worker's ready, or FBW01."""
        cdef int d = find_delimiter(m, n)
        cdef int nb, s, rc
        cdef uint8_t command
        cdef bint v2
        if d < 1:
            self.counters.drop(DROP_READY_NO_DELIMITER)
            return 0
        nb = n - d - 1
        if nb == 1:
            if self.idle.push_env(m, d + 1) < 0:
                self.counters.drop(DROP_OUT_OF_MEMORY)
                return 0
            self.counters.add(CNT_READY)
            return 0
        if nb == 0 or zmsg_size(&m[d + 1]) != SIGNATURE_SIZE:
            self.counters.drop(DROP_READY_BAD_FRAMES)
            return 0
        v2 = memcmp(zmsg_data(&m[d + 1]), WORKER_SIGNATURE_V2, SIGNATURE_SIZE) == 0
        if not v2 and memcmp(zmsg_data(&m[d + 1]), WORKER_SIGNATURE, SIGNATURE_SIZE) != 0:
            self.counters.drop(DROP_READY_BAD_FRAMES)
            return 0
        if zmsg_size(&m[d + 2]) != 1:
            self.counters.drop(DROP_WORKER_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&m[d + 2]))[0]
        if command < CMD_READY or command > CMD_RETURN or command == CMD_TASK or command == CMD_CANCEL:
            self.counters.drop(DROP_WORKER_BAD_COMMAND)
            return 0
        if self.sessions.set_key(m, d) < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        s = self.sessions.find()
        if s >= 0:
            self.sessions.touch(<uint32_t>s)
        if command == CMD_READY:
            return self.worker_ready(m, s, d, nb, v2)
        if command == CMD_ANSWER and v2:
            return self.worker_answers(m, s, d, nb)
        if command == CMD_ANSWER:
            if nb < 4:
                self.counters.drop(DROP_WORKER_BAD_FRAMES)
                return 0
            # Accepted even from a worker the broker has forgotten: the job may
            # still be waiting for it. That worker is told to register again.
            rc = self.attempts.answer(&m[d + 3], &m[d + 4], nb - 3, s)
            if s < 0 and rc >= 0:
                rc = self.sessions.send_env(m, d + 1, CMD_DISCONNECT, False, False)
            return rc if rc < 0 else 0
        if command == CMD_EXTEND:
            return self.worker_extend(m, s, d, nb, v2)
        if command == CMD_RETURN:
            return self.worker_return(m, s, d, nb, v2)
        if nb != (5 if command == CMD_FAILED else 2):
            self.counters.drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if command == CMD_DISCONNECT:
            if s >= 0:
                self.counters.add(CNT_WORKERS_LEFT)
                self.worker_event(EV_WORKER_LEFT, <uint32_t>s)
                return self.forget(<uint32_t>s)
            return 0
        if s < 0:
            # HEARTBEAT or FAILED from a worker this broker does not know (it was
            # restarted, or took the worker for dead): make it register again.
            rc = self.sessions.send_env(m, d + 1, CMD_DISCONNECT, False, v2)
            if rc < 0:
                return rc
        if command == CMD_FAILED:
            return self.worker_failed(m, s, d)
        return 0

    cdef int worker_ready(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil:
        """READY(credit) from the worker at m[0:d] (session s, or -1: a new one); the
        worker speaks the protocol of its last READY (v2: FBW02)."""
        cdef const uint8_t *c
        cdef uint32_t credit
        if nb != 3 or zmsg_size(&m[d + 3]) != 4:
            self.counters.drop(DROP_WORKER_BAD_FRAMES)
            return 0
        c = <const uint8_t *>zmsg_data(&m[d + 3])
        credit = (<uint32_t>c[0] << 24) | (<uint32_t>c[1] << 16) | (<uint32_t>c[2] << 8) | c[3]
        if credit > MAX_CREDIT:
            self.counters.drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if s < 0:
            s = self.sessions.add(m, d)
            if s < 0:
                self.counters.drop(DROP_OUT_OF_MEMORY)
                return 0
            self.counters.add(CNT_WORKERS_JOINED)
            self.worker_event(EV_WORKER_JOINED, <uint32_t>s)
        self.sessions.sess[s].credit = credit
        self.sessions.sess[s].v2 = v2
        self.counters.add(CNT_READY)
        self.sessions.offer(<uint32_t>s)
        return 0

    cdef int worker_failed(self, zmsg *m, int s, int d) noexcept nogil:
        """FAILED(task id, exception type, message) from the worker at m[0:d]."""
        if zmsg_size(&m[d + 3]) != TASK_ID_SIZE:
            self.counters.drop(DROP_ANSWER_BAD_ID)
            return 0
        return self.fail_attempt(<const uint8_t *>zmsg_data(&m[d + 3]), s, &m[d + 4])

    cdef int fail_attempt(self, const uint8_t *tid, int s, zmsg *text) noexcept nogil:
        """Worker s reports the job `tid` failed; text: [exception type, message] (moved)."""
        cdef int rs
        cdef Req *r
        rs = self.table.find(tid, TASK_ID_SIZE)
        if rs < 0 or s < 0 or self.table.reqs[rs].worker != s:
            # Not the attempt in progress (answered, timed out, or another worker's).
            self.counters.drop(DROP_ANSWER_UNKNOWN)
            self.sessions.settle_ghost(s)
            return 0
        self.counters.add(CNT_FAILED)
        self.heap.delete(<uint32_t>rs)
        self.sessions.detach(<uint32_t>rs)
        r = &self.table.reqs[rs]
        r.failed_on = s
        r.failed_on_gen = self.sessions.sess[s].gen
        if r.client:
            if r.fail == NULL:
                r.fail = <zmsg *>malloc(2 * sizeof(zmsg))
                if r.fail != NULL:
                    zmsg_init(&r.fail[0])
                    zmsg_init(&r.fail[1])
            # Without memory for the text, the outcome is still FAILED-less: TIMED_OUT.
            if r.fail != NULL:
                zmsg_move(&r.fail[0], &text[0])
                zmsg_move(&r.fail[1], &text[1])
        return self.attempts.retry_or_abort(<uint32_t>rs)

    cdef int worker_answers(self, zmsg *m, int s, int d, int nb) noexcept nogil:
        """FBW02 ANSWER [header, frames...]: one ANSWER_RECORD_SIZE record per outcome.
        A header that does not match the frames drops the whole message; a record with
        an unknown outcome or the wrong frames is dropped alone."""
        cdef const uint8_t *h
        cdef size_t hsize
        cdef int count, j, nf, at, total = 0, rc = 0
        if nb < 3:
            self.counters.drop(DROP_WORKER_BAD_BATCH)
            return 0
        hsize = zmsg_size(&m[d + 3])
        count = <int>(hsize // ANSWER_RECORD_SIZE)
        if hsize == 0 or hsize % ANSWER_RECORD_SIZE or count > MAX_BATCH:
            self.counters.drop(DROP_WORKER_BAD_BATCH)
            return 0
        h = <const uint8_t *>zmsg_data(&m[d + 3])
        for j in range(count):
            total += (h[j * ANSWER_RECORD_SIZE + 17] << 8) | h[j * ANSWER_RECORD_SIZE + 18]
        if total != nb - 3:
            self.counters.drop(DROP_WORKER_BAD_BATCH)
            return 0
        # Each answer looks its request's id up (to keep its outcome), a cache miss in a
        # large table: ask for the ids of the records a few ahead, so the misses overlap.
        for j in range(min(count, PREFETCH_AHEAD)):
            self.attempts.prefetch_answer(h + j * ANSWER_RECORD_SIZE)
        at = d + 4
        for j in range(count):
            h = <const uint8_t *>zmsg_data(&m[d + 3]) + j * ANSWER_RECORD_SIZE
            if j + PREFETCH_AHEAD < count:
                self.attempts.prefetch_answer(h + PREFETCH_AHEAD * ANSWER_RECORD_SIZE)
            nf = (h[17] << 8) | h[18]
            if h[16] == R_OK and nf >= 1:
                # Accepted even from a worker the broker has forgotten, as FBW01's ANSWER.
                rc = self.attempts.answer_id(h, &m[at], nf, s)
            elif h[16] == R_FAILED and nf == 2:
                rc = self.fail_attempt(h, s, &m[at])
            else:
                self.counters.drop(DROP_WORKER_BAD_FRAMES)
            if rc < 0:
                return rc
            at += nf
        if s < 0:
            rc = self.sessions.send_env(m, d + 1, CMD_DISCONNECT, False, True)
        return rc if rc < 0 else 0

    cdef int worker_extend(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil:
        """EXTEND(task id, ms): the job is alive; its attempt's deadline becomes now plus
        ms, at most max_extend (an attempt without a deadline keeps none)."""
        cdef int rs, rc
        cdef Req *r
        cdef double seconds
        if nb != 4 or zmsg_size(&m[d + 3]) != TASK_ID_SIZE or zmsg_size(&m[d + 4]) != 4:
            self.counters.drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if s < 0:
            # From a worker this broker does not know: it must register again.
            self.counters.drop(DROP_ANSWER_UNKNOWN)
            rc = self.sessions.send_env(m, d + 1, CMD_DISCONNECT, False, v2)
            return rc if rc < 0 else 0
        rs = self.table.find(<const uint8_t *>zmsg_data(&m[d + 3]), TASK_ID_SIZE)
        if rs < 0 or self.table.reqs[rs].worker != s:
            # Not the attempt in progress here (answered, timed out, or another worker's).
            self.counters.drop(DROP_ANSWER_UNKNOWN)
            return 0
        self.counters.add(CNT_EXTENDED)
        r = &self.table.reqs[rs]
        if r.timeout >= 0:
            seconds = load_u32(<const uint8_t *>zmsg_data(&m[d + 4])) / 1000.0
            self.heap.insert(<uint32_t>rs, self.sessions.clock.now + min(seconds, self.max_extend))
        return 0

    cdef int worker_return(self, zmsg *m, int s, int d, int nb, bint v2) noexcept nogil:
        """RETURN [task id...]: jobs the worker got beyond its credit (two of its brokers
        sent at once) go back to the front of the queue without counting a try, and the
        worker gets nothing more until its next READY (its credit becomes 0, as after
        READY(0): it finishes the jobs it holds)."""
        cdef int k, rs
        cdef Req *r
        if nb < 3:
            self.counters.drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if s < 0:
            # From a worker this broker does not know: its jobs were put back already.
            self.counters.drop(DROP_ANSWER_UNKNOWN)
            return self.sessions.send_env(m, d + 1, CMD_DISCONNECT, False, v2)
        for k in range(d + 3, d + 1 + nb):
            if zmsg_size(&m[k]) != TASK_ID_SIZE:
                self.counters.drop(DROP_ANSWER_BAD_ID)
                continue
            rs = self.table.find(<const uint8_t *>zmsg_data(&m[k]), TASK_ID_SIZE)
            if rs < 0 or self.table.reqs[rs].worker != s:
                # Not running here (timed out meanwhile, cancelled, or another worker's).
                self.counters.drop(DROP_ANSWER_UNKNOWN)
                self.sessions.settle_ghost(s)
                continue
            self.heap.delete(<uint32_t>rs)
            self.sessions.detach(<uint32_t>rs)
            # As if never sent: the try is not counted.
            r = &self.table.reqs[rs]
            r.attempts -= 1
            if r.tries_left >= 0:
                r.tries_left += 1
            if self.journal.on and r.client:
                self.journal.push(J_START, r.cid, 0, NULL, 0, r.attempts, 0, 0.0)
            if self.queue.requeue(<uint32_t>rs) < 0:
                # Without memory to queue it again: as a failed attempt (retried or given up).
                self.counters.drop(DROP_OUT_OF_MEMORY)
                if self.attempts.retry_or_abort(<uint32_t>rs) < 0:
                    return -1
                continue
            r.state = QUEUED
            self.queue.count += 1
            self.counters.add(CNT_RETURNED)
        self.sessions.sess[s].credit = 0
        self.sessions.offer(<uint32_t>s)
        return 0

    cdef void worker_event(self, int kind, uint32_t s) noexcept nogil:
        cdef zmsg *identity = &self.sessions.sess[s].env[0]
        self.events.push(kind, <const uint8_t *>zmsg_data(identity), zmsg_size(identity), 0)

    # -- liveness -----------------------------------------------------------------

    cdef int forget(self, uint32_t s, bint requeue=True) noexcept nogil:
        """The worker is gone: its jobs go back to the front of the queue at once
        (unless the broker is closing: requeue=False leaves them to their fate)."""
        cdef uint32_t rs, prev
        cdef int rc, result = 0
        self.sessions.sess[s].credit = 0  # so detaching its jobs does not offer it again
        self.sessions.offer(s)
        # The list holds the newest job first; requeue the oldest first, so the
        # jobs keep the order in which they were sent.
        rs = self.sessions.sess[s].jobs
        while rs != NO_SLOT and self.table.reqs[rs].wnext != NO_SLOT:
            rs = self.table.reqs[rs].wnext
        while rs != NO_SLOT:
            prev = self.table.reqs[rs].wprev
            self.sessions.detach(rs)
            if requeue:
                self.heap.delete(rs)
                self.counters.add(CNT_REQUEUED)
                rc = self.attempts.retry_or_abort(rs)
                if rc < 0:
                    result = rc
            rs = prev
        self.sessions.release(s)
        return result

    cdef int tick(self, double now) noexcept nogil:
        """Forget workers silent past liveness, at the moment the earliest one may
        be, and those found gone once the loop has polled since; heartbeat the others
        every interval. Expiries only move later, so the earliest one seen in a scan
        is when the next scan is due."""
        cdef uint32_t s
        cdef Sess *w
        cdef int rc = 0
        cdef bint beat = now >= self.sessions.next_tick
        cdef double earliest = now + self.sessions.heartbeat * self.sessions.liveness
        if beat:
            self.sessions.next_tick = now + self.sessions.heartbeat
        for s in range(self.sessions.cap):
            w = &self.sessions.sess[s]
            if not w.used:
                continue
            if (w.gone >= 0 and self.sessions.polls > w.gone) or (w.gone < 0 and now >= w.expiry):
                self.counters.add(CNT_WORKERS_DEAD)
                self.worker_event(EV_WORKER_DEAD, s)
                rc = self.forget(s)
                if rc < 0:
                    return rc
                continue
            if w.gone < 0 and beat:
                rc = self.sessions.send(s, CMD_HEARTBEAT, False)
                if rc < 0:
                    return rc
                if rc == 1:
                    # Its connection is gone (ROUTER_MANDATORY): dead at the next
                    # scan, not when its liveness runs out.
                    self.unreachable(s)
            if w.gone >= 0:
                earliest = now
            elif w.expiry < earliest:
                earliest = w.expiry
        self.sessions.next_check = earliest
        return 0

    cdef int probe(self) noexcept nogil:
        """HEARTBEAT to every worker now; one whose connection is gone (the send fails:
        ROUTER_MANDATORY) is forgotten at the loop's next scan, after its last messages
        are read, and its jobs go back to the queue. Returns how many were found, or
        -errno."""
        cdef uint32_t s
        cdef int rc, count = 0
        for s in range(self.sessions.cap):
            if not self.sessions.sess[s].used or self.sessions.sess[s].gone >= 0:
                continue
            rc = self.sessions.send(s, CMD_HEARTBEAT, False)
            if rc < 0:
                return rc
            if rc == 1:
                self.unreachable(s)
                count += 1
        return count

    cdef int disconnect_all(self) noexcept nogil:
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        cdef uint32_t s
        cdef int count = 0
        for s in range(self.sessions.cap):
            if self.sessions.sess[s].used:
                self.sessions.send(s, CMD_DISCONNECT, False)
                # Closing: a job on its last try must not be reported as aborted.
                self.forget(s, False)
                count += 1
        return count

    # -- dispatch -----------------------------------------------------------------

    cdef int dispatch(self, double now) noexcept nogil:
        """Send queued jobs to idle workers, oldest first, while both last."""
        cdef int s, w, w2, i, e, nenv, sidx, rc
        cdef Req *r
        cdef Wk *wk
        cdef zmsg part
        cdef Ring *q
        # An FBW02 worker's share of the queue, fixed for this pass: so that a few jobs
        # spread over the idle workers, and many fill each one's credit.
        cdef size_t share = (self.queue.count + self.idle.live - 1) // self.idle.live if self.idle.live else 0
        while self.idle.live:
            q = self.queue.next()
            if q == NULL:
                return 0
            s = <int>(ring_front(q) >> 32)
            w = self.idle.pop_slot()
            if w < 0:
                return 0
            sidx = self.idle.slots[w].session
            r = &self.table.reqs[s]
            if sidx >= 0 and r.failed_on == sidx and r.failed_on_gen == self.sessions.sess[sidx].gen and self.idle.live:
                # Retry a failed job on another worker when one is idle.
                w2 = self.idle.pop_slot()
                self.idle.release(w)
                self.sessions.offer(<uint32_t>sidx)
                w = w2
                sidx = self.idle.slots[w].session
            wk = &self.idle.slots[w]
            if sidx >= 0 and self.sessions.sess[sidx].v2:
                self.idle.release(w)
                rc = self.dispatch_batch(<uint32_t>sidx, share, now)
                if rc < 0:
                    return rc
                continue
            # ROUTER_MANDATORY makes the first frame fail for a worker that is gone;
            # the job then stays at the front for the next idle worker.
            if sidx >= 0:
                self.idle.release(w)
                rc = self.sessions.send(<uint32_t>sidx, CMD_TASK, True)
                if rc < 0:
                    return rc
                if rc == 1:
                    rc = self.unreachable(<uint32_t>sidx)
                    if rc < 0:
                        return rc
                    continue
            else:
                if zmsg_send(&wk.env[0], self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
                    e = zerrno()
                    self.idle.release(w)
                    if e == ZETERM:
                        return -e
                    self.counters.add(CNT_UNREACHABLE_WORKERS)
                    continue
                for i in range(1, wk.nenv):
                    zmsg_send(&wk.env[i], self.s_workers, ZSNDMORE | ZDONTWAIT)
                self.idle.release(w)
            r = &self.table.reqs[s]
            zmsg_init_size(&part, TASK_ID_SIZE)
            self.table.write_id(<uint32_t>s, <uint8_t *>zmsg_data(&part))
            nenv = r.nenv
            if zmsg_send(&part, self.s_workers, (ZSNDMORE if r.nframes > nenv else 0) | ZDONTWAIT) < 0:
                zmsg_close(&part)
            for i in range(nenv, r.nframes):
                # zmq_msg_copy shares the payload buffer (reference count), so a
                # retry can send it again without the bytes being copied.
                zmsg_init(&part)
                zmsg_copy(&part, &r.frames[i])
                if zmsg_send(&part, self.s_workers, (ZSNDMORE if i + 1 < r.nframes else 0) | ZDONTWAIT) < 0:
                    zmsg_close(&part)
            ring_drop_front(q)
            self.queue.count -= 1
            self.start_attempt(<uint32_t>s, sidx, now)
            if sidx >= 0:
                self.sessions.offer(<uint32_t>sidx)
        return 0

    cdef int dispatch_batch(self, uint32_t sidx, size_t share, double now) noexcept nogil:
        """One FBW02 TASK to worker sidx, taken from the idle FIFO: the queue's first
        jobs, at most its spare credit, `share` (of the queue, for this pass), MAX_BATCH
        and MAX_FRAMES. A failed job that another idle worker could retry ends the batch
        before it. Each job is committed as its frames go; the header goes last."""
        cdef uint8_t header[MAX_BATCH * TASK_RECORD_SIZE]
        cdef Sess *w = &self.sessions.sess[sidx]
        cdef size_t limit = w.credit - w.inflight if w.inflight < w.credit else 0
        cdef int k = 0, frames = 0, s, i, nf, rc
        cdef Req *r
        cdef Ring *q
        cdef zmsg part
        if share < limit:
            limit = share
        if limit > MAX_BATCH:
            limit = MAX_BATCH
        if limit == 0:  # not reached: a worker is idle only with spare credit
            return 0
        rc = self.sessions.send(sidx, CMD_TASK, True)
        if rc != 0:
            return rc if rc < 0 else self.unreachable(sidx)
        while <size_t>k < limit:
            q = self.queue.next()
            if q == NULL:
                break
            s = <int>(ring_front(q) >> 32)
            r = &self.table.reqs[s]
            nf = r.nframes - r.nenv
            if k and (frames + nf > MAX_FRAMES or
                      (r.failed_on == <int>sidx and r.failed_on_gen == w.gen and self.idle.live)):
                break
            for i in range(r.nenv, r.nframes):
                # zmq_msg_copy shares the payload buffer: nothing is copied.
                zmsg_init(&part)
                zmsg_copy(&part, &r.frames[i])
                if zmsg_send(&part, self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
                    zmsg_close(&part)
            self.table.write_id(<uint32_t>s, &header[k * TASK_RECORD_SIZE])
            header[k * TASK_RECORD_SIZE + 16] = (nf >> 8) & 0xFF
            header[k * TASK_RECORD_SIZE + 17] = nf & 0xFF
            ring_drop_front(q)
            self.queue.count -= 1
            self.start_attempt(<uint32_t>s, <int>sidx, now)
            frames += nf
            k += 1
        zmsg_init_size(&part, <size_t>k * TASK_RECORD_SIZE)
        memcpy(zmsg_data(&part), header, <size_t>k * TASK_RECORD_SIZE)
        if zmsg_send(&part, self.s_workers, ZDONTWAIT) < 0:
            zmsg_close(&part)
        self.sessions.offer(sidx)
        return 0

    cdef int unreachable(self, uint32_t sidx) noexcept nogil:
        """A send to worker sidx failed at its first frame: its connection is gone. It
        gets nothing more and is forgotten at the next scan (tick), once the loop has
        polled: libzmq still holds the messages it sent before closing, and a
        DISCONNECT among them makes it a worker that left, not one that died."""
        cdef Sess *w = &self.sessions.sess[sidx]
        cdef int slot = self.idle.find(w.key, w.keylen)
        self.counters.add(CNT_UNREACHABLE_WORKERS)
        w.gone = self.sessions.polls
        if slot >= 0:
            self.idle.remove_slot(<uint32_t>slot)
        self.sessions.next_check = self.sessions.clock.now
        return 0

    cdef void start_attempt(self, uint32_t rs, int sidx, double now) noexcept nogil:
        """Request rs, taken off the queue, was sent to a worker (session sidx, or -1
        for a REQ worker): its attempt starts now."""
        cdef Req *r = &self.table.reqs[rs]
        r.state = RUNNING
        r.attempts += 1
        if self.journal.on and r.client:
            self.journal.push(J_START, r.cid, 0, NULL, 0, r.attempts, 0, 0.0)
        r.failed_on = -1
        if r.tries_left > 0:
            r.tries_left -= 1
        if r.timeout >= 0:
            # Without memory for a deadline the attempt simply has none.
            self.heap.insert(rs, now + r.timeout)
        if sidx >= 0:
            self.sessions.attach(rs, <uint32_t>sidx)
        self.counters.add(CNT_DISPATCHED)
