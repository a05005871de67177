# cython: language_level=3
# client/_wire.pyx: whole messages in and out of a client's socket, one call per message
# on libzmq's own functions (twin of client/wire.py, same names).
#
# pyzmq costs a Python call, a Frame object and a getsockopt per frame; a FBC02 reply of
# 100 answers is 103 frames. Here a message is read or written in one call: each frame
# is a zmq_msg_t read straight into a bytes object (or filled from one). The socket is
# pyzmq's (Socket.underlying), used only from the thread that owns it, with the GIL held:
# these calls never block.

import os

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR
from libc.stdint cimport uintptr_t
from libc.string cimport memcpy

from fastbroker._zmqdl cimport (
    zmsg, ZDONTWAIT, ZSNDMORE, zmsg_init, zmsg_init_size, zmsg_data, zmsg_size, zmsg_more, zmsg_close,
    zmsg_send, zmsg_recv, zerrno, fbz_load,
)

cdef const char *_load_error = fbz_load(os.fsencode(_pyzmq_backend.__file__))
if _load_error != NULL:
    raise ImportError("fastbroker.client._wire: " + (<bytes>_load_error).decode())


cdef inline void *_handle(socket) except NULL:
    if socket.closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    return <void *><uintptr_t>socket.underlying


cdef list _recv_one(void *handle):
    """One whole message, or None if none waits; raises on an error."""
    cdef zmsg m
    cdef list frames = None
    cdef int e
    while True:
        zmsg_init(&m)
        if zmsg_recv(&m, handle, ZDONTWAIT) < 0:
            e = zerrno()
            zmsg_close(&m)
            if e == EINTR:
                continue  # a signal: the frame is still there
            if e == EAGAIN and frames is None:
                return None
            # A later frame of a message never fails with EAGAIN (libzmq delivers
            # messages whole); anything else is the socket's end.
            raise zmq.ZMQError(e)
        if frames is None:
            frames = []
        frames.append(PyBytes_FromStringAndSize(<char *>zmsg_data(&m), <Py_ssize_t>zmsg_size(&m)))
        if not zmsg_more(&m):
            zmsg_close(&m)
            return frames
        zmsg_close(&m)


def recv_messages(socket, int limit):
    """Up to `limit` whole messages waiting in `socket`, without blocking (none: [])."""
    cdef void *handle = _handle(socket)
    cdef list messages = []
    cdef list one
    cdef int _i
    for _i in range(limit):
        one = _recv_one(handle)
        if one is None:
            break
        messages.append(one)
    return messages


def send_message(socket, frames):
    """Send the message without blocking; False if the socket's queue is full (nothing
    sent: libzmq counts whole messages against the high-water mark, so only the first
    frame can meet it)."""
    cdef void *handle = _handle(socket)
    cdef Py_ssize_t i, n = len(frames)
    cdef bytes frame
    cdef object obj
    cdef zmsg m
    cdef int e
    if n == 0:
        raise ValueError("a message has at least one frame")
    for i in range(n):
        obj = frames[i]
        frame = obj if type(obj) is bytes else bytes(obj)
        if zmsg_init_size(&m, <size_t>PyBytes_GET_SIZE(frame)) < 0:
            raise MemoryError()
        memcpy(zmsg_data(&m), PyBytes_AS_STRING(frame), <size_t>PyBytes_GET_SIZE(frame))
        while zmsg_send(&m, handle, ZDONTWAIT | (ZSNDMORE if i < n - 1 else 0)) < 0:
            e = zerrno()
            if e == EINTR:
                continue  # a signal: the message is still ours, send it again
            zmsg_close(&m)
            if e == EAGAIN and i == 0:
                return False
            raise zmq.ZMQError(e)
    return True
