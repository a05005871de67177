# core/job_queue.pxi: JobQueue, the requests waiting for a worker, and what a request
# queued without options of its own gets (timeout, tries), and how many may wait.
#
# Owns: the rings `waiting` (new requests, FIFO) and `retry` (requests whose attempt
# ended unanswered: timed out, FAILED, or their FBW01 worker forgotten; served first),
# and `count`, the number of QUEUED requests.
# Touches: RequestTable, read only (a handle is live while its slot's generation and
# state say so). Requests enter through ClientSide, BrokerCore (REQ clients) and
# Attempts (retries); WorkerSide.dispatch takes them out.


cdef class JobQueue:
    """Queued requests as handles (slot << 32 | generation): a handle whose request
    was answered or cancelled meanwhile is a tombstone, dropped at the front."""

    def __cinit__(self, RequestTable table, timeout, tries, max_queue):
        self.table = table
        self.timeout = -1.0 if timeout is None else timeout
        self.tries = -1 if tries is None else tries
        self.limit = <size_t>-1 if max_queue is None else max_queue

    def __dealloc__(self):
        ring_clear(&self.waiting)
        ring_clear(&self.retry)

    cdef inline int push(self, uint32_t s) noexcept nogil:
        """Append request s to `waiting`; -1 when out of memory."""
        return ring_push(&self.waiting, make_handle(s, self.table.reqs[s].gen))

    cdef inline int requeue(self, uint32_t s) noexcept nogil:
        """Append request s to `retry`; -1 when out of memory."""
        return ring_push(&self.retry, make_handle(s, self.table.reqs[s].gen))

    cdef inline bint full(self) noexcept nogil:
        return self.count >= self.limit

    cdef Ring *next(self) noexcept nogil:
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

    cdef void clear(self) noexcept nogil:
        """Forget every queued request (closing); the rings keep their memory until
        the queue is freed."""
        ring_empty(&self.waiting)
        ring_empty(&self.retry)
        self.count = 0
