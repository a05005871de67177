# core/deadline_heap.pxi: DeadlineHeap, a binary min-heap of (deadline, key) with a
# key -> position index, so an answered attempt leaves the heap in O(log n) without
# a scan.
#
# Owns: its entries and position index (HeapEnt in _core.pxd).
# Touches: nothing else. Users: Attempts (expiry), WorkerSide (dispatch, FAILED,
# forget), ClientSide (cancel); keys are request slots.


cdef class DeadlineHeap:
    """Attempt deadlines, soonest first; keys are small integers (request slots)."""

    def __dealloc__(self):
        self.clear()

    cdef void clear(self) noexcept nogil:
        """Forget every deadline and free all memory (as a new DeadlineHeap)."""
        free(self.ents)
        free(self.pos)
        self.ents = NULL
        self.pos = NULL
        self.count = self.cap = self.pos_cap = 0

    cdef inline void _place(self, size_t i, HeapEnt e) noexcept nogil:
        self.ents[i] = e
        self.pos[e.key] = <int64_t>i

    cdef void _sift_up(self, size_t i) noexcept nogil:
        cdef HeapEnt e = self.ents[i]
        cdef size_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if self.ents[parent].deadline <= e.deadline:
                break
            self._place(i, self.ents[parent])
            i = parent
        self._place(i, e)

    cdef void _sift_down(self, size_t i) noexcept nogil:
        cdef HeapEnt e = self.ents[i]
        cdef size_t child
        while True:
            child = 2 * i + 1
            if child >= self.count:
                break
            if child + 1 < self.count and self.ents[child + 1].deadline < self.ents[child].deadline:
                child += 1
            if e.deadline <= self.ents[child].deadline:
                break
            self._place(i, self.ents[child])
            i = child
        self._place(i, e)

    cdef int insert(self, uint32_t key, double deadline) noexcept nogil:
        """Add or move key's deadline. Returns -1 when out of memory."""
        cdef size_t ncap, i
        cdef HeapEnt *nents
        cdef int64_t *npos
        if key >= self.pos_cap:
            ncap = self.pos_cap * 2 if self.pos_cap else 16
            while ncap <= key:
                ncap *= 2
            npos = <int64_t *>realloc(self.pos, ncap * sizeof(int64_t))
            if npos == NULL:
                return -1
            for i in range(self.pos_cap, ncap):
                npos[i] = -1
            self.pos = npos
            self.pos_cap = ncap
        if self.pos[key] >= 0:
            self.delete(key)
        if self.count == self.cap:
            ncap = self.cap * 2 if self.cap else 16
            nents = <HeapEnt *>realloc(self.ents, ncap * sizeof(HeapEnt))
            if nents == NULL:
                return -1
            self.ents = nents
            self.cap = ncap
        self.ents[self.count].deadline = deadline
        self.ents[self.count].key = key
        self.count += 1
        self._sift_up(self.count - 1)
        return 0

    cdef bint delete(self, uint32_t key) noexcept nogil:
        cdef int64_t i
        cdef HeapEnt moved
        if key >= self.pos_cap or self.pos[key] < 0:
            return False
        i = self.pos[key]
        self.pos[key] = -1
        self.count -= 1
        if <size_t>i < self.count:
            # Move the last entry into the hole, then restore heap order either way.
            moved = self.ents[self.count]
            self._place(<size_t>i, moved)
            self._sift_down(<size_t>i)
            self._sift_up(<size_t>self.pos[moved.key])
        return True

    cdef uint32_t pop_min(self) noexcept nogil:
        """Remove and return the soonest key; the heap must not be empty."""
        cdef uint32_t key = self.ents[0].key
        self.delete(key)
        return key

    # -- Python interface ---------------------------------------------------

    def push(self, key, double deadline):
        """Set key's deadline (an existing one is replaced)."""
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            raise ValueError(f"key must be in [0, {protocol.HEAP_KEY_LIMIT})")
        if self.insert(<uint32_t>key, deadline) < 0:
            raise MemoryError()

    def remove(self, key):
        """Forget key's deadline; False if it had none."""
        if not 0 <= key < protocol.HEAP_KEY_LIMIT:
            return False
        return self.delete(<uint32_t>key)

    def peek(self):
        """(deadline, key) of the soonest deadline, or None."""
        if self.count == 0:
            return None
        return (self.ents[0].deadline, self.ents[0].key)

    def pop(self):
        """Remove and return (deadline, key) of the soonest deadline; IndexError if empty."""
        if self.count == 0:
            raise IndexError("pop from an empty DeadlineHeap")
        cdef double d = self.ents[0].deadline
        return (d, self.pop_min())

    def __len__(self):
        return self.count
