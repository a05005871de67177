# core/attempts.pxi: Attempts, how an attempt ends and what follows: the first answer
# is delivered (to a REQ client, or through ClientSide.conclude to FBC01 waiters);
# a deadline that passes, a FAILED or a lost worker queue a retry, or, with no tries
# left, end the request.
#
# Owns: no state of its own.
# Touches: RequestTable (release), DeadlineHeap (expiry), JobQueue (retry ring, count),
# WorkerSessions (detach, ghosts), ClientSide (conclude), Counters, Events, and the
# requests socket (answers to REQ clients). Users: WorkerSide (ANSWER, FAILED, lost
# workers), BrokerCore (PUSH answers, the loop's expiry).


cdef class Attempts:
    """The end of attempts: answer, expire, retry_or_abort."""

    def __cinit__(self, RequestTable table, DeadlineHeap heap, JobQueue queue, WorkerSessions sessions,
                  ClientSide client, Counters counters, Events events, Clock clock, requests):
        self.table = table
        self.heap = heap
        self.queue = queue
        self.sessions = sessions
        self.client = client
        self.counters = counters
        self.events = events
        self.clock = clock
        self.s_requests = <void *><size_t>requests.underlying

    cdef int answer(self, zmsg *tid, zmsg *body, int nbody, int from_s) noexcept nogil:
        """Deliver the first answer for a task; later ones are dropped. from_s is
        the answering DEALER worker's session, -1 for a PUSH answer."""
        if zmsg_size(tid) != TASK_ID_SIZE:
            self.counters.drop(DROP_ANSWER_BAD_ID)
            return 0
        return self.answer_id(<const uint8_t *>zmsg_data(tid), body, nbody, from_s)

    cdef void prefetch_answer(self, const uint8_t *tid) noexcept nogil:
        """Start bringing into the cache the id slot that answer_id(tid) will look up."""
        cdef int s = self.table.find(tid, TASK_ID_SIZE)
        if s >= 0:
            self.client.ids.prefetch(self.table.reqs[s].cid)

    cdef int answer_id(self, const uint8_t *tid, zmsg *body, int nbody, int from_s) noexcept nogil:
        """answer() for a task id of TASK_ID_SIZE bytes (an FBW02 ANSWER record's)."""
        cdef int s, rc
        cdef bint own
        cdef Req *r
        s = self.table.find(tid, TASK_ID_SIZE)
        if s < 0:
            self.counters.drop(DROP_ANSWER_UNKNOWN)
            self.sessions.settle_ghost(from_s)
            return 0
        r = &self.table.reqs[s]
        own = from_s >= 0 and r.worker == from_s
        if not own:
            self.sessions.settle_ghost(from_s)
        rc = self.deliver(r, body, nbody)
        self.counters.record_latency(self.clock.now - r.arrived)
        if r.state == QUEUED:
            # Answered by an earlier attempt while waiting for a retry: the queue
            # entry turns into a tombstone when the slot's generation moves on.
            self.queue.count -= 1
            self.counters.add(CNT_LATE_ANSWERS)
        else:
            self.heap.delete(<uint32_t>s)
            self.sessions.detach(<uint32_t>s, own)
        self.table.release(<uint32_t>s)
        self.counters.add(CNT_ANSWERED)
        return rc

    cdef int deliver(self, Req *r, zmsg *body, int nbody) noexcept nogil:
        """Send r's envelope, the empty delimiter, then body (moved). A client that
        is gone or not reading loses its answer, as in the original broker, but
        counted: the first frame fails (ROUTER_MANDATORY)."""
        cdef int i, e
        cdef zmsg delimiter
        if r.client:
            return self.client.conclude(r, R_OK, body, nbody)
        for i in range(r.nenv):
            if zmsg_send(&r.frames[i], self.s_requests, ZSNDMORE | ZDONTWAIT) < 0:
                e = zerrno()
                if i == 0:
                    return min(self.counters.reply_lost(e), 0)
                return -e if e == ZETERM else 0
        zmsg_init(&delimiter)
        if zmsg_send(&delimiter, self.s_requests, ZSNDMORE | ZDONTWAIT) < 0:
            zmsg_close(&delimiter)
            e = zerrno()
            return -e if e == ZETERM else 0
        for i in range(nbody):
            if zmsg_send(&body[i], self.s_requests, (ZSNDMORE if i + 1 < nbody else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                return -e if e == ZETERM else 0
        return 0

    cdef int expire(self, double now) noexcept nogil:
        cdef uint32_t s
        cdef int rc
        while self.heap.count and self.heap.ents[0].deadline <= now:
            s = self.heap.pop_min()
            self.counters.add(CNT_TIMEOUTS)
            self.sessions.detach(s, False)
            rc = self.retry_or_abort(s)
            if rc < 0:
                return rc
        return 0

    cdef int retry_or_abort(self, uint32_t s) noexcept nogil:
        """An attempt ended without an answer: queue the job ahead of new requests,
        or, with no tries left, send the client the empty answer."""
        cdef Req *r = &self.table.reqs[s]
        cdef zmsg empty
        cdef uint8_t tid[TASK_ID_SIZE]
        cdef int rc
        # Without memory to requeue, give up on the job rather than lose track of it.
        if r.tries_left == 0 or self.queue.requeue(s) < 0:
            if not r.client:
                if self.events.on:
                    self.table.write_id(s, tid)
                    self.events.push(EV_ABORTED, tid, TASK_ID_SIZE, r.attempts)
                zmsg_init(&empty)
                rc = self.deliver(r, &empty, 1)
                zmsg_close(&empty)
            elif r.fail != NULL:
                self.events.push(EV_FAILED, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self.client.conclude(r, R_FAILED, r.fail, 2)
            else:
                self.events.push(EV_TIMED_OUT, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self.client.conclude(r, R_TIMED_OUT, NULL, 0)
            self.table.release(s)
            self.counters.add(CNT_ABORTED)
            return rc
        r.state = QUEUED
        self.queue.count += 1
        self.counters.add(CNT_RETRIED)
        return 0
