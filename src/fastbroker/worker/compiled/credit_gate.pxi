# Included by worker/_session.pyx: one credit for a worker's sessions with several brokers.

cdef class CreditGate:
    """The jobs a worker connected to several brokers holds, one Session per broker:
    at most ``limit`` in all (the pure CreditGate's rule, in C for the loops that run
    without the GIL). A job that comes when the gate is full is given back (RETURN); its
    session offers its credit again when there is room, the blocked sessions oldest
    first, one per slot freed."""

    def __cinit__(self):
        pthread_mutex_init(&self.lock, NULL)

    def __init__(self, int limit):
        self.limit = limit

    def __dealloc__(self):
        free(self.blocked)
        pthread_mutex_destroy(&self.lock)

    cdef int take(self) noexcept nogil:
        """One more job in hand, if there is room."""
        cdef int room
        pthread_mutex_lock(&self.lock)
        room = self.held < self.limit
        if room:
            self.held += 1
        pthread_mutex_unlock(&self.lock)
        return room

    cdef void give(self) noexcept nogil:
        """A job is no longer in hand: the session that gave jobs back first may offer
        its credit again (one per slot freed: waking them all would have them all send,
        and all but one give back again)."""
        cdef Blocked woken
        cdef int found = 0
        pthread_mutex_lock(&self.lock)
        self.held -= 1
        if self.blocked_count:
            woken = self.blocked[0]
            found = 1
            self.blocked_count -= 1
            memmove(self.blocked, self.blocked + 1, self.blocked_count * sizeof(Blocked))
        pthread_mutex_unlock(&self.lock)
        if found:
            woken.unblocked[0] = 1
            write(woken.wake_fd, &_WAKE_BYTE, 1)

    cdef void block(self, int *unblocked, int wake_fd) noexcept nogil:
        """A session gave jobs back: wake it when there is room (at once if there is)."""
        cdef int i
        cdef Blocked *grown
        global _out_of_memory
        pthread_mutex_lock(&self.lock)
        if self.held >= self.limit:
            for i in range(self.blocked_count):
                if self.blocked[i].unblocked == unblocked:
                    pthread_mutex_unlock(&self.lock)
                    return
            if self.blocked_count == self.blocked_cap:
                grown = <Blocked *>realloc(self.blocked, (self.blocked_cap * 2 + 4) * sizeof(Blocked))
                if grown == NULL:
                    _out_of_memory = 1
                    pthread_mutex_unlock(&self.lock)
                    return
                self.blocked = grown
                self.blocked_cap = self.blocked_cap * 2 + 4
            self.blocked[self.blocked_count].unblocked = unblocked
            self.blocked[self.blocked_count].wake_fd = wake_fd
            self.blocked_count += 1
            pthread_mutex_unlock(&self.lock)
            return
        pthread_mutex_unlock(&self.lock)
        unblocked[0] = 1
        write(wake_fd, &_WAKE_BYTE, 1)
