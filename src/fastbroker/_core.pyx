# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled broker core: the routing loop and its structures, run without the GIL.

Same public interface as ``_core_py`` (``tests/test_core_api.py`` checks that the two
stay in step). The classes are declared in ``_core.pxd``; their code is in
``core/*.pxi``, included below in dependency order (a part only uses the parts above
it). ``BrokerCore`` composes them and runs the loop.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memcmp, memset, strlen
from libc.errno cimport EINTR, EAGAIN, EFBIG
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED

import os

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from fastbroker import _common, protocol
from fastbroker._common import check_count, check_heartbeat, check_timeout, check_tries

from fastbroker._protocol cimport *
from fastbroker._zmqdl cimport (
    zmsg, zpollitem, ZPOLLIN, ZDONTWAIT, ZSNDMORE, ZETERM, zmsg_init, zmsg_init_size, zmsg_data, zmsg_size,
    zmsg_more, zmsg_close, zmsg_copy, zmsg_move, zmsg_send, zmsg_recv, zpoll, zerrno, fbz_load,
)
from fastbroker._crc32 cimport fb_crc32_init, fb_crc32, fb_put_u32, fb_put_i32, fb_put_f64

cdef extern from *:
    # Start bringing an address's cache line in, for a read soon after (request_ids,
    # kept_outcomes: lookups in tables far larger than the caches). The empty volatile
    # asm keeps GCC from taking a function that only prefetches for one without effect,
    # and dropping its calls: gcc 12 did, with __builtin_prefetch alone.
    """
    static inline void fb_prefetch(const void *address) {
        __builtin_prefetch(address);
        __asm__ __volatile__("" : : "r"(address));
    }
    """
    void prefetch "fb_prefetch"(const void *address) nogil

cdef const char *_load_error = fbz_load(os.fsencode(_pyzmq_backend.__file__))
if _load_error != NULL:
    raise ImportError("fastbroker._core: " + (<bytes>_load_error).decode())

# Every protocol constant comes from _protocol.pxd, generated from protocol.py; check
# that this build was made from the protocol.py it runs with.
protocol.check_compiled(compiled_values(), compiled_signatures())
fb_crc32_init()  # the log store's checksums (core/journal.pxi, encode)

# Leaves: no state of their own beyond what they are given.
include "core/clock.pxi"
include "core/frames.pxi"
include "core/ring.pxi"
include "core/address_index.pxi"
include "core/request_ids.pxi"
# Parts holding one kind of state each.
include "core/counters.pxi"
include "core/events.pxi"
include "core/journal.pxi"
include "core/request_table.pxi"
include "core/idle_workers.pxi"
include "core/deadline_heap.pxi"
include "core/job_queue.pxi"
include "core/worker_sessions.pxi"
include "core/kept_outcomes.pxi"
# The protocol handlers, then the class that composes everything and runs the loop.
include "core/reply_batches.pxi"
include "core/client_side.pxi"
include "core/attempts.pxi"
include "core/worker_side.pxi"
include "core/broker_core.pxi"
