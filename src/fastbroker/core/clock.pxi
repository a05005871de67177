# core/clock.pxi: the clock deadlines are measured on.
#
# Owns: monotonic_now() (nogil), monotonic() (Python), and Clock, the loop turn's
# reading that BrokerCore sets and the handlers read.
# Touches: nothing else.


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


def monotonic():
    """The clock deadlines are measured on (CLOCK_MONOTONIC, seconds)."""
    return monotonic_now()


cdef class Clock:
    """The current loop turn's clock reading: BrokerCore sets ``now`` at each turn
    (and after each poll), so every handler of a turn sees the same time."""
