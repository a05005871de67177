# core/journal.pxi: Journal, the durable store's side of the core: the FBC01 changes
# of this turn, and the FBC01 replies held until the store has them.
#
# Owns: its entries (JEnt in _core.pxd) with their shared frame copies, and the held
# reply parts.
# Touches: the requests socket it is given in release(). Written by ClientSide,
# KeptOutcomes and WorkerSide (dispatch); read by BrokerCore.journal_take/release_held.


cdef class Journal:
    """Journal on: FBC01 changes are recorded for take(), every FBC01 reply is held
    until release(), and run() returns RUN_JOURNAL after a turn that left either."""

    def __dealloc__(self):
        self.clear()
        free(self.ents)
        self.drop_held()
        free(self.held)
        free(self.held_more)

    cdef JEnt *add(self, int kind, const uint8_t *cid, int code, int nframes, uint32_t attempts,
                   int32_t tries, double timeout) noexcept nogil:
        """A new entry with room for nframes frames (to be set up by the caller), or
        NULL when out of memory (then `lost`: run() says so)."""
        cdef JEnt *grown
        cdef JEnt *j
        cdef size_t ncap
        if self.count == self.cap:
            ncap = self.cap * 2 if self.cap else 256
            grown = <JEnt *>realloc(self.ents, ncap * sizeof(JEnt))
            if grown == NULL:
                self.lost = True  # the store cannot be trusted now
                return NULL
            self.ents = grown
            self.cap = ncap
        j = &self.ents[self.count]
        j.frames = NULL
        if nframes:
            j.frames = <zmsg *>malloc(nframes * sizeof(zmsg))
            if j.frames == NULL:
                self.lost = True
                return NULL
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
        if j == NULL:
            return
        for i in range(nframes):
            zmsg_init(&j.frames[i])
            zmsg_copy(&j.frames[i], &frames[i])

    cdef void push_finish(self, const uint8_t *cid, int code, zmsg *body, int nbody, zmsg *payload,
                          int npayload, uint32_t attempts, int32_t tries, double timeout) noexcept nogil:
        """A J_FINISH entry: the outcome's body frames, then a dead request's payload
        (npayload frames; 0 for another outcome)."""
        cdef int i
        cdef JEnt *j = self.add(J_FINISH, cid, code, nbody + npayload, attempts, tries, timeout)
        if j == NULL:
            return
        j.nbody = nbody
        for i in range(nbody):
            zmsg_init(&j.frames[i])
            zmsg_copy(&j.frames[i], &body[i])
        for i in range(npayload):
            zmsg_init(&j.frames[nbody + i])
            zmsg_copy(&j.frames[nbody + i], &payload[i])

    cdef void clear(self) noexcept nogil:
        cdef size_t i
        for i in range(self.count):
            close_msgs(self.ents[i].frames, self.ents[i].nframes)
            free(self.ents[i].frames)
        self.count = 0

    cdef list take(self):
        """The changes since the last call, in order:
        ("submit", id, payload frames, timeout (s or None), tries (-1: unlimited)),
        ("start", id, attempts), ("finish", id, reply code, body frames, attempts, tries,
        payload frames (a dead request's, else []), timeout (s or None)), ("forget", id).
        MemoryError if changes were lost for lack of memory."""
        cdef size_t i
        cdef JEnt *j
        if self.lost:
            self.clear()
            raise MemoryError("fastbroker: journal entries lost for lack of memory")
        result = []
        for i in range(self.count):
            j = &self.ents[i]
            cid = (<char *>j.cid)[:REQUEST_ID_SIZE]
            frames = [(<char *>zmsg_data(&j.frames[k]))[:zmsg_size(&j.frames[k])] for k in range(j.nframes)]
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
