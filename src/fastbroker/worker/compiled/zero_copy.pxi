# Included by worker/_session.pyx: large answers sent without a copy, and payload frames
# lent to the job (Worker.zero_copy_min).

# -- answers sent without a copy --------------------------------------------------------
# An answer frame of at least ANSWER_ZERO_COPY_MIN bytes is sent from the job's bytes
# object itself. libzmq lets it go when done, perhaps on its I/O thread, which must never
# wait for the GIL (a job may hold it for minutes, and that thread carries the
# heartbeats): _release_answer only notes the object and signals the releaser, a daemon
# thread of this module, which drops the references when it gets the GIL.

cdef Py_ssize_t _ANSWER_ZERO_COPY_MIN = ANSWER_ZERO_COPY_MIN
cdef pthread_mutex_t _released_lock
pthread_mutex_init(&_released_lock, NULL)
cdef pthread_cond_t _released_ready
pthread_cond_init(&_released_ready, NULL)
cdef void **_released = NULL
cdef int _released_count = 0
cdef int _released_cap = 0
_releaser = None  # the thread, started with the first answer sent this way


cdef void _release_answer(void *data, void *hint) noexcept nogil:
    global _released, _released_count, _released_cap
    cdef void **grown
    pthread_mutex_lock(&_released_lock)
    if _released_count == _released_cap:
        grown = <void **>realloc(_released, (_released_cap * 2 + 64) * sizeof(void *))
        if grown == NULL:  # the object stays alive: a leak, not a crash
            pthread_mutex_unlock(&_released_lock)
            return
        _released = grown
        _released_cap = _released_cap * 2 + 64
    _released[_released_count] = hint
    _released_count += 1
    pthread_cond_signal(&_released_ready)
    pthread_mutex_unlock(&_released_lock)


cdef void _drop_released():
    """With the GIL: drop the references of the answers libzmq is done with."""
    global _released, _released_count, _released_cap
    cdef void **objects
    cdef int n, i
    pthread_mutex_lock(&_released_lock)
    objects = _released
    n = _released_count
    _released = NULL
    _released_count = _released_cap = 0
    pthread_mutex_unlock(&_released_lock)
    for i in range(n):
        Py_DecRef(<PyObject *>objects[i])
    free(objects)


def _release_forever():
    while True:
        with nogil:
            pthread_mutex_lock(&_released_lock)
            while not _released_count:
                pthread_cond_wait(&_released_ready, &_released_lock)
            pthread_mutex_unlock(&_released_lock)
        _drop_released()


cdef void _start_releaser():
    global _releaser
    if _releaser is None:
        _releaser = threading.Thread(target=_release_forever, name="fastbroker-answer-releaser", daemon=True)
        _releaser.start()


def drop_released_answers():
    """Drop the references of the answers libzmq is done with now (the releaser thread
    does it as they come; this is for a caller that must know they are gone)."""
    _drop_released()


cdef class ReceivedFrame:
    """A received payload frame lent to the job without a copy (Worker.zero_copy_min):
    owns the message, and reads as a read-only buffer (the job gets a memoryview)."""

    cdef zmsg msg

    def __cinit__(self):
        zmsg_init(&self.msg)

    def __dealloc__(self):
        zmsg_close(&self.msg)

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, zmsg_data(&self.msg), zmsg_size(&self.msg), 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass
