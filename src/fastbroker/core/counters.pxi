# core/counters.pxi: Counters, what the broker counts: the COUNTERS of protocol.py,
# dropped messages by reason, and the latency histogram of answered requests.
#
# Owns: its arrays (zeroed with the object).
# Touches: nothing else. Every part that counts holds a reference to the one instance.

cdef double LATENCY_BOUNDS[N_LATENCY - 1]
for _i, _b in enumerate(protocol.LATENCY_BOUNDS):
    LATENCY_BOUNDS[_i] = _b


cdef class Counters:
    """Counters since start, by index (CNT_*), with drops and latency."""

    def __cinit__(self):
        self.last_drop = -1

    cdef inline void add(self, int which) noexcept nogil:
        self.counts[which] += 1

    cdef inline void drop(self, int reason) noexcept nogil:
        self.counts[CNT_DROPPED] += 1
        self.drops[reason] += 1
        self.last_drop = reason

    cdef int reply_lost(self, int e) noexcept nogil:
        """A reply to a client failed at its first frame (the requests ROUTER has
        ROUTER_MANDATORY) with errno e: count it as dropped (EAGAIN: the client's pipe is
        at its high-water mark, it is not reading) or unroutable (it has disconnected).
        Returns -e for ETERM (the broker is closing: not counted), else 1."""
        if e == ZETERM:
            return -e
        self.counts[CNT_REPLIES_DROPPED if e == EAGAIN else CNT_REPLIES_UNROUTABLE] += 1
        return 1

    cdef void record_latency(self, double seconds) noexcept nogil:
        cdef int i = 0
        while i < N_LATENCY - 1 and seconds > LATENCY_BOUNDS[i]:
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum += seconds

    # -- for BrokerCore.stats() ----------------------------------------------

    cdef dict counts_dict(self):
        return {name: self.counts[i] for i, name in enumerate(protocol.COUNTERS)}

    cdef dict drops_dict(self):
        return {protocol.DROP_REASONS[i]: self.drops[i] for i in range(len(protocol.DROP_REASONS)) if self.drops[i]}

    cdef dict latency_dict(self):
        return {
            "bounds": protocol.LATENCY_BOUNDS,
            "counts": [self.latency_counts[i] for i in range(N_LATENCY)],
            "count": sum(self.latency_counts[i] for i in range(N_LATENCY)),
            "sum": self.latency_sum,
        }
