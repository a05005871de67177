# core/journal.pxi: Journal, the durable store's side of the core: the FBC01 changes
# of this turn, and the FBC01 replies held until the store has them.
#
# Owns: its entries (JEnt in _core.pxd) with their shared frame copies, and the held
# reply parts.
# Touches: the requests socket it is given in release(). Written by ClientSide,
# KeptOutcomes and WorkerSide (dispatch); read by BrokerCore.journal_take/release_held.


cdef inline size_t log_body_size(JEnt *j, zmsg *frames) noexcept nogil:
    cdef size_t size
    cdef int k
    if j.kind == J_SUBMIT:
        size = LOG_SUBMIT_SIZE
    elif j.kind == J_START:
        size = LOG_START_SIZE
    elif j.kind == J_FINISH:
        size = LOG_FINISH_SIZE
    else:
        size = LOG_FORGET_SIZE
    for k in range(j.nframes):
        size += LOG_FRAME_HEAD + zmsg_size(&frames[k])
    return size


cdef size_t log_record(JEnt *j, zmsg *frames, uint8_t *out, double now) noexcept nogil:
    """Write j (its frames at `frames`) as one record at out (room for LOG_RECORD_HEAD
    + log_body_size(j, frames)); returns its size."""
    cdef uint8_t *body = out + LOG_RECORD_HEAD
    cdef uint8_t *at = body + LOG_ENTRY_SIZE
    cdef size_t size, n
    cdef int k
    cdef double timeout = j.timeout if j.timeout >= 0 else -1.0
    body[0] = j.kind
    body[1] = j.code if j.kind == J_FINISH else 0
    body[2] = 0
    body[3] = 0
    memcpy(body + 4, j.cid, REQUEST_ID_SIZE)
    if j.kind == J_SUBMIT:
        fb_put_u32(at, j.attempts)
        fb_put_i32(at + 4, j.tries)
        fb_put_f64(at + 8, timeout)
        fb_put_u32(at + 16, <uint32_t>j.nframes)
        at += LOG_SUBMIT_SIZE - LOG_ENTRY_SIZE
    elif j.kind == J_START:
        fb_put_u32(at, j.attempts)
        at += LOG_START_SIZE - LOG_ENTRY_SIZE
    elif j.kind == J_FINISH:
        fb_put_u32(at, j.attempts)
        fb_put_i32(at + 4, j.tries)
        fb_put_f64(at + 8, timeout)
        fb_put_f64(at + 16, now)
        fb_put_u32(at + 24, <uint32_t>j.nbody)
        fb_put_u32(at + 28, <uint32_t>(j.nframes - j.nbody))
        at += LOG_FINISH_SIZE - LOG_ENTRY_SIZE
    for k in range(j.nframes):
        n = zmsg_size(&frames[k])
        fb_put_u32(at, <uint32_t>n)
        memcpy(at + LOG_FRAME_HEAD, zmsg_data(&frames[k]), n)
        at += LOG_FRAME_HEAD + n
    size = <size_t>(at - body)
    fb_put_u32(out, <uint32_t>size)
    fb_put_u32(out + 4, fb_crc32(body, size))
    return LOG_RECORD_HEAD + size


cdef class Journal:
    """Journal on: FBC01 changes are recorded for take(), every FBC01 reply is held
    until release(), and run() returns RUN_JOURNAL after a turn that left either."""

    def __dealloc__(self):
        self.clear()
        free(self.ents)
        free(self.frames)
        self.drop_held()
        free(self.held)
        free(self.held_more)

    cdef JEnt *add(self, int kind, const uint8_t *cid, int code, int nframes, uint32_t attempts,
                   int32_t tries, double timeout) noexcept nogil:
        """A new entry with room for nframes frames at self.frames[j.first] (to be set up
        by the caller before the next add), or NULL when out of memory (then `lost`:
        run() says so)."""
        cdef JEnt *grown
        cdef JEnt *j
        cdef zmsg *more
        cdef size_t ncap
        if self.nframes + <size_t>nframes > self.frames_cap:
            # One pool of frames for the turn's entries, not a malloc each. A zmq_msg_t
            # may be moved as bytes (held parts are too): it holds no pointer to itself.
            ncap = max(self.frames_cap * 2, self.nframes + <size_t>nframes, 256)
            more = <zmsg *>realloc(self.frames, ncap * sizeof(zmsg))
            if more == NULL:
                self.lost = True
                return NULL
            self.frames = more
            self.frames_cap = ncap
        if self.count == self.cap:
            ncap = self.cap * 2 if self.cap else 256
            grown = <JEnt *>realloc(self.ents, ncap * sizeof(JEnt))
            if grown == NULL:
                self.lost = True  # the store cannot be trusted now
                return NULL
            self.ents = grown
            self.cap = ncap
        j = &self.ents[self.count]
        j.first = self.nframes
        self.nframes += <size_t>nframes
        self.count += 1
        j.kind = <uint8_t>kind
        j.code = <uint8_t>code
        memcpy(j.cid, cid, REQUEST_ID_SIZE)
        j.attempts = attempts
        j.tries = tries
        j.timeout = timeout
        j.nframes = nframes
        j.nbody = nframes
        return j

    cdef void push(self, int kind, const uint8_t *cid, int code, zmsg *frames, int nframes,
                   uint32_t attempts, int32_t tries, double timeout) noexcept nogil:
        cdef int i
        cdef JEnt *j = self.add(kind, cid, code, nframes, attempts, tries, timeout)
        cdef zmsg *mine
        if j == NULL:
            return
        mine = &self.frames[j.first]
        for i in range(nframes):
            zmsg_init(&mine[i])
            zmsg_copy(&mine[i], &frames[i])

    cdef void push_finish(self, const uint8_t *cid, int code, zmsg *body, int nbody, zmsg *payload,
                          int npayload, uint32_t attempts, int32_t tries, double timeout) noexcept nogil:
        """A J_FINISH entry: the outcome's body frames, then a dead request's payload
        (npayload frames; 0 for another outcome)."""
        cdef int i
        cdef JEnt *j = self.add(J_FINISH, cid, code, nbody + npayload, attempts, tries, timeout)
        cdef zmsg *mine
        if j == NULL:
            return
        j.nbody = nbody
        mine = &self.frames[j.first]
        for i in range(nbody):
            zmsg_init(&mine[i])
            zmsg_copy(&mine[i], &body[i])
        for i in range(npayload):
            zmsg_init(&mine[nbody + i])
            zmsg_copy(&mine[nbody + i], &payload[i])

    cdef void clear(self) noexcept nogil:
        close_msgs(self.frames, <int>self.nframes)
        self.nframes = 0
        self.count = 0

    cdef list take(self):
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries,
        payload frames (a dead request's, else []), timeout (s or None)), ("forget", id).
        MemoryError if changes were lost for lack of memory."""
        cdef size_t i
        cdef JEnt *j
        cdef zmsg *mine
        if self.lost:
            self.clear()
            raise MemoryError("fastbroker: journal entries lost for lack of memory")
        result = []
        for i in range(self.count):
            j = &self.ents[i]
            mine = &self.frames[j.first]
            cid = (<char *>j.cid)[:REQUEST_ID_SIZE]
            frames = [(<char *>zmsg_data(&mine[k]))[:zmsg_size(&mine[k])] for k in range(j.nframes)]
            if j.kind == J_SUBMIT:
                result.append(("submit", cid, frames, None if j.timeout < 0 else j.timeout, j.tries))
            elif j.kind == J_START:
                result.append(("start", cid, j.attempts))
            elif j.kind == J_FINISH:
                result.append(("finish", cid, bytes([j.code]), frames[:j.nbody], j.attempts, j.tries,
                               frames[j.nbody:], None if j.timeout < 0 else j.timeout))
            else:
                result.append(("forget", cid))
        self.clear()
        return result

    cdef bytes encode(self, double now):
        """The changes since the last call as the log store's records (protocol.py, "The
        store's log"), each finish stamped `now` (Unix time); b"" if none. One bytes
        object a turn, written in C: the same bytes as log_records.encode_entries(take(),
        now). MemoryError as take()."""
        cdef size_t i, body, total = 0
        cdef uint8_t *out
        if self.lost:
            self.clear()
            raise MemoryError("fastbroker: journal entries lost for lack of memory")
        if self.count == 0:
            return b""
        for i in range(self.count):
            body = log_body_size(&self.ents[i], &self.frames[self.ents[i].first])
            if body > LOG_MAX_BODY:
                self.clear()
                raise OSError(EFBIG, "a change of more than 4 GiB cannot be stored")
            total += LOG_RECORD_HEAD + body
        blob = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)
        out = <uint8_t *>PyBytes_AS_STRING(blob)
        for i in range(self.count):
            out += log_record(&self.ents[i], &self.frames[self.ents[i].first], out, now)
        self.clear()
        return blob

    cdef int hold(self, zmsg *part, bint more) noexcept nogil:
        """Keep one part of a reply until release(). Returns 0, or 1 when out of
        memory (the part is then lost); the part is consumed either way."""
        cdef zmsg *grown
        cdef uint8_t *gmore
        cdef size_t ncap
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

    cdef int release(self, void *sock, Counters counters) except -1:
        """Send the replies held since the last call on sock; returns how many messages.
        A reply whose client is gone or not reading is counted (counters.reply_lost)."""
        cdef size_t i
        cdef int e, count = 0
        cdef bint first = True, skip = False
        for i in range(self.nheld):
            if skip:
                zmsg_close(&self.held[i])
            elif zmsg_send(&self.held[i], sock, (ZSNDMORE if self.held_more[i] else 0) | ZDONTWAIT) < 0:
                e = zerrno()
                zmsg_close(&self.held[i])
                if e == ZETERM:
                    close_msgs(&self.held[i + 1], <int>(self.nheld - i - 1))
                    self.nheld = 0
                    raise zmq.ZMQError(e)
                if first:
                    counters.reply_lost(e)
                skip = first  # a client that is gone loses the whole reply
            if not self.held_more[i]:
                count += 1
                first = True
                skip = False
            else:
                first = False
        self.nheld = 0
        return count

    cdef void drop_held(self) noexcept nogil:
        close_msgs(self.held, <int>self.nheld)
        self.nheld = 0

    cdef inline bint pending(self) noexcept nogil:
        """Whether run() must return RUN_JOURNAL: changes or replies wait, or were lost."""
        return self.count or self.nheld or self.lost
