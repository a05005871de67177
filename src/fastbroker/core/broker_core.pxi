# core/broker_core.pxi: BrokerCore, the class Python uses: it binds the parts to the
# three sockets, runs the loop (poll, receive, hand each message to its side, expire,
# tick, dispatch), takes REQ clients' requests in, and keeps the Python API.
#
# Owns: the sockets' handles, the receive buffer (scratch), and the parts, in
# dependency order: Clock, Counters, Events, Journal, RequestTable, IdleWorkers,
# DeadlineHeap, RequestIds, JobQueue, WorkerSessions, KeptOutcomes, ClientSide,
# Attempts, WorkerSide.
# Touches: every part, through its interface; the REQ-client path (_on_request,
# _answer_empty) writes the RequestTable and the JobQueue itself.


cdef class BrokerCore:
    """Routes requests to workers that asked, with per-attempt deadlines and tries.

    ``run()`` polls the three sockets and a wake fd with the GIL released; it
    returns to Python when the fd is readable, a signal interrupts the poll,
    ``max_wait`` seconds pass, or (with ``stop_on_drop``) a message was dropped.
    """

    def __cinit__(self, requests, workers, answers, timeout=None, tries=None, *,
                  heartbeat=protocol.DEFAULT_HEARTBEAT, liveness=protocol.DEFAULT_LIVENESS, bytes epoch=None,
                  retention=protocol.DEFAULT_RETENTION, retention_bytes=protocol.DEFAULT_RETENTION_BYTES,
                  max_queue=None, max_extend=protocol.DEFAULT_MAX_EXTEND):
        max_queue = _common.check_max_queue(max_queue)
        max_extend = _common.check_max_extend(max_extend)
        retention = _common.check_retention(retention)
        retention_bytes = _common.check_retention_bytes(retention_bytes)
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        heartbeat = check_heartbeat(heartbeat)
        liveness = check_count("liveness", liveness, protocol.MIN_LIVENESS, protocol.MAX_LIVENESS)
        self._sockets = (requests, workers, answers)
        self.s_requests = <void *><size_t>requests.underlying
        self.s_workers = <void *><size_t>workers.underlying
        self.s_answers = <void *><size_t>answers.underlying
        self.table = RequestTable(epoch)
        self.clock = Clock()
        self.counters = Counters()
        self.event_queue = Events(self.counters)
        self.store_journal = Journal()
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        # A secret seed: a client cannot pick ids that all land in one probe chain.
        self.ids = RequestIds()
        self.queue = JobQueue(self.table, timeout, tries, max_queue)
        self.sessions = WorkerSessions(self.table, self.idle, self.clock, workers, heartbeat, liveness)
        self.kept = KeptOutcomes(self.ids, self.store_journal, self.counters, retention, retention_bytes)
        self.client_side = ClientSide(self.table, self.ids, self.kept, self.store_journal, self.queue, self.sessions,
                                      self.idle, self.heap, self.counters, self.clock, requests)
        self.attempts = Attempts(self.table, self.heap, self.queue, self.sessions, self.client_side, self.counters,
                                 self.event_queue, self.clock, requests)
        self.worker_side = WorkerSide(self.sessions, self.idle, self.table, self.heap, self.queue, self.attempts,
                                      self.store_journal, self.counters, self.event_queue, workers, max_extend)
        self.scratch_cap = 64
        self.scratch = <zmsg *>malloc(self.scratch_cap * sizeof(zmsg))
        if self.scratch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        # Each part frees what it owns when the last reference to it goes.
        free(self.scratch)

    def disconnect_workers(self):
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        if self.closed:
            return 0
        return self.worker_side.disconnect_all()

    def probe_workers(self):
        """HEARTBEAT every DEALER worker now and forget, at once, those whose connection
        is gone (their jobs go back to the queue); returns how many. The Broker calls it
        when the workers socket reports a disconnection."""
        cdef int rc
        if self.closed:
            return 0
        rc = self.worker_side.probe()
        if rc < 0:
            raise zmq.ZMQError(-rc)
        return rc

    def close(self):
        """Release every message the core holds (queued jobs, idle workers)."""
        self.closed = True
        self.sessions.release_all()
        self.kept.release_all()
        self.ids.clear()
        self.client_side.batches.clear()
        self.store_journal.clear()
        self.store_journal.drop_held()
        self.table.clear()
        self.idle.clear()
        self.heap.clear()
        self.queue.clear()

    @property
    def timeout(self):
        return None if self.queue.timeout < 0 else self.queue.timeout

    @property
    def tries(self):
        return None if self.queue.tries < 0 else self.queue.tries

    @property
    def heartbeat(self):
        return self.sessions.heartbeat

    @property
    def max_queue(self):
        return None if self.queue.limit == <size_t>-1 else self.queue.limit

    @property
    def max_extend(self):
        return self.worker_side.max_extend

    @property
    def liveness(self):
        return self.sessions.liveness

    @property
    def last_drop(self):
        """Reason text of the latest dropped message, or None."""
        return None if self.counters.last_drop < 0 else protocol.DROP_REASONS[self.counters.last_drop]

    def stats(self):
        """Counters since start and current gauges, as a dict of ints."""
        result = self.counters.counts_dict()
        result["queued"] = self.queue.count
        result["running"] = self.table.count - self.queue.count
        result["idle_workers"] = self.idle.live
        result["workers"] = self.sessions.count
        result["retained"] = self.kept.count
        result["retained_bytes"] = self.kept.retained_bytes
        result["dead"] = self.kept.dead
        result["drops"] = self.counters.drops_dict()
        result["latency"] = self.counters.latency_dict()
        return result

    def record_events(self, bint on):
        """Keep worker and abort events for events() (off: none are kept)."""
        self.event_queue.record(on)

    def events(self):
        """Events since the last call, oldest first: (kind, data, n); see protocol.EVENT_KINDS."""
        return self.event_queue.take()

    # -- durable store support --------------------------------------------------

    def journal(self, bint on):
        """Journal on: FBC01 changes are recorded for journal_take(), every FBC01 reply
        is held until release_held(), and run() returns RUN_JOURNAL after a turn that
        left either. So nothing is promised to a client before it is stored."""
        self.store_journal.on = on

    def journal_take(self):
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries,
        payload frames (a dead request's, else []), timeout (s or None)), ("forget", id).
        MemoryError if changes were lost for lack of memory."""
        return self.store_journal.take()

    def journal_encode(self, double now):
        """The changes since the last call as the log store's records
        (fastbroker.log_records), each finish stamped `now` (Unix time): one bytes
        object, b"" if none. MemoryError as journal_take()."""
        return self.store_journal.encode(now)

    def release_held(self):
        """Send the replies held since the last call; returns how many messages."""
        return self.store_journal.release(self.s_requests, self.counters)

    def restore_request(self, bytes cid, payload, timeout, int tries, int attempts):
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        self.client_side.restore(cid, payload, timeout, tries, attempts)

    def restore_outcome(self, bytes cid, bytes code, body, int attempts, int tries, double age, payload=None,
                        timeout=None):
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first). A
        FAILED or TIMED_OUT outcome given its request's payload is dead: REQUEUE can
        run it again (with `timeout` per attempt)."""
        self.kept.restore(cid, code, body, attempts, tries, age, payload, timeout)

    def run(self, int wake_fd=-1, max_wait=None, bint stop_on_drop=False, bint stop_on_event=False):
        """Serve until woken; returns one of RUN_*. Raises zmq.ZMQError on a socket error."""
        if self.closed:
            raise RuntimeError("BrokerCore is closed")
        cdef double wait = -1.0 if max_wait is None else max(0.0, float(max_wait))
        cdef int rc
        with nogil:
            rc = self._loop(wake_fd, wait, stop_on_drop, stop_on_event)
        if rc < 0:
            raise zmq.ZMQError(-rc)
        return rc

    # -- the loop -----------------------------------------------------------------

    cdef int _loop(self, int wake_fd, double max_wait, bint stop_on_drop, bint stop_on_event) noexcept nogil:
        cdef zpollitem items[4]
        cdef double now = monotonic_now()
        cdef double t_end = now + max_wait if max_wait >= 0 else -1.0
        cdef double next_t, t_done
        cdef long ms
        cdef int rc, nitems = 4 if wake_fd >= 0 else 3
        items[0].socket = self.s_requests
        items[1].socket = self.s_workers
        items[2].socket = self.s_answers
        items[3].socket = NULL
        items[3].fd = wake_fd
        for rc in range(4):
            items[rc].events = ZPOLLIN
        cdef bint polled = False
        self.counters.last_drop = -1
        while True:
            now = monotonic_now()
            self.clock.now = now
            rc = self.attempts.expire(now)
            if rc < 0:
                return rc
            if self.kept.fifo.count:
                self.kept.forget_due(now)
            if self.sessions.count and (now >= self.sessions.next_tick or now >= self.sessions.next_check):
                rc = self.worker_side.tick(now)
                if rc < 0:
                    return rc
            rc = self.worker_side.dispatch(now)
            if rc < 0:
                return rc
            # The FBC02 replies of the last turn (and of this one's expiries), before
            # any return: nothing waits in a batch while the loop sleeps.
            if self.client_side.batches.n:
                rc = self.client_side.flush_batches()
                if rc < 0:
                    return rc
            if stop_on_drop and self.counters.last_drop >= 0:
                return RUN_DROP
            if stop_on_event and self.event_queue.count:
                return RUN_EVENT
            if self.store_journal.on and self.store_journal.pending():
                return RUN_JOURNAL
            # Poll at least once, and act on what was read before returning.
            if polled and t_end >= 0 and now >= t_end:
                return RUN_TIMEOUT
            polled = True
            next_t = t_end
            if self.heap.count and (next_t < 0 or self.heap.ents[0].deadline < next_t):
                next_t = self.heap.ents[0].deadline
            if self.sessions.count and (next_t < 0 or self.sessions.next_tick < next_t):
                next_t = self.sessions.next_tick
            if self.sessions.count and self.sessions.next_check < next_t:
                next_t = self.sessions.next_check
            if self.kept.fifo.count:
                t_done = self.kept.first_expiry()
                if next_t < 0 or t_done < next_t:
                    next_t = t_done
            if next_t < 0:
                ms = -1
            elif next_t <= now:
                ms = 0
            else:
                # Round up: waking before the deadline would only spin.
                ms = <long>((next_t - now) * 1000.0) + 1
            for rc in range(4):
                items[rc].revents = 0
            rc = zpoll(items, nitems, ms)
            if rc < 0:
                rc = zerrno()
                if rc == EINTR:
                    return RUN_WOKEN
                return -rc
            if nitems == 4 and items[3].revents:
                return RUN_WOKEN
            self.clock.now = monotonic_now()
            self.sessions.polls += 1  # a session found gone before now has its messages read
            # Ready messages first, so jobs arriving in the same turn find them.
            if items[1].revents:
                rc = self._drain(self.s_workers, 1)
                if rc < 0:
                    return rc
            if items[2].revents:
                rc = self._drain(self.s_answers, 2)
                if rc < 0:
                    return rc
            if items[0].revents:
                rc = self._drain(self.s_requests, 0)
                if rc < 0:
                    return rc

    cdef int _drain(self, void *sock, int which) noexcept nogil:
        """Receive up to RECV_BATCH whole messages from sock and handle each."""
        cdef int _k, n, rc
        for _k in range(RECV_BATCH):
            n = self._recv(sock)
            if n == 0:
                return 0
            if n < 0:
                return n
            if n == RECV_DROPPED:
                continue
            if which == 0:
                rc = self._on_request(n)
            elif which == 1:
                rc = self.worker_side.on_ready(self.scratch, n)
            else:
                rc = self._on_answer(n)
            # Frames a handler moved out are empty now; closing them is free.
            close_msgs(self.scratch, n)
            if rc < 0:
                return rc
        return 0

    cdef int _recv(self, void *sock) noexcept nogil:
        """Receive one multipart message into scratch. Returns its frame count,
        0 if none is waiting, RECV_DROPPED if it was too large to keep, or -errno."""
        cdef int n = 0, e, more
        cdef zmsg *grown
        cdef zmsg *slot
        cdef zmsg sink
        cdef bint overflow = False, out_of_memory = False
        while True:
            if not overflow and n == self.scratch_cap:
                grown = NULL
                if n < MAX_FRAMES:
                    grown = <zmsg *>realloc(self.scratch, 2 * self.scratch_cap * sizeof(zmsg))
                if grown == NULL:
                    overflow = True
                    if n < MAX_FRAMES:
                        out_of_memory = True
                else:
                    self.scratch = grown
                    self.scratch_cap *= 2
            # Past the limit the rest of the message is read into a sink and discarded.
            slot = &sink if overflow else &self.scratch[n]
            zmsg_init(slot)
            if zmsg_recv(slot, sock, ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(slot)
                close_msgs(self.scratch, n)
                return 0 if (n == 0 and e == EAGAIN) else -e
            more = zmsg_more(slot)
            if overflow:
                zmsg_close(slot)
            else:
                n += 1
            if not more:
                if overflow:
                    close_msgs(self.scratch, n)
                    self.counters.drop(DROP_OUT_OF_MEMORY if out_of_memory else DROP_TOO_MANY_FRAMES)
                    return RECV_DROPPED
                return n

    # -- the original REQ clients and PUSH answers ---------------------------------

    cdef int _on_request(self, int n) noexcept nogil:
        cdef int d, s, i
        cdef Req *r
        if n >= 2 and zmsg_size(&self.scratch[1]) == SIGNATURE_SIZE:
            if memcmp(zmsg_data(&self.scratch[1]), CLIENT_SIGNATURE, SIGNATURE_SIZE) == 0:
                return self.client_side.on_client(self.scratch, n)
            if memcmp(zmsg_data(&self.scratch[1]), CLIENT_SIGNATURE_V2, SIGNATURE_SIZE) == 0:
                return self.client_side.on_batch(self.scratch, n)
        d = find_delimiter(self.scratch, n)
        if d < 1:
            self.counters.drop(DROP_REQUEST_NO_DELIMITER)
            return 0
        if d == n - 1:
            self.counters.drop(DROP_REQUEST_NO_PAYLOAD)
            return 0
        if self.queue.full():
            # The original protocol's only "no": the empty answer, at once.
            self.counters.add(CNT_REJECTED)
            return self._answer_empty(d + 1)
        s = self.table.alloc()
        if s < 0:
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # The empty delimiter is not kept (64 bytes a job): the answer gets a new one.
        r.frames = <zmsg *>malloc((n - 1) * sizeof(zmsg))
        if r.frames == NULL or self.queue.push(<uint32_t>s) < 0:
            self.table.release(s)
            self.counters.drop(DROP_OUT_OF_MEMORY)
            return 0
        for i in range(d):
            zmsg_init(&r.frames[i])
            zmsg_move(&r.frames[i], &self.scratch[i])
        for i in range(d + 1, n):
            zmsg_init(&r.frames[i - 1])
            zmsg_move(&r.frames[i - 1], &self.scratch[i])
        r.nframes = n - 1
        r.nenv = d
        if self.queue.count or not self.idle.live:
            own_small_frames(&r.frames[d], n - 1 - d)
        r.tries_left = self.queue.tries
        r.tries = self.queue.tries
        r.timeout = self.queue.timeout
        r.arrived = self.clock.now
        self.queue.count += 1
        self.counters.add(CNT_REQUESTS)
        return 0

    cdef int _answer_empty(self, int nenv) noexcept nogil:
        """Send the empty answer to the REQ client whose envelope is scratch[0:nenv]."""
        cdef zmsg part
        cdef int i, e
        for i in range(nenv + 1):
            zmsg_init(&part)
            if i < nenv:
                zmsg_copy(&part, &self.scratch[i])
            if zmsg_send(&part, self.s_requests, (ZSNDMORE if i < nenv else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&part)
                if i == 0:
                    return min(self.counters.reply_lost(e), 0)  # client gone or not reading
                return -e if e == ZETERM else 0
        return 0

    cdef int _on_answer(self, int n) noexcept nogil:
        if n < 2:
            self.counters.drop(DROP_ANSWER_TOO_SHORT)
            return 0
        return self.attempts.answer(&self.scratch[0], &self.scratch[1], n - 1, -1)
