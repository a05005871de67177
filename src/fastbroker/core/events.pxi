# core/events.pxi: Events, the worker and abort events kept for the log
# (BrokerCore.record_events / events).
#
# Owns: the event queue (Ev in _core.pxd), EVENT_QUEUE entries once turned on.
# Touches: Counters (CNT_EVENTS_LOST when the queue is full).


cdef class Events:
    """Events since the last take(), oldest first; none are kept while off."""

    def __cinit__(self, Counters counters):
        self.counters = counters

    def __dealloc__(self):
        free(self.queue)

    cdef void push(self, int kind, const uint8_t *data, size_t n, uint32_t number) noexcept nogil:
        cdef Ev *e
        if not self.on:
            return
        if self.count == EVENT_QUEUE:
            self.counters.add(CNT_EVENTS_LOST)
            return
        e = &self.queue[self.count]
        self.count += 1
        e.kind = <uint8_t>kind
        e.len = <uint8_t>(n if n < EVENT_DATA_MAX else EVENT_DATA_MAX)
        e.n = number
        memcpy(e.data, data, e.len)

    cdef int record(self, bint on) except -1:
        if on and self.queue == NULL:
            self.queue = <Ev *>malloc(EVENT_QUEUE * sizeof(Ev))
            if self.queue == NULL:
                raise MemoryError()
        self.on = on
        if not on:
            self.count = 0
        return 0

    cdef list take(self):
        result = [(protocol.EVENT_KINDS[self.queue[i].kind], (<char *>self.queue[i].data)[:self.queue[i].len],
                   self.queue[i].n)
                  for i in range(self.count)]
        self.count = 0
        return result
