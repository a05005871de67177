# core/broker_core.pxi: BrokerCore, the broker loop.


cdef double LATENCY_BOUNDS[N_LATENCY - 1]
for _i, _b in enumerate(protocol.LATENCY_BOUNDS):
    LATENCY_BOUNDS[_i] = _b
cdef bytes STATS_NAMES = ",".join(protocol.stats_fields()).encode("ascii")
cdef bytes _BAD_OPTIONS = protocol.REJECT_REASONS[REJECT_BAD_OPTIONS].encode()
cdef bytes _QUEUE_FULL = protocol.REJECT_REASONS[REJECT_QUEUE_FULL].encode()
cdef const char *BAD_OPTIONS_TEXT = _BAD_OPTIONS  # the bytes above keep it alive
cdef const char *QUEUE_FULL_TEXT = _QUEUE_FULL


cdef class BrokerCore:
    """Routes requests to workers that asked, with per-attempt deadlines and tries.

    ``run()`` polls the three sockets and a wake fd with the GIL released; it
    returns to Python when the fd is readable, a signal interrupts the poll,
    ``max_wait`` seconds pass, or (with ``stop_on_drop``) a message was dropped.
    """

    cdef object _sockets  # keeps the pyzmq sockets alive while we hold their handles
    cdef void *s_requests
    cdef void *s_workers
    cdef void *s_answers
    cdef RequestTable table
    cdef IdleWorkers idle
    cdef DeadlineHeap heap
    cdef Ring waiting  # new requests, FIFO
    cdef Ring retry  # timed-out requests, served before `waiting`
    cdef size_t n_queued
    cdef double _timeout  # < 0: none
    cdef int32_t _tries  # -1: unlimited
    cdef uint64_t counters[N_COUNTERS]
    cdef uint64_t drops[16]
    cdef int last_drop_reason
    cdef zmsg *scratch
    cdef int scratch_cap
    cdef bint closed
    cdef double now  # the loop turn's clock reading, for handlers
    # DEALER worker sessions
    cdef Sess *sess
    cdef uint32_t sess_cap
    cdef uint32_t sess_free
    cdef uint32_t n_sessions
    cdef AddrIndex sess_index
    cdef double _heartbeat
    cdef int _liveness
    cdef double next_tick  # next heartbeat to the workers
    cdef double next_check  # earliest time a worker may have gone silent too long
    cdef uint8_t *keybuf  # the current worker message's address key
    cdef size_t keybuf_cap
    cdef size_t keylen
    # FBC01 clients: request id -> request slot, or kept outcome slot | DONE_BIT
    cdef CidIndex cids
    cdef Done *done
    cdef uint32_t done_cap
    cdef uint32_t done_used  # slots below this have been handed out; the rest are untouched memory
    cdef uint32_t done_free
    cdef Ring done_fifo  # kept outcome slots, oldest first (only the front leaves)
    cdef size_t retained_bytes
    cdef double retention
    cdef size_t retention_bytes
    cdef size_t _max_queue  # SIZE_MAX: unbounded
    # Answered requests' latency, and the events kept for the log (record_events)
    cdef uint64_t latency_counts[N_LATENCY]
    cdef double latency_sum
    cdef Ev *evq
    cdef size_t ev_count
    cdef bint ev_on
    # Durable store support: changes of this turn, and FBC01 replies held until stored
    cdef bint journal_on
    cdef bint journal_lost
    cdef JEnt *jents
    cdef size_t jcount, jcap
    cdef zmsg *held
    cdef uint8_t *held_more
    cdef size_t nheld, held_cap
    cdef bytes stats_names  # keeps names_ptr's buffer alive
    cdef const char *names_ptr
    cdef size_t names_len

    def __cinit__(self, requests, workers, answers, timeout=None, tries=None, *,
                  heartbeat=protocol.DEFAULT_HEARTBEAT, liveness=protocol.DEFAULT_LIVENESS, bytes epoch=None,
                  retention=protocol.DEFAULT_RETENTION, retention_bytes=protocol.DEFAULT_RETENTION_BYTES,
                  max_queue=None):
        max_queue = _common.check_max_queue(max_queue)
        self._max_queue = <size_t>-1 if max_queue is None else max_queue
        self.stats_names = STATS_NAMES
        self.names_ptr = self.stats_names
        self.names_len = len(self.stats_names)
        self.retention = _common.check_retention(retention)
        self.retention_bytes = _common.check_retention_bytes(retention_bytes)
        self.done_free = NO_SLOT
        timeout = check_timeout(timeout)
        tries = check_tries(tries)
        self._heartbeat = check_heartbeat(heartbeat)
        self._liveness = check_count("liveness", liveness, protocol.MIN_LIVENESS, protocol.MAX_LIVENESS)
        self.sess_free = NO_SLOT
        # A secret seed: a client cannot pick ids that all land in one probe chain.
        self.cids.seed = int.from_bytes(os.urandom(8), "little")
        self._sockets = (requests, workers, answers)
        self.s_requests = <void *><size_t>requests.underlying
        self.s_workers = <void *><size_t>workers.underlying
        self.s_answers = <void *><size_t>answers.underlying
        self.table = RequestTable(epoch)
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        self._timeout = -1.0 if timeout is None else timeout
        self._tries = -1 if tries is None else tries
        self.last_drop_reason = -1
        self.scratch_cap = 64
        self.scratch = <zmsg *>malloc(self.scratch_cap * sizeof(zmsg))
        if self.scratch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.evq)
        self._clear_journal()
        free(self.jents)
        close_msgs(self.held, <int>self.nheld)
        free(self.held)
        free(self.held_more)
        self._release_sessions()
        self._release_outcomes()
        free(self.done)
        free(self.done_fifo.buf)
        free(self.sess)
        free(self.keybuf)
        free(self.scratch)
        free(self.waiting.buf)
        free(self.retry.buf)

    cdef void _release_sessions(self) noexcept nogil:
        cdef uint32_t s
        for s in range(self.sess_cap):
            if self.sess[s].used:
                close_msgs(self.sess[s].env, self.sess[s].nenv)
                free(self.sess[s].env)
                self.sess[s].used = False
        aidx_free(&self.sess_index)
        self.n_sessions = 0

    cdef void _release_outcomes(self) noexcept nogil:
        cdef uint32_t d
        while self.done_fifo.count:
            d = <uint32_t>ring_front(&self.done_fifo)
            ring_drop_front(&self.done_fifo)
            close_msgs(self.done[d].body, self.done[d].nbody)
            free(self.done[d].body)
            self.done[d].body = NULL
            self.done[d].next_free = self.done_free
            self.done_free = d
        cidx_free(&self.cids)
        self.retained_bytes = 0

    def disconnect_workers(self):
        """Send DISCONNECT to every DEALER worker and forget them; returns how many."""
        cdef uint32_t s
        cdef int count = 0
        if self.closed:
            return 0
        for s in range(self.sess_cap):
            if self.sess[s].used:
                self._send_env(self.sess[s].env, self.sess[s].nenv, CMD_DISCONNECT, False)
                # Closing: a job on its last try must not be reported as aborted.
                self._forget(s, False)
                count += 1
        return count

    def close(self):
        """Release every message the core holds (queued jobs, idle workers)."""
        self.closed = True
        self._release_sessions()
        self._release_outcomes()
        self._clear_journal()
        close_msgs(self.held, <int>self.nheld)
        self.nheld = 0
        self.table = RequestTable()
        self.idle = IdleWorkers()
        self.heap = DeadlineHeap()
        self.waiting.count = self.retry.count = 0
        self.n_queued = 0

    @property
    def timeout(self):
        return None if self._timeout < 0 else self._timeout

    @property
    def tries(self):
        return None if self._tries < 0 else self._tries

    @property
    def heartbeat(self):
        return self._heartbeat

    @property
    def max_queue(self):
        return None if self._max_queue == <size_t>-1 else self._max_queue

    @property
    def liveness(self):
        return self._liveness

    @property
    def last_drop(self):
        """Reason text of the latest dropped message, or None."""
        return None if self.last_drop_reason < 0 else protocol.DROP_REASONS[self.last_drop_reason]

    def stats(self):
        """Counters since start and current gauges, as a dict of ints."""
        cdef int i
        result = {name: self.counters[i] for i, name in enumerate(protocol.COUNTERS)}
        result["queued"] = self.n_queued
        result["running"] = self.table.count - self.n_queued
        result["idle_workers"] = self.idle.live
        result["workers"] = self.n_sessions
        result["retained"] = self.done_fifo.count
        result["retained_bytes"] = self.retained_bytes
        result["drops"] = {protocol.DROP_REASONS[i]: self.drops[i]
                           for i in range(len(protocol.DROP_REASONS)) if self.drops[i]}
        result["latency"] = {
            "bounds": protocol.LATENCY_BOUNDS,
            "counts": [self.latency_counts[i] for i in range(N_LATENCY)],
            "count": sum(self.latency_counts[i] for i in range(N_LATENCY)),
            "sum": self.latency_sum,
        }
        return result

    def record_events(self, bint on):
        """Keep worker and abort events for events() (off: none are kept)."""
        if on and self.evq == NULL:
            self.evq = <Ev *>malloc(EVENT_QUEUE * sizeof(Ev))
            if self.evq == NULL:
                raise MemoryError()
        self.ev_on = on
        if not on:
            self.ev_count = 0

    def events(self):
        """Events since the last call, oldest first: (kind, data, n); see protocol.EVENT_KINDS."""
        cdef size_t i
        result = [(protocol.EVENT_KINDS[self.evq[i].kind], (<char *>self.evq[i].data)[:self.evq[i].len], self.evq[i].n)
                  for i in range(self.ev_count)]
        self.ev_count = 0
        return result

    # -- durable store support --------------------------------------------------

    def journal(self, bint on):
        """Journal on: FBC01 changes are recorded for journal_take(), every FBC01 reply
        is held until release_held(), and run() returns RUN_JOURNAL after a turn that
        left either. So nothing is promised to a client before it is stored."""
        self.journal_on = on

    cdef void _clear_journal(self) noexcept nogil:
        cdef size_t i
        for i in range(self.jcount):
            close_msgs(self.jents[i].frames, self.jents[i].nframes)
            free(self.jents[i].frames)
        self.jcount = 0

    def journal_take(self):
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries),
        ("forget", id). MemoryError if changes were lost for lack of memory."""
        cdef size_t i
        cdef JEnt *j
        if self.journal_lost:
            self._clear_journal()
            raise MemoryError("fastbroker: journal entries lost for lack of memory")
        result = []
        for i in range(self.jcount):
            j = &self.jents[i]
            cid = (<char *>j.cid)[:REQUEST_ID_SIZE]
            frames = [(<char *>zmsg_data(&j.frames[k]))[:zmsg_size(&j.frames[k])] for k in range(j.nframes)]
            if j.kind == J_SUBMIT:
                result.append(("submit", cid, frames, None if j.timeout < 0 else j.timeout, j.tries))
            elif j.kind == J_START:
                result.append(("start", cid, j.attempts))
            elif j.kind == J_FINISH:
                result.append(("finish", cid, bytes([j.code]), frames, j.attempts, j.tries))
            else:
                result.append(("forget", cid))
        self._clear_journal()
        return result

    def release_held(self):
        """Send the replies held since the last call; returns how many messages."""
        cdef size_t i
        cdef int e, count = 0
        cdef bint first = True, skip = False
        for i in range(self.nheld):
            if skip:
                zmsg_close(&self.held[i])
            elif zmsg_send(&self.held[i], self.s_requests, (ZSNDMORE if self.held_more[i] else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&self.held[i])
                if e == ZETERM:
                    close_msgs(&self.held[i + 1], <int>(self.nheld - i - 1))
                    self.nheld = 0
                    raise zmq.ZMQError(e)
                skip = first  # a client that is gone loses the whole reply
            if not self.held_more[i]:
                count += 1
                first = True
                skip = False
            else:
                first = False
        self.nheld = 0
        return count

    def restore_request(self, bytes cid, payload, timeout, int tries, int attempts):
        """Queue a stored request (behind those already queued). It has no waiters
        until a client sends RESULT or SUBMIT for it."""
        cdef int s, i
        cdef Req *r
        cdef int32_t tries_left
        payload = [bytes(f) for f in payload]
        if len(cid) != REQUEST_ID_SIZE or not payload:
            raise ValueError("a request needs a 16-byte id and a payload")
        if cidx_find(&self.cids, <const uint8_t *><const char *>cid) != NULL:
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
        if r.frames == NULL or ring_push(&self.waiting, make_handle(s, r.gen)) < 0:
            self.table.release(s)
            raise MemoryError()
        if cidx_insert(&self.cids, <const uint8_t *><const char *>cid, <uint32_t>s) < 0:
            self.table.release(s)
            raise MemoryError()
        for i, frame in enumerate(payload):
            zmsg_init_size(&r.frames[i], len(frame))
            memcpy(zmsg_data(&r.frames[i]), <const char *>frame, len(frame))
        r.nframes = len(payload)
        r.nenv = 0
        r.client = True
        memcpy(r.cid, <const char *>cid, REQUEST_ID_SIZE)
        r.tries_left = tries_left
        r.tries = tries
        r.attempts = attempts
        r.timeout = -1.0 if timeout is None else timeout
        r.arrived = monotonic_now()
        self.n_queued += 1

    def restore_outcome(self, bytes cid, bytes code, body, int attempts, int tries, double age):
        """Keep a stored outcome, finished `age` seconds ago (restore oldest first)."""
        cdef int i, n
        cdef zmsg *frames
        body = [bytes(f) for f in body]
        if len(cid) != REQUEST_ID_SIZE or code not in (protocol.R_OK, protocol.R_FAILED, protocol.R_TIMED_OUT, protocol.R_CANCELLED):
            raise ValueError("an outcome needs a 16-byte id and an outcome code")
        if cidx_find(&self.cids, <const uint8_t *><const char *>cid) != NULL:
            raise ValueError(f"request {cid.hex()} is already in the broker")
        n = len(body)
        frames = <zmsg *>malloc((n if n else 1) * sizeof(zmsg))
        if frames == NULL or cidx_insert(&self.cids, <const uint8_t *><const char *>cid, 0) < 0:
            free(frames)
            raise MemoryError()
        for i, frame in enumerate(body):
            zmsg_init_size(&frames[i], len(frame))
            memcpy(zmsg_data(&frames[i]), <const char *>frame, len(frame))
        self._keep(cidx_find(&self.cids, <const uint8_t *><const char *>cid), <const uint8_t *><const char *>cid, (<const uint8_t *><const char *>code)[0], frames, n,
                   attempts, tries, monotonic_now() - max(age, 0.0))
        close_msgs(frames, n)
        free(frames)

    cdef void _event(self, int kind, const uint8_t *data, size_t n, uint32_t count) noexcept nogil:
        cdef Ev *e
        if not self.ev_on:
            return
        if self.ev_count == EVENT_QUEUE:
            self.counters[CNT_EVENTS_LOST] += 1
            return
        e = &self.evq[self.ev_count]
        self.ev_count += 1
        e.kind = <uint8_t>kind
        e.len = <uint8_t>(n if n < EVENT_DATA_MAX else EVENT_DATA_MAX)
        e.n = count
        memcpy(e.data, data, e.len)

    cdef void _worker_event(self, int kind, uint32_t s) noexcept nogil:
        self._event(kind, <const uint8_t *>zmsg_data(&self.sess[s].env[0]), zmsg_size(&self.sess[s].env[0]), 0)

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

    # -- loop ---------------------------------------------------------------

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
        self.last_drop_reason = -1
        while True:
            now = monotonic_now()
            self.now = now
            rc = self._expire(now)
            if rc < 0:
                return rc
            if self.done_fifo.count:
                self._forget_outcomes(now)
            if self.n_sessions and (now >= self.next_tick or now >= self.next_check):
                rc = self._tick(now)
                if rc < 0:
                    return rc
            rc = self._dispatch(now)
            if rc < 0:
                return rc
            if stop_on_drop and self.last_drop_reason >= 0:
                return RUN_DROP
            if stop_on_event and self.ev_count:
                return RUN_EVENT
            if self.journal_on and (self.jcount or self.nheld or self.journal_lost):
                return RUN_JOURNAL
            # Poll at least once, and act on what was read before returning.
            if polled and t_end >= 0 and now >= t_end:
                return RUN_TIMEOUT
            polled = True
            next_t = t_end
            if self.heap.count and (next_t < 0 or self.heap.ents[0].deadline < next_t):
                next_t = self.heap.ents[0].deadline
            if self.n_sessions and (next_t < 0 or self.next_tick < next_t):
                next_t = self.next_tick
            if self.n_sessions and self.next_check < next_t:
                next_t = self.next_check
            if self.done_fifo.count:
                t_done = self.done[<uint32_t>ring_front(&self.done_fifo)].finished + self.retention
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
            self.now = monotonic_now()
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
        cdef int k, n, rc
        for k in range(RECV_BATCH):
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
                rc = self._on_ready(n)
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
                    self._drop(DROP_OUT_OF_MEMORY if out_of_memory else DROP_TOO_MANY_FRAMES)
                    return RECV_DROPPED
                return n

    cdef inline void _drop(self, int reason) noexcept nogil:
        self.counters[CNT_DROPPED] += 1
        self.drops[reason] += 1
        self.last_drop_reason = reason

    cdef int _delimiter(self, int n) noexcept nogil:
        cdef int i
        for i in range(n):
            if zmsg_size(&self.scratch[i]) == 0:
                return i
        return -1

    cdef void _own_small_frames(self, zmsg *frames, int n) noexcept nogil:
        """Give each frame of 34 B to 8 KiB a buffer of its own, for a request that will
        wait in the queue: such a frame may lie in libzmq's shared receive buffer (8 KiB
        of data plus its reference counts, ~18 KB), which it would keep alive while it
        waits. A request sent to a worker at once is not copied."""
        cdef int i
        cdef size_t sz
        cdef zmsg own
        for i in range(n):
            sz = zmsg_size(&frames[i])
            if sz > MAX_VSM_SIZE and sz <= KEEP_COPY_MAX and zmsg_init_size(&own, sz) == 0:
                memcpy(zmsg_data(&own), zmsg_data(&frames[i]), sz)
                zmsg_move(&frames[i], &own)  # releases the shared one
                zmsg_close(&own)

    cdef int _on_request(self, int n) noexcept nogil:
        cdef int d, s, i
        cdef Req *r
        if n >= 2 and zmsg_size(&self.scratch[1]) == SIGNATURE_SIZE and \
                memcmp(zmsg_data(&self.scratch[1]), CLIENT_SIGNATURE, SIGNATURE_SIZE) == 0:
            return self._on_client(n)
        d = self._delimiter(n)
        if d < 1:
            self._drop(DROP_REQUEST_NO_DELIMITER)
            return 0
        if d == n - 1:
            self._drop(DROP_REQUEST_NO_PAYLOAD)
            return 0
        if self.n_queued >= self._max_queue:
            # The original protocol's only "no": the empty answer, at once.
            self.counters[CNT_REJECTED] += 1
            return self._answer_empty(d + 1)
        s = self.table.alloc()
        if s < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # The empty delimiter is not kept (64 bytes a job): the answer gets a new one.
        r.frames = <zmsg *>malloc((n - 1) * sizeof(zmsg))
        if r.frames == NULL or ring_push(&self.waiting, make_handle(s, r.gen)) < 0:
            self.table.release(s)
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        for i in range(d):
            zmsg_init(&r.frames[i])
            zmsg_move(&r.frames[i], &self.scratch[i])
        for i in range(d + 1, n):
            zmsg_init(&r.frames[i - 1])
            zmsg_move(&r.frames[i - 1], &self.scratch[i])
        r.nframes = n - 1
        r.nenv = d
        if self.n_queued or not self.idle.live:
            self._own_small_frames(&r.frames[d], n - 1 - d)
        r.tries_left = self._tries
        r.tries = self._tries
        r.timeout = self._timeout
        r.arrived = self.now
        self.n_queued += 1
        self.counters[CNT_REQUESTS] += 1
        return 0

    cdef int _on_ready(self, int n) noexcept nogil:
        """A message on the workers endpoint: an original REQ worker's ready, or FBW01."""
        cdef int d = self._delimiter(n)
        cdef int nb, s, rc
        cdef uint8_t command
        if d < 1:
            self._drop(DROP_READY_NO_DELIMITER)
            return 0
        nb = n - d - 1
        if nb == 1:
            if self.idle.push_env(self.scratch, d + 1) < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
            self.counters[CNT_READY] += 1
            return 0
        if nb == 0 or zmsg_size(&self.scratch[d + 1]) != SIGNATURE_SIZE or \
                memcmp(zmsg_data(&self.scratch[d + 1]), WORKER_SIGNATURE, SIGNATURE_SIZE) != 0:
            self._drop(DROP_READY_BAD_FRAMES)
            return 0
        if zmsg_size(&self.scratch[d + 2]) != 1:
            self._drop(DROP_WORKER_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&self.scratch[d + 2]))[0]
        if command < CMD_READY or command > CMD_DISCONNECT or command == CMD_TASK:
            self._drop(DROP_WORKER_BAD_COMMAND)
            return 0
        if self._address_key(d) < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        s = self._sess_find()
        if s >= 0:
            self.sess[s].expiry = self.now + self._heartbeat * self._liveness
        if command == CMD_READY:
            return self._worker_ready(s, d, nb)
        if command == CMD_ANSWER:
            if nb < 4:
                self._drop(DROP_WORKER_BAD_FRAMES)
                return 0
            # Accepted even from a worker the broker has forgotten: the job may
            # still be waiting for it. That worker is told to register again.
            rc = self._answer(&self.scratch[d + 3], &self.scratch[d + 4], nb - 3, s)
            if s < 0 and rc >= 0:
                rc = self._send_env(self.scratch, d + 1, CMD_DISCONNECT, False)
            return rc if rc < 0 else 0
        if nb != (5 if command == CMD_FAILED else 2):
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if command == CMD_DISCONNECT:
            if s >= 0:
                self.counters[CNT_WORKERS_LEFT] += 1
                self._worker_event(EV_WORKER_LEFT, <uint32_t>s)
                return self._forget(<uint32_t>s)
            return 0
        if s < 0:
            # HEARTBEAT or FAILED from a worker this broker does not know (it was
            # restarted, or took the worker for dead): make it register again.
            rc = self._send_env(self.scratch, d + 1, CMD_DISCONNECT, False)
            if rc < 0:
                return rc
        if command == CMD_FAILED:
            return self._worker_failed(s, d)
        return 0

    cdef int _address_key(self, int d) noexcept nogil:
        """Write the length-prefixed routing frames scratch[0:d] into keybuf/keylen."""
        cdef size_t total = 0, off = 0, sz
        cdef int i
        cdef uint8_t *grown
        for i in range(d):
            total += 4 + zmsg_size(&self.scratch[i])
        if total > self.keybuf_cap:
            grown = <uint8_t *>realloc(self.keybuf, total)
            if grown == NULL:
                return -1
            self.keybuf = grown
            self.keybuf_cap = total
        for i in range(d):
            sz = zmsg_size(&self.scratch[i])
            self.keybuf[off] = sz & 0xFF
            self.keybuf[off + 1] = (sz >> 8) & 0xFF
            self.keybuf[off + 2] = (sz >> 16) & 0xFF
            self.keybuf[off + 3] = (sz >> 24) & 0xFF
            memcpy(self.keybuf + off + 4, zmsg_data(&self.scratch[i]), sz)
            off += 4 + sz
        self.keylen = total
        return 0

    cdef int _sess_find(self) noexcept nogil:
        """Session slot of the worker whose key is in keybuf, or -1."""
        cdef int i = aidx_find(&self.sess_index, self.keybuf, self.keylen, hash_bytes(self.keybuf, self.keylen))
        return <int>self.sess_index.ents[i].value if i >= 0 else -1

    cdef int _worker_ready(self, int s, int d, int nb) noexcept nogil:
        cdef const uint8_t *c
        cdef uint32_t credit
        if nb != 3 or zmsg_size(&self.scratch[d + 3]) != 4:
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        c = <const uint8_t *>zmsg_data(&self.scratch[d + 3])
        credit = (<uint32_t>c[0] << 24) | (<uint32_t>c[1] << 16) | (<uint32_t>c[2] << 8) | c[3]
        if credit > MAX_CREDIT:
            self._drop(DROP_WORKER_BAD_FRAMES)
            return 0
        if s < 0:
            s = self._sess_new(d)
            if s < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
        self.sess[s].credit = credit
        self.counters[CNT_READY] += 1
        self._offer(<uint32_t>s)
        return 0

    cdef int _worker_failed(self, int s, int d) noexcept nogil:
        cdef int rs
        cdef Req *r
        if zmsg_size(&self.scratch[d + 3]) != TASK_ID_SIZE:
            self._drop(DROP_ANSWER_BAD_ID)
            return 0
        rs = self.table.find(<const uint8_t *>zmsg_data(&self.scratch[d + 3]), TASK_ID_SIZE)
        if rs < 0 or s < 0 or self.table.reqs[rs].worker != s:
            # Not the attempt in progress (answered, timed out, or another worker's).
            self._drop(DROP_ANSWER_UNKNOWN)
            self._settle_ghost(s)
            return 0
        self.counters[CNT_FAILED] += 1
        self.heap.delete(<uint32_t>rs)
        self._detach(<uint32_t>rs)
        r = &self.table.reqs[rs]
        r.failed_on = s
        r.failed_on_gen = self.sess[s].gen
        if r.client:
            if r.fail == NULL:
                r.fail = <zmsg *>malloc(2 * sizeof(zmsg))
                if r.fail != NULL:
                    zmsg_init(&r.fail[0])
                    zmsg_init(&r.fail[1])
            # Without memory for the text, the outcome is still FAILED-less: TIMED_OUT.
            if r.fail != NULL:
                zmsg_move(&r.fail[0], &self.scratch[d + 4])
                zmsg_move(&r.fail[1], &self.scratch[d + 5])
        return self._retry_or_abort(<uint32_t>rs)

    # -- sessions ---------------------------------------------------------------

    cdef int _sess_new(self, int d) noexcept nogil:
        """Register the worker whose routing frames are scratch[0:d] (key in keybuf)."""
        cdef uint32_t s, ncap, i
        cdef Sess *grown
        cdef Sess *w
        cdef uint8_t *key
        cdef size_t keylen = self.keylen
        cdef uint64_t h = hash_bytes(self.keybuf, keylen)
        if self.sess_free == NO_SLOT:
            ncap = self.sess_cap * 2 if self.sess_cap else 16
            grown = <Sess *>realloc(self.sess, ncap * sizeof(Sess))
            if grown == NULL:
                return -1
            self.sess = grown
            memset(&self.sess[self.sess_cap], 0, (ncap - self.sess_cap) * sizeof(Sess))
            for i in range(self.sess_cap, ncap):
                self.sess[i].next_free = i + 1 if i + 1 < ncap else NO_SLOT
            self.sess_free = self.sess_cap
            self.sess_cap = ncap
        key = <uint8_t *>malloc(keylen if keylen else 1)
        if key == NULL:
            return -1
        memcpy(key, self.keybuf, keylen)
        s = self.sess_free
        w = &self.sess[s]
        w.env = <zmsg *>malloc((d + 1) * sizeof(zmsg))
        if w.env == NULL or aidx_insert(&self.sess_index, key, keylen, h, s) < 0:
            free(w.env)
            w.env = NULL
            free(key)
            return -1
        self.sess_free = w.next_free
        for i in range(<uint32_t>(d + 1)):
            zmsg_init(&w.env[i])
            zmsg_copy(&w.env[i], &self.scratch[i])
        w.nenv = d + 1
        w.used = True
        w.key = key
        w.keylen = keylen
        w.hash = h
        w.credit = 0
        w.inflight = 0
        w.ghosts = 0
        w.jobs = NO_SLOT
        w.expiry = self.now + self._heartbeat * self._liveness
        self.n_sessions += 1
        if self.n_sessions == 1:
            self.next_tick = self.now + self._heartbeat
            self.next_check = w.expiry
        elif w.expiry < self.next_check:
            self.next_check = w.expiry
        self.counters[CNT_WORKERS_JOINED] += 1
        self._worker_event(EV_WORKER_JOINED, s)
        return <int>s

    cdef void _sess_release(self, uint32_t s) noexcept nogil:
        cdef Sess *w = &self.sess[s]
        cdef int i = aidx_find(&self.sess_index, w.key, w.keylen, w.hash)
        if i >= 0:
            aidx_delete(&self.sess_index, i)  # frees the key
        close_msgs(w.env, w.nenv)
        free(w.env)
        w.env = NULL
        w.key = NULL
        w.nenv = 0
        w.used = False
        w.gen += 1
        w.next_free = self.sess_free
        self.sess_free = s
        self.n_sessions -= 1

    cdef void _offer(self, uint32_t s) noexcept nogil:
        """Keep the worker in the idle FIFO exactly while it has spare credit."""
        cdef Sess *w = &self.sess[s]
        cdef int slot = self.idle.find(w.key, w.keylen)
        cdef uint8_t *key
        if w.inflight < w.credit:
            if slot < 0:
                key = <uint8_t *>malloc(w.keylen if w.keylen else 1)
                if key != NULL:
                    memcpy(key, w.key, w.keylen)
                    if self.idle.push_key(key, w.keylen, NULL, 0, <int32_t>s) < 0:
                        free(key)
        elif slot >= 0:
            self.idle.remove_slot(<uint32_t>slot)

    cdef void _attach(self, uint32_t rs, uint32_t s) noexcept nogil:
        cdef Req *r = &self.table.reqs[rs]
        cdef Sess *w = &self.sess[s]
        r.worker = <int32_t>s
        r.wprev = NO_SLOT
        r.wnext = w.jobs
        if w.jobs != NO_SLOT:
            self.table.reqs[w.jobs].wprev = rs
        w.jobs = rs
        w.inflight += 1

    cdef void _detach(self, uint32_t rs, bint by_worker=True) noexcept nogil:
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
            self._offer(<uint32_t>s)
        else:
            w.ghosts += 1

    cdef void _settle_ghost(self, int s) noexcept nogil:
        """Worker s answered or failed a job that had ended without it: free that credit."""
        if s >= 0 and self.sess[s].ghosts:
            self.sess[s].ghosts -= 1
            self.sess[s].inflight -= 1
            self._offer(<uint32_t>s)

    cdef int _forget(self, uint32_t s, bint requeue=True) noexcept nogil:
        """The worker is gone: its jobs go back to the front of the queue at once
        (unless the broker is closing: requeue=False leaves them to their fate)."""
        cdef uint32_t rs, prev
        cdef int rc, result = 0
        self.sess[s].credit = 0  # so detaching its jobs does not offer it again
        self._offer(s)
        # The list holds the newest job first; requeue the oldest first, so the
        # jobs keep the order in which they were sent.
        rs = self.sess[s].jobs
        while rs != NO_SLOT and self.table.reqs[rs].wnext != NO_SLOT:
            rs = self.table.reqs[rs].wnext
        while rs != NO_SLOT:
            prev = self.table.reqs[rs].wprev
            self._detach(rs)
            if requeue:
                self.heap.delete(rs)
                self.counters[CNT_REQUEUED] += 1
                rc = self._retry_or_abort(rs)
                if rc < 0:
                    result = rc
            rs = prev
        self._sess_release(s)
        return result

    cdef int _tick(self, double now) noexcept nogil:
        """Forget workers silent past liveness, at the moment the earliest one may
        be; heartbeat the others every interval. Expiries only move later, so the
        earliest one seen in a scan is when the next scan is due."""
        cdef uint32_t s
        cdef int rc = 0
        cdef bint beat = now >= self.next_tick
        cdef double earliest = now + self._heartbeat * self._liveness
        if beat:
            self.next_tick = now + self._heartbeat
        for s in range(self.sess_cap):
            if not self.sess[s].used:
                continue
            if now >= self.sess[s].expiry:
                self.counters[CNT_WORKERS_DEAD] += 1
                self._worker_event(EV_WORKER_DEAD, s)
                rc = self._forget(s)
            else:
                if self.sess[s].expiry < earliest:
                    earliest = self.sess[s].expiry
                if beat:
                    rc = self._send_env(self.sess[s].env, self.sess[s].nenv, CMD_HEARTBEAT, False)
            if rc < 0:
                return rc
        self.next_check = earliest
        return 0

    cdef int _send_env(self, zmsg *env, int nenv, int command, bint more) noexcept nogil:
        """Send copies of env, the signature and a command to a worker; the body, if
        any, follows (more=True). Returns 0, 1 if the worker is unreachable, or -errno."""
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
        memcpy(zmsg_data(&part), WORKER_SIGNATURE, SIGNATURE_SIZE)
        if zmsg_send(&part, self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
            zmsg_close(&part)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>command
        if zmsg_send(&part, self.s_workers, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
            zmsg_close(&part)
        return 0

    # -- the FBC01 client protocol (docs/PROTOCOL.md section 10) -------------------

    cdef int _on_client(self, int n) noexcept nogil:
        cdef uint8_t command
        cdef const uint8_t *cid
        cdef CEnt *e
        cdef uint32_t v
        if n < 3 or zmsg_size(&self.scratch[2]) != 1:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        command = (<const uint8_t *>zmsg_data(&self.scratch[2]))[0]
        if command < C_SUBMIT or command > C_STATS:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if n < 4 or zmsg_size(&self.scratch[3]) != REQUEST_ID_SIZE:
            self._drop(DROP_CLIENT_BAD_ID)
            return 0
        cid = <const uint8_t *>zmsg_data(&self.scratch[3])
        if command == C_SUBMIT:
            return self._client_submit(n, cid)
        if n != 4:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        if command == C_STATS:
            return self._reply_stats(cid)
        e = cidx_find(&self.cids, cid)
        if e == NULL:
            return self._reply(&self.scratch[0], R_UNKNOWN, cid, NULL, 0)
        v = e.value
        if command == C_STATUS:
            return self._reply_status(cid, v)
        if v & DONE_BIT:
            # RESULT, or CANCEL of a finished request: its outcome.
            return self._reply_outcome(&self.scratch[0], v & ~DONE_BIT)
        if command == C_CANCEL:
            return self._cancel(v)
        if self._add_waiter(&self.table.reqs[v]) < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        return self._reply_status(cid, v)

    cdef int _client_submit(self, int n, const uint8_t *cid) noexcept nogil:
        cdef const uint8_t *o
        cdef size_t olen
        cdef uint32_t flags = 0, timeout_ms = 0, tries = 0, v
        cdef int i, s, rc = 0
        cdef Req *r
        cdef CEnt *e
        if n < 6:
            self._drop(DROP_CLIENT_BAD_COMMAND)
            return 0
        olen = zmsg_size(&self.scratch[4])
        o = <const uint8_t *>zmsg_data(&self.scratch[4])
        if olen == OPTIONS_SIZE:
            flags = o[0]
            timeout_ms = (<uint32_t>o[1] << 24) | (<uint32_t>o[2] << 16) | (<uint32_t>o[3] << 8) | o[4]
            tries = (<uint32_t>o[5] << 24) | (<uint32_t>o[6] << 16) | (<uint32_t>o[7] << 8) | o[8]
        if (olen != 0 and olen != OPTIONS_SIZE) or (flags & ~(<uint32_t>OPT_KNOWN_FLAGS)) or \
                timeout_ms > MAX_REQUEST_TIMEOUT_MS:
            return self._reject(cid, REJECT_BAD_OPTIONS, BAD_OPTIONS_TEXT)
        e = cidx_find(&self.cids, cid)
        if e != NULL:
            # The same id again: it runs once; this sender is told the outcome too.
            self.counters[CNT_DUPLICATES] += 1
            v = e.value
            if not v & DONE_BIT and self._add_waiter(&self.table.reqs[v]) < 0:
                self._drop(DROP_OUT_OF_MEMORY)
                return 0
            if not flags & OPT_NO_ACK:
                rc = self._reply(&self.scratch[0], R_ACCEPTED, cid, NULL, 0)
            if rc >= 0 and v & DONE_BIT:
                rc = self._reply_outcome(&self.scratch[0], v & ~DONE_BIT)
            return rc
        if self.n_queued >= self._max_queue:
            return self._reject(cid, REJECT_QUEUE_FULL, QUEUE_FULL_TEXT)
        s = self.table.alloc()
        if s < 0:
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        r = &self.table.reqs[s]
        # Frames kept: the sender's identity (its first waiter), then the payload.
        r.frames = <zmsg *>malloc((n - 4) * sizeof(zmsg))
        if r.frames == NULL:
            self.table.release(s)
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        if ring_push(&self.waiting, make_handle(s, r.gen)) < 0 or \
                cidx_insert(&self.cids, cid, <uint32_t>s) < 0:
            self.table.release(s)  # a ring entry already pushed turns into a tombstone
            self._drop(DROP_OUT_OF_MEMORY)
            return 0
        zmsg_init(&r.frames[0])
        zmsg_copy(&r.frames[0], &self.scratch[0])
        for i in range(5, n):
            zmsg_init(&r.frames[i - 4])
            zmsg_move(&r.frames[i - 4], &self.scratch[i])
        r.nframes = n - 4
        r.nenv = 1
        if self.n_queued or not self.idle.live:
            self._own_small_frames(&r.frames[1], n - 5)
        r.client = True
        memcpy(r.cid, cid, REQUEST_ID_SIZE)
        if tries == 0:
            r.tries_left = self._tries
        else:
            r.tries_left = <int32_t>(tries if tries < MAX_REQUEST_TRIES else MAX_REQUEST_TRIES)
        r.tries = r.tries_left
        r.timeout = self._timeout if timeout_ms == 0 else timeout_ms / 1000.0
        r.arrived = self.now
        self.n_queued += 1
        self.counters[CNT_REQUESTS] += 1
        if self.journal_on:
            self._journal_push(J_SUBMIT, cid, 0, &r.frames[1], r.nframes - 1, 0, r.tries, r.timeout)
        if not flags & OPT_NO_ACK:
            return self._reply(&self.scratch[0], R_ACCEPTED, cid, NULL, 0)
        return 0

    cdef int _reject(self, const uint8_t *cid, int reason, const char *text) noexcept nogil:
        cdef zmsg extra[2]
        cdef size_t n = strlen(text)
        cdef int rc
        self.counters[CNT_REJECTED] += 1
        zmsg_init_size(&extra[0], 1)
        (<uint8_t *>zmsg_data(&extra[0]))[0] = <uint8_t>reason
        zmsg_init_size(&extra[1], n)
        memcpy(zmsg_data(&extra[1]), text, n)
        rc = self._reply(&self.scratch[0], R_REJECTED, cid, extra, 2)
        close_msgs(extra, 2)
        return rc

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
                return -e if e == ZETERM else 0
        return 0

    cdef bint _is_waiter(self, Req *r) noexcept nogil:
        """Whether the current message's sender (scratch[0]) is one of r's waiters."""
        cdef int i
        cdef zmsg *me = &self.scratch[0]
        cdef size_t sz = zmsg_size(me)
        for i in range(r.nenv):
            if zmsg_size(&r.frames[i]) == sz and memcmp(zmsg_data(&r.frames[i]), zmsg_data(me), sz) == 0:
                return True
        return False

    cdef int _add_waiter(self, Req *r) noexcept nogil:
        """Make the current message's sender (scratch[0]) one of r's waiters."""
        cdef int i
        cdef zmsg *grown
        cdef zmsg *me = &self.scratch[0]
        if self._is_waiter(r):
            return 0
        if r.nenv == MAX_WAITERS:
            # Full: the oldest waiter gives way.
            for i in range(1, r.nenv):
                zmsg_move(&r.frames[i - 1], &r.frames[i])
            zmsg_copy(&r.frames[r.nenv - 1], me)
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
        r.nenv += 1
        r.nframes += 1
        return 0

    cdef int _reply(self, zmsg *identity, int code, const uint8_t *cid, zmsg *body, int nbody) noexcept nogil:
        """Send [identity, FBC01, code, cid, body...] to a client; every frame is a
        copy (shared buffer). A client that is gone or not reading loses it."""
        cdef zmsg part
        cdef int i, rc
        zmsg_init(&part)
        zmsg_copy(&part, identity)
        rc = self._emit(&part, True)
        if rc != 0:
            return rc if rc < 0 else 0
        zmsg_init_size(&part, SIGNATURE_SIZE)
        memcpy(zmsg_data(&part), CLIENT_SIGNATURE, SIGNATURE_SIZE)
        self._emit(&part, True)
        zmsg_init_size(&part, 1)
        (<uint8_t *>zmsg_data(&part))[0] = <uint8_t>code
        self._emit(&part, True)
        zmsg_init_size(&part, REQUEST_ID_SIZE)
        memcpy(zmsg_data(&part), cid, REQUEST_ID_SIZE)
        self._emit(&part, nbody > 0)
        for i in range(nbody):
            zmsg_init(&part)
            zmsg_copy(&part, &body[i])
            self._emit(&part, i + 1 < nbody)
        return 0

    cdef int _emit(self, zmsg *part, bint more) noexcept nogil:
        """Send one part of a reply to a client, or, with the journal on, hold it
        until release_held(). Returns 0, 1 if it could not go (peer gone, HWM), or
        -errno; the part is consumed either way."""
        cdef zmsg *grown
        cdef uint8_t *gmore
        cdef size_t ncap
        cdef int e
        if not self.journal_on:
            if zmsg_send(part, self.s_requests, (ZSNDMORE if more else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(part)
                return -e if e == ZETERM else 1
            return 0
        if self.nheld == self.held_cap:
            ncap = self.held_cap * 2 if self.held_cap else 256
            grown = <zmsg *>realloc(self.held, ncap * sizeof(zmsg))
            if grown != NULL:
                self.held = grown
                gmore = <uint8_t *>realloc(self.held_more, ncap)
                if gmore != NULL:
                    self.held_more = gmore
                    self.held_cap = ncap
            if self.nheld == self.held_cap:
                zmsg_close(part)
                return 1
        zmsg_init(&self.held[self.nheld])
        zmsg_move(&self.held[self.nheld], part)
        zmsg_close(part)
        self.held_more[self.nheld] = more
        self.nheld += 1
        return 0

    cdef void _journal_push(self, int kind, const uint8_t *cid, int code, zmsg *frames, int nframes,
                            uint32_t attempts, int32_t tries, double timeout) noexcept nogil:
        cdef JEnt *grown
        cdef JEnt *j
        cdef size_t ncap
        cdef int i
        if self.jcount == self.jcap:
            ncap = self.jcap * 2 if self.jcap else 256
            grown = <JEnt *>realloc(self.jents, ncap * sizeof(JEnt))
            if grown == NULL:
                self.journal_lost = True  # the store cannot be trusted now: run() says so
                return
            self.jents = grown
            self.jcap = ncap
        j = &self.jents[self.jcount]
        j.frames = NULL
        if nframes:
            j.frames = <zmsg *>malloc(nframes * sizeof(zmsg))
            if j.frames == NULL:
                self.journal_lost = True
                return
        self.jcount += 1
        j.kind = <uint8_t>kind
        j.code = <uint8_t>code
        memcpy(j.cid, cid, REQUEST_ID_SIZE)
        j.attempts = attempts
        j.tries = tries
        j.timeout = timeout
        j.nframes = nframes
        for i in range(nframes):
            zmsg_init(&j.frames[i])
            zmsg_copy(&j.frames[i], &frames[i])

    cdef int _reply_outcome(self, zmsg *identity, uint32_t d) noexcept nogil:
        return self._reply(identity, self.done[d].code, self.done[d].cid, self.done[d].body, self.done[d].nbody)

    cdef int _reply_stats(self, const uint8_t *cid) noexcept nogil:
        cdef uint64_t v[N_STATS]
        cdef uint64_t count = 0
        cdef zmsg body[2]
        cdef uint8_t *p
        cdef int i, k, rc
        cdef const char *names = self.names_ptr
        cdef size_t nlen = self.names_len
        for i in range(N_COUNTERS):
            v[i] = self.counters[i]
        v[N_COUNTERS] = self.n_queued
        v[N_COUNTERS + 1] = self.table.count - self.n_queued
        v[N_COUNTERS + 2] = self.idle.live
        v[N_COUNTERS + 3] = self.n_sessions
        v[N_COUNTERS + 4] = self.done_fifo.count
        v[N_COUNTERS + 5] = self.retained_bytes
        for i in range(N_LATENCY):
            v[N_COUNTERS + N_GAUGES + i] = self.latency_counts[i]
            count += self.latency_counts[i]
        v[N_STATS - 2] = count
        v[N_STATS - 1] = <uint64_t>(self.latency_sum * 1e6)
        zmsg_init_size(&body[0], nlen)
        memcpy(zmsg_data(&body[0]), names, nlen)
        zmsg_init_size(&body[1], 8 * N_STATS)
        p = <uint8_t *>zmsg_data(&body[1])
        for i in range(N_STATS):
            for k in range(8):
                p[8 * i + k] = (v[i] >> (56 - 8 * k)) & 0xFF
        rc = self._reply(&self.scratch[0], R_STATS, cid, body, 2)
        close_msgs(body, 2)
        return rc

    cdef int _reply_status(self, const uint8_t *cid, uint32_t v) noexcept nogil:
        cdef zmsg body[3]
        cdef uint8_t *p
        cdef uint32_t attempts, tries
        cdef int state, rc, i
        if v & DONE_BIT:
            state = STATE_DONE
            attempts = self.done[v & ~DONE_BIT].attempts
            tries = <uint32_t>max(self.done[v & ~DONE_BIT].tries, 0)
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
        rc = self._reply(&self.scratch[0], R_STATUS, cid, body, 3)
        close_msgs(body, 3)
        return rc

    cdef int _cancel(self, uint32_t rs) noexcept nogil:
        """The client (scratch[0]) cancelled request rs."""
        cdef Req *r = &self.table.reqs[rs]
        cdef zmsg part
        cdef int rc
        if r.state == QUEUED:
            # Its queue entry turns into a tombstone when the slot is released.
            self.n_queued -= 1
        else:
            self.heap.delete(rs)
            if r.worker >= 0:
                # Tell its FBW01 worker, which may abandon the job; the credit stays
                # taken (a ghost) until the worker answers or fails it.
                rc = self._send_env(self.sess[r.worker].env, self.sess[r.worker].nenv, CMD_CANCEL, True)
                if rc < 0:
                    return rc
                if rc == 0:
                    zmsg_init_size(&part, TASK_ID_SIZE)
                    self.table.write_id(rs, <uint8_t *>zmsg_data(&part))
                    if zmsg_send(&part, self.s_workers, ZDONTWAIT) < 0:
                        zmsg_close(&part)
            self._detach(rs, False)
        self.counters[CNT_CANCELLED] += 1
        rc = self._conclude(r, R_CANCELLED, NULL, 0)
        # Not made a waiter: on a full list it would push out a submitter.
        if rc >= 0 and not self._is_waiter(r):
            rc = self._reply(&self.scratch[0], R_CANCELLED, r.cid, NULL, 0)
        self.table.release(rs)
        return rc

    cdef int _conclude(self, Req *r, int code, zmsg *body, int nbody) noexcept nogil:
        """Tell every waiter of a finished FBC01 request its outcome, and keep the
        outcome for RESULT (the caller releases the request)."""
        cdef int w, rc, result = 0
        cdef CEnt *e
        for w in range(r.nenv):
            rc = self._reply(&r.frames[w], code, r.cid, body, nbody)
            if rc < 0:
                result = rc
        e = cidx_find(&self.cids, r.cid)
        if e == NULL:
            return result
        if self.journal_on:
            self._journal_push(J_FINISH, r.cid, code, body, nbody, r.attempts, r.tries, 0.0)
        self._keep(e, r.cid, code, body, nbody, r.attempts, r.tries, self.now)
        return result

    cdef void _keep(self, CEnt *e, const uint8_t *cid, int code, zmsg *body, int nbody,
                    uint32_t attempts, int32_t tries, double finished) noexcept nogil:
        """Keep an outcome for RESULT; cids entry e (the id's) then points to it."""
        cdef int w
        cdef uint32_t d, ncap
        cdef size_t size = RESULT_OVERHEAD, sz
        cdef Done *grown
        cdef Done *o
        for w in range(nbody):
            size += zmsg_size(&body[w])
        if self.retention <= 0 or size > self.retention_bytes:
            # Not kept (too big alone: forgotten at once, the others stay).
            cidx_delete(&self.cids, e)
            if self.retention > 0:
                self.counters[CNT_EXPIRED_RESULTS] += 1
            if self.journal_on:
                self._journal_push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)
            return
        if self.done_free == NO_SLOT and self.done_used == self.done_cap:
            # Only realloc, as for requests: slots are set up when first used.
            ncap = self.done_cap * 2 if self.done_cap else 64
            grown = <Done *>realloc(self.done, ncap * sizeof(Done))
            if grown == NULL:
                self._not_kept(e, cid)
                return
            self.done = grown
            self.done_cap = ncap
        d = self.done_free if self.done_free != NO_SLOT else self.done_used
        o = &self.done[d]
        o.body = NULL
        if nbody:
            o.body = <zmsg *>malloc(nbody * sizeof(zmsg))
        if (nbody and o.body == NULL) or ring_push(&self.done_fifo, d) < 0:
            free(o.body)
            o.body = NULL
            self._not_kept(e, cid)
            return
        if d == self.done_free:
            self.done_free = o.next_free
        else:
            self.done_used += 1
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
            self._forget_first_outcome()

    cdef void _not_kept(self, CEnt *e, const uint8_t *cid) noexcept nogil:
        # Out of memory: the id is unknown again (and so in the store).
        cidx_delete(&self.cids, e)
        if self.journal_on:
            self._journal_push(J_FORGET, cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void _forget_first_outcome(self) noexcept nogil:
        cdef uint32_t d = <uint32_t>ring_front(&self.done_fifo)
        cdef Done *o = &self.done[d]
        cdef CEnt *e = cidx_find(&self.cids, o.cid)
        ring_drop_front(&self.done_fifo)
        if e != NULL:
            cidx_delete(&self.cids, e)
        close_msgs(o.body, o.nbody)
        free(o.body)
        o.body = NULL
        o.nbody = 0
        self.retained_bytes -= o.size
        o.next_free = self.done_free
        self.done_free = d
        self.counters[CNT_EXPIRED_RESULTS] += 1
        if self.journal_on:
            self._journal_push(J_FORGET, o.cid, 0, NULL, 0, 0, 0, 0.0)

    cdef void _forget_outcomes(self, double now) noexcept nogil:
        while self.done_fifo.count and \
                self.done[<uint32_t>ring_front(&self.done_fifo)].finished + self.retention <= now:
            self._forget_first_outcome()

    # -- answers ------------------------------------------------------------------

    cdef int _on_answer(self, int n) noexcept nogil:
        if n < 2:
            self._drop(DROP_ANSWER_TOO_SHORT)
            return 0
        return self._answer(&self.scratch[0], &self.scratch[1], n - 1, -1)

    cdef int _answer(self, zmsg *tid, zmsg *body, int nbody, int from_s) noexcept nogil:
        """Deliver the first answer for a task; later ones are dropped. from_s is
        the answering DEALER worker's session, -1 for a PUSH answer."""
        cdef int s, rc
        cdef bint own
        cdef Req *r
        if zmsg_size(tid) != TASK_ID_SIZE:
            self._drop(DROP_ANSWER_BAD_ID)
            return 0
        s = self.table.find(<const uint8_t *>zmsg_data(tid), TASK_ID_SIZE)
        if s < 0:
            self._drop(DROP_ANSWER_UNKNOWN)
            self._settle_ghost(from_s)
            return 0
        r = &self.table.reqs[s]
        own = from_s >= 0 and r.worker == from_s
        if not own:
            self._settle_ghost(from_s)
        rc = self._send_to_client(r, body, nbody)
        self._record_latency(self.now - r.arrived)
        if r.state == QUEUED:
            # Answered by an earlier attempt while waiting for a retry: the queue
            # entry turns into a tombstone when the slot's generation moves on.
            self.n_queued -= 1
            self.counters[CNT_LATE_ANSWERS] += 1
        else:
            self.heap.delete(<uint32_t>s)
            self._detach(<uint32_t>s, own)
        self.table.release(<uint32_t>s)
        self.counters[CNT_ANSWERED] += 1
        return rc

    cdef void _record_latency(self, double seconds) noexcept nogil:
        cdef int i = 0
        while i < N_LATENCY - 1 and seconds > LATENCY_BOUNDS[i]:
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum += seconds

    cdef int _send_to_client(self, Req *r, zmsg *body, int nbody) noexcept nogil:
        """Send r's envelope, the empty delimiter, then body (moved). A client that
        is gone or not reading loses its answer: ROUTER drops it, as in the
        original broker."""
        cdef int i, e
        cdef zmsg delimiter
        if r.client:
            return self._conclude(r, R_OK, body, nbody)
        for i in range(r.nenv):
            if zmsg_send(&r.frames[i], self.s_requests, ZSNDMORE | ZDONTWAIT) < 0:
                e = zerrno()
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

    cdef int _expire(self, double now) noexcept nogil:
        cdef uint32_t s
        cdef int rc
        while self.heap.count and self.heap.ents[0].deadline <= now:
            s = self.heap.pop_min()
            self.counters[CNT_TIMEOUTS] += 1
            self._detach(s, False)
            rc = self._retry_or_abort(s)
            if rc < 0:
                return rc
        return 0

    cdef int _retry_or_abort(self, uint32_t s) noexcept nogil:
        """An attempt ended without an answer: queue the job ahead of new requests,
        or, with no tries left, send the client the empty answer."""
        cdef Req *r = &self.table.reqs[s]
        cdef zmsg empty
        cdef uint8_t tid[TASK_ID_SIZE]
        cdef int rc
        # Without memory to requeue, give up on the job rather than lose track of it.
        if r.tries_left == 0 or ring_push(&self.retry, make_handle(s, r.gen)) < 0:
            if not r.client:
                if self.ev_on:
                    self.table.write_id(s, tid)
                    self._event(EV_ABORTED, tid, TASK_ID_SIZE, r.attempts)
                zmsg_init(&empty)
                rc = self._send_to_client(r, &empty, 1)
                zmsg_close(&empty)
            elif r.fail != NULL:
                self._event(EV_FAILED, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self._conclude(r, R_FAILED, r.fail, 2)
            else:
                self._event(EV_TIMED_OUT, r.cid, REQUEST_ID_SIZE, r.attempts)
                rc = self._conclude(r, R_TIMED_OUT, NULL, 0)
            self.table.release(s)
            self.counters[CNT_ABORTED] += 1
            return rc
        r.state = QUEUED
        self.n_queued += 1
        self.counters[CNT_RETRIED] += 1
        return 0

    cdef Ring *_next_queue(self) noexcept nogil:
        """The queue whose front is the request to dispatch next, or NULL.
        Tombstones met on the way are dropped."""
        cdef Ring *q = &self.retry
        cdef uint64_t h
        while True:
            while q.count:
                h = ring_front(q)
                if self.table.live(h) and self.table.reqs[<uint32_t>(h >> 32)].state == QUEUED:
                    return q
                ring_drop_front(q)
            if q == &self.waiting:
                return NULL
            q = &self.waiting

    cdef int _dispatch(self, double now) noexcept nogil:
        cdef int s, w, w2, i, e, nenv, sidx, rc
        cdef Req *r
        cdef Wk *wk
        cdef zmsg part
        cdef Ring *q
        while self.idle.live:
            q = self._next_queue()
            if q == NULL:
                return 0
            s = <int>(ring_front(q) >> 32)
            w = self.idle.pop_slot()
            if w < 0:
                return 0
            sidx = self.idle.slots[w].session
            r = &self.table.reqs[s]
            if sidx >= 0 and r.failed_on == sidx and r.failed_on_gen == self.sess[sidx].gen and self.idle.live:
                # Retry a failed job on another worker when one is idle.
                w2 = self.idle.pop_slot()
                self.idle.release(w)
                self._offer(<uint32_t>sidx)
                w = w2
                sidx = self.idle.slots[w].session
            wk = &self.idle.slots[w]
            # ROUTER_MANDATORY makes the first frame fail for a worker that is gone;
            # the job then stays at the front for the next idle worker.
            if sidx >= 0:
                self.idle.release(w)
                rc = self._send_env(self.sess[sidx].env, self.sess[sidx].nenv, CMD_TASK, True)
                if rc < 0:
                    return rc
                if rc == 1:
                    self.counters[CNT_UNREACHABLE_WORKERS] += 1
                    self.counters[CNT_WORKERS_DEAD] += 1
                    self._worker_event(EV_WORKER_DEAD, <uint32_t>sidx)
                    rc = self._forget(<uint32_t>sidx)
                    if rc < 0:
                        return rc
                    continue
            else:
                if zmsg_send(&wk.env[0], self.s_workers, ZSNDMORE | ZDONTWAIT) < 0:
                    e = zerrno()
                    self.idle.release(w)
                    if e == ZETERM:
                        return -e
                    self.counters[CNT_UNREACHABLE_WORKERS] += 1
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
            self.n_queued -= 1
            r.state = RUNNING
            r.attempts += 1
            if self.journal_on and r.client:
                self._journal_push(J_START, r.cid, 0, NULL, 0, r.attempts, 0, 0.0)
            r.failed_on = -1
            if r.tries_left > 0:
                r.tries_left -= 1
            if r.timeout >= 0:
                # Without memory for a deadline the attempt simply has none.
                self.heap.insert(<uint32_t>s, now + r.timeout)
            if sidx >= 0:
                self._attach(<uint32_t>s, <uint32_t>sidx)
                self._offer(<uint32_t>sidx)
            self.counters[CNT_DISPATCHED] += 1
        return 0
