# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled load generators for bench/e2e.py: every loop runs in C, without the GIL.

Built in place by ``bench/build_loadgen.py`` (``make loadgen``). Like the broker's
compiled core, it links no libzmq: it resolves libzmq's functions through pyzmq's
own extension module (``src/fastbroker/_zmqdl.h``), so the socket handles of pyzmq
sockets (``Socket.underlying``) are used with the very libzmq that made them.

* ``client(sock, n, window, payload, first, nonce, mode, stall, parent)``: a
  pipelined client on a connected DEALER, ``window`` requests in flight.
  ``mode`` ``MODE_FBC``: FBC01 ``SUBMIT`` with ``OPT_NO_ACK``, a 16-byte request id
  (8-byte little-endian counter + the 8-byte ``nonce``), expects ``OK`` only.
  ``mode`` ``MODE_REQ``: ``[b"", payload]`` (the REQ envelope, as through
  ``zmq.proxy`` or to a fastbroker REQ-client endpoint), expects ``[b"", payload]``.
  ``mode`` ``MODE_REQ_FBC_FRAMES``: the REQ envelope with the three small frames an
  FBC01 SUBMIT carries besides its options, ``[b"", b"FBC01", b"\x01", id(16),
  payload]``, expected back unchanged: ``zmq.proxy`` then moves as many frames per job
  as fastbroker does with FBC01 clients and FBW01 workers (24 against 23).
  ``mode`` ``MODE_FBC2``: FBC02 ``SUBMIT`` batches (the same ids and options, one
  27-byte record each), as many requests per message as the window lets in at that
  moment (at most ``MAX_BATCH``): all of it at the start, then one batch per drain of
  the replies; expects ``REPLIES`` of ``OK`` records only.
  The payload is the 8-byte little-endian counter then ``x`` padding; every reply is
  checked (id, payload, each once). The latency of each request (send of its first
  frame to receipt of its reply, CLOCK_MONOTONIC ns) is kept in a C array.
* ``worker(sock, mode, credit, heartbeat, count, stop_fd, parent, lifetime)``: on a
  connected DEALER. ``mode`` ``MODE_FBW``: FBW01 worker (``READY(credit)``, then an
  ``ANSWER`` with the payload frames for each ``TASK``, zero-copy; ``HEARTBEAT``
  every ``heartbeat`` seconds; ``READY`` again after a ``DISCONNECT``).
  ``mode`` ``MODE_FBW2``: the same in FBW02: each ``TASK`` of k jobs is answered by one
  ``ANSWER`` of k ``OK`` records, the payload frames sent back zero-copy.
* ``original_worker(socks, push, count, parent, lifetime)``: workers of the original
  (2010) protocol, one per DEALER in ``socks`` (each plays a REQ worker: ``ready``, one
  job, its answer pushed on ``push``, ``ready`` again).
  ``mode`` ``MODE_ECHO``: sends every message back unchanged (the proxy's backend:
  ``[client id, b"", payload]``). Runs until ``count`` messages were answered
  (``count <= 0``: no limit), ``stop_fd`` (>= 0) is readable, the parent process
  ``parent`` (> 0) is gone, or ``lifetime`` seconds have passed.
"""

from libc.stdint cimport uint8_t, int64_t, uint64_t
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport EINTR, EAGAIN
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport getppid
from cpython.bytes cimport PyBytes_FromStringAndSize

import os

import zmq.backend.cython._zmq as _pyzmq_backend

from fastbroker._protocol cimport (
    CLIENT_SIGNATURE, WORKER_SIGNATURE, SIGNATURE_SIZE, REQUEST_ID_SIZE, OPTIONS_SIZE, MAX_CREDIT, OPT_NO_ACK, R_OK,
    CMD_READY, CMD_TASK, CMD_ANSWER, CMD_HEARTBEAT, CMD_DISCONNECT, CLIENT_SIGNATURE_V2, WORKER_SIGNATURE_V2,
    C_SUBMIT, R_REPLIES, SUBMIT_RECORD_SIZE, REPLY_RECORD_SIZE, TASK_RECORD_SIZE, ANSWER_RECORD_SIZE, MAX_BATCH,
    MAX_FRAMES,
)
from fastbroker._zmqdl cimport (
    zmsg, zpollitem, ZPOLLIN, ZDONTWAIT, ZSNDMORE, zmsg_init, zmsg_init_size, zmsg_data, zmsg_size, zmsg_more,
    zmsg_close, zmsg_send, zmsg_recv, zpoll, zerrno, fbz_load,
)

cdef const char *_load_error = fbz_load(os.fsencode(_pyzmq_backend.__file__))
if _load_error != NULL:
    raise ImportError("bench._loadgen: " + (<bytes>_load_error).decode())

cdef enum:
    M_FBC = 0
    M_REQ = 1
    M_REQ_FBC_FRAMES = 2
    M_FBC2 = 3
    M_FBW = 0
    M_ECHO = 1
    M_FBW2 = 2

MODE_FBC = M_FBC
MODE_REQ = M_REQ
MODE_REQ_FBC_FRAMES = M_REQ_FBC_FRAMES
MODE_FBC2 = M_FBC2
MODE_FBW = M_FBW
MODE_ECHO = M_ECHO
MODE_FBW2 = M_FBW2

cdef enum:
    MAXF = MAX_FRAMES + 8  # frames kept per received message (more: a bad message); on the heap
    BATCH = 4096       # messages handled per drain before looking at the clock
    ID_SIZE = 8  # the generator's own sequence number at the head of each payload

# error codes of the loops (see _ERRORS)
cdef enum:
    E_NONE = 0
    E_SEND = 1
    E_RECV = 2
    E_STALL = 3
    E_ORPHAN = 4
    E_BAD_REPLY = 5
    E_NOT_OK = 6
    E_BAD_ID = 7
    E_DUPLICATE = 8
    E_BAD_PAYLOAD = 9
    E_MEMORY = 10
    E_POLL = 11
    E_ABORTED = 12

_ERRORS = {
    E_SEND: "zmq_msg_send failed", E_RECV: "zmq_msg_recv failed", E_STALL: "stalled (no reply)",
    E_ORPHAN: "parent process gone", E_BAD_REPLY: "malformed reply", E_NOT_OK: "reply other than OK",
    E_BAD_ID: "reply for an id not sent", E_DUPLICATE: "second reply for an id",
    E_BAD_PAYLOAD: "reply payload differs", E_MEMORY: "out of memory", E_POLL: "zmq_poll failed",
    E_ABORTED: "request aborted (empty answer)",
}


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline void put_le64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <uint8_t>(v >> (8 * k))


cdef inline uint64_t get_le64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v |= (<uint64_t>p[k]) << (8 * k)
    return v


cdef inline int send_buf(void *sock, const void *data, size_t size, int flags) noexcept nogil:
    """One frame from a buffer (small frames live inside the zmq_msg_t: no malloc)."""
    cdef zmsg m
    if zmsg_init_size(&m, size) != 0:
        return -1
    if size:
        memcpy(zmsg_data(&m), data, size)
    while zmsg_send(&m, sock, flags) < 0:
        if zerrno() != EINTR:
            zmsg_close(&m)
            return -1
    return 0


cdef int recv_message(void *sock, zmsg *f, int *nf, int flags) noexcept nogil:
    """Receive one whole message into f[0..*nf). Returns 1 if one was received, 0 on
    EAGAIN, -1 on error, 2 for a message of more than MAXF frames (all closed)."""
    cdef int k = 0
    cdef int rc, more
    cdef zmsg extra
    zmsg_init(&f[0])
    while True:
        rc = zmsg_recv(&f[0], sock, flags)
        if rc >= 0:
            break
        if zerrno() == EINTR:
            continue
        zmsg_close(&f[0])
        return 0 if zerrno() == EAGAIN else -1
    k = 1
    while zmsg_more(&f[k - 1]):
        if k == MAXF:
            # too many frames: drain the rest and drop it all
            close_frames(f, MAXF)
            while True:
                zmsg_init(&extra)
                if zmsg_recv(&extra, sock, 0) < 0:
                    zmsg_close(&extra)
                    return -1
                more = zmsg_more(&extra)
                zmsg_close(&extra)
                if not more:
                    return 2
        zmsg_init(&f[k])
        while zmsg_recv(&f[k], sock, 0) < 0:
            if zerrno() != EINTR:
                zmsg_close(&f[k])
                close_frames(f, k)
                return -1
        k += 1
    nf[0] = k
    return 1


cdef inline void close_frames(zmsg *f, int n) noexcept nogil:
    cdef int k
    for k in range(n):
        zmsg_close(&f[k])


# -- the client ----------------------------------------------------------------------------


cdef struct Client:
    void *sock
    int mode
    int64_t n
    int64_t window
    size_t payload
    uint64_t first
    uint8_t nonce[8]
    int64_t stall_ns
    int parent
    uint8_t *pad          # the payload after its 8-byte id
    int64_t *sent_at
    int64_t *lat
    uint8_t *done
    int64_t sent
    int64_t received
    int64_t t0
    int64_t t1
    int err
    uint64_t bad_value


cdef int client_send(Client *c) noexcept nogil:
    cdef uint8_t buf[REQUEST_ID_SIZE]
    cdef uint8_t opts[OPTIONS_SIZE]
    cdef uint64_t rid = c.first + <uint64_t>c.sent
    cdef uint8_t cmd = 1
    c.sent_at[c.sent] = now_ns()
    if c.mode == M_FBC:
        put_le64(buf, rid)
        memcpy(buf + 8, c.nonce, 8)
        memset(opts, 0, OPTIONS_SIZE)
        opts[0] = OPT_NO_ACK
        if (send_buf(c.sock, CLIENT_SIGNATURE, SIGNATURE_SIZE, ZSNDMORE) or send_buf(c.sock, &cmd, 1, ZSNDMORE)
                or send_buf(c.sock, buf, REQUEST_ID_SIZE, ZSNDMORE) or send_buf(c.sock, opts, OPTIONS_SIZE, ZSNDMORE)):
            return -1
    else:
        if send_buf(c.sock, NULL, 0, ZSNDMORE):
            return -1
        if c.mode == M_REQ_FBC_FRAMES:
            put_le64(buf, rid)
            memcpy(buf + 8, c.nonce, 8)
            if (send_buf(c.sock, CLIENT_SIGNATURE, SIGNATURE_SIZE, ZSNDMORE) or send_buf(c.sock, &cmd, 1, ZSNDMORE)
                    or send_buf(c.sock, buf, REQUEST_ID_SIZE, ZSNDMORE)):
                return -1
    if send_payload(c, rid, 0):
        return -1
    c.sent += 1
    return 0


cdef int send_payload(Client *c, uint64_t rid, int flags) noexcept nogil:
    """Request rid's payload frame: its 8-byte id, then the padding."""
    cdef zmsg m
    cdef uint8_t *p
    if zmsg_init_size(&m, c.payload) != 0:
        return -1
    p = <uint8_t *>zmsg_data(&m)
    put_le64(p, rid)
    if c.payload > ID_SIZE:
        memcpy(p + ID_SIZE, c.pad, c.payload - ID_SIZE)
    while zmsg_send(&m, c.sock, flags) < 0:
        if zerrno() != EINTR:
            zmsg_close(&m)
            return -1
    return 0


cdef int client_send_batch(Client *c, int64_t k) noexcept nogil:
    """One FBC02 SUBMIT of the next k requests (k <= MAX_BATCH)."""
    cdef uint8_t cmd = C_SUBMIT
    cdef uint8_t *h
    cdef zmsg m
    cdef int64_t j
    cdef uint64_t rid
    if send_buf(c.sock, CLIENT_SIGNATURE_V2, SIGNATURE_SIZE, ZSNDMORE) or send_buf(c.sock, &cmd, 1, ZSNDMORE):
        return -1
    if zmsg_init_size(&m, <size_t>k * SUBMIT_RECORD_SIZE) != 0:
        return -1
    h = <uint8_t *>zmsg_data(&m)
    memset(h, 0, <size_t>k * SUBMIT_RECORD_SIZE)
    for j in range(k):
        rid = c.first + <uint64_t>(c.sent + j)
        put_le64(h + j * SUBMIT_RECORD_SIZE, rid)
        memcpy(h + j * SUBMIT_RECORD_SIZE + 8, c.nonce, 8)
        h[j * SUBMIT_RECORD_SIZE + 16] = OPT_NO_ACK
        h[j * SUBMIT_RECORD_SIZE + 26] = 1  # one payload frame
    while zmsg_send(&m, c.sock, ZSNDMORE) < 0:
        if zerrno() != EINTR:
            zmsg_close(&m)
            return -1
    for j in range(k):
        c.sent_at[c.sent] = now_ns()
        if send_payload(c, c.first + <uint64_t>c.sent, ZSNDMORE if j + 1 < k else 0):
            return -1
        c.sent += 1
    return 0


cdef int client_fill(Client *c) noexcept nogil:
    """Send what the window lets in now: one request (FBC01, REQ) or batches (FBC02)."""
    cdef int64_t k
    while c.sent < c.n and c.sent - c.received < c.window:
        if c.mode != M_FBC2:
            if client_send(c):
                return -1
            continue
        k = min(c.window - (c.sent - c.received), c.n - c.sent, <int64_t>MAX_BATCH)
        if client_send_batch(c, k):
            return -1
    return 0


cdef int client_check2(Client *c, zmsg *f, int nf, int64_t now) noexcept nogil:
    """Check an FBC02 REPLIES message: OK records, one frame each."""
    cdef const uint8_t *h
    cdef size_t hsize
    cdef int j, at = 3, rc
    cdef uint64_t rid
    if nf < 3 or zmsg_size(&f[0]) != SIGNATURE_SIZE \
            or memcmp(zmsg_data(&f[0]), CLIENT_SIGNATURE_V2, SIGNATURE_SIZE) != 0 \
            or zmsg_size(&f[1]) != 1 or (<const uint8_t *>zmsg_data(&f[1]))[0] != R_REPLIES:
        return E_BAD_REPLY
    hsize = zmsg_size(&f[2])
    if hsize == 0 or hsize % REPLY_RECORD_SIZE or <int>(hsize // REPLY_RECORD_SIZE) != nf - 3:
        return E_BAD_REPLY
    h = <const uint8_t *>zmsg_data(&f[2])
    for j in range(nf - 3):
        if h[j * REPLY_RECORD_SIZE + 16] != R_OK:
            c.bad_value = h[j * REPLY_RECORD_SIZE + 16]
            return E_NOT_OK
        if h[j * REPLY_RECORD_SIZE + 17] != 0 or h[j * REPLY_RECORD_SIZE + 18] != 1:
            return E_BAD_REPLY
        rid = get_le64(h + j * REPLY_RECORD_SIZE)
        if memcmp(h + j * REPLY_RECORD_SIZE + 8, c.nonce, 8) != 0:
            c.bad_value = rid
            return E_BAD_ID
        rc = client_payload(c, rid, &f[at], now)
        if rc:
            return rc
        at += 1
    return 0


cdef int client_check(Client *c, zmsg *f, int nf, int64_t now) noexcept nogil:
    """Check one reply and record its latency; 0 or an error code."""
    cdef const uint8_t *p
    cdef zmsg *pl
    cdef uint64_t rid
    if c.mode == M_FBC:
        if nf < 3 or zmsg_size(&f[0]) != SIGNATURE_SIZE \
                or memcmp(zmsg_data(&f[0]), CLIENT_SIGNATURE, SIGNATURE_SIZE) != 0 \
                or zmsg_size(&f[1]) != 1 or zmsg_size(&f[2]) != REQUEST_ID_SIZE:
            return E_BAD_REPLY
        p = <const uint8_t *>zmsg_data(&f[1])
        if p[0] != R_OK:
            c.bad_value = p[0]
            return E_NOT_OK
        if nf != 4:
            return E_BAD_REPLY
        p = <const uint8_t *>zmsg_data(&f[2])
        rid = get_le64(p)
        if memcmp(p + 8, c.nonce, 8) != 0:
            c.bad_value = rid
            return E_BAD_ID
        pl = &f[3]
    else:
        if nf == 1 and zmsg_size(&f[0]) == 0:
            return E_ABORTED
        if nf != (5 if c.mode == M_REQ_FBC_FRAMES else 2) or zmsg_size(&f[0]) != 0:
            return E_BAD_REPLY
        pl = &f[nf - 1]
        if zmsg_size(pl) < ID_SIZE:
            return E_BAD_PAYLOAD
        rid = get_le64(<const uint8_t *>zmsg_data(pl))
    return client_payload(c, rid, pl, now)


cdef int client_payload(Client *c, uint64_t rid, zmsg *pl, int64_t now) noexcept nogil:
    """Check the answer of request rid and record its latency; 0 or an error code."""
    cdef const uint8_t *p
    cdef uint64_t i
    i = rid - c.first
    if rid < c.first or i >= <uint64_t>c.sent:
        c.bad_value = rid
        return E_BAD_ID
    if c.done[i]:
        c.bad_value = rid
        return E_DUPLICATE
    p = <const uint8_t *>zmsg_data(pl)
    if zmsg_size(pl) != c.payload or get_le64(p) != rid or (
            c.payload > ID_SIZE and memcmp(p + ID_SIZE, c.pad, c.payload - ID_SIZE) != 0):
        c.bad_value = rid
        return E_BAD_PAYLOAD
    c.done[i] = 1
    c.lat[i] = now - c.sent_at[i]
    c.received += 1
    return 0


cdef int client_loop(Client *c, zmsg *f) noexcept nogil:
    cdef int nf = 0
    cdef int rc, k
    cdef zpollitem item
    cdef int64_t now, last_progress
    item.socket = c.sock
    item.fd = 0
    item.events = ZPOLLIN
    item.revents = 0
    c.t0 = now_ns()
    last_progress = c.t0
    while c.received < c.n:
        if client_fill(c):
            return E_SEND
        # Drain what is there, keeping the window full as replies come in.
        k = 0
        while k < BATCH:
            rc = recv_message(c.sock, f, &nf, ZDONTWAIT)
            if rc == 0:
                break
            if rc < 0:
                return E_RECV
            if rc == 2:
                return E_BAD_REPLY
            now = now_ns()
            rc = client_check2(c, f, nf, now) if c.mode == M_FBC2 else client_check(c, f, nf, now)
            close_frames(f, nf)
            if rc:
                return rc
            k += 1
            if c.sent < c.n and c.mode != M_FBC2:
                if client_send(c):
                    return E_SEND
        if k:
            last_progress = now_ns()
            continue
        if c.received >= c.n:
            break
        rc = zpoll(&item, 1, 200)
        if rc < 0:
            if zerrno() == EINTR:
                continue
            return E_POLL
        if rc == 0:
            now = now_ns()
            if now - last_progress > c.stall_ns:
                return E_STALL
            if c.parent > 0 and getppid() != c.parent:
                return E_ORPHAN
    c.t1 = now_ns()
    return 0


cdef int cmp_i64(const void *a, const void *b) noexcept nogil:
    cdef int64_t x = (<const int64_t *>a)[0]
    cdef int64_t y = (<const int64_t *>b)[0]
    return (x > y) - (x < y)


def client(sock, long long n, long long window, int payload, unsigned long long first, bytes nonce,
           int mode=MODE_FBC, double stall=10.0, int parent=0):
    """Run n requests with `window` in flight; returns a dict: ``n``, ``start`` and
    ``end`` (time.monotonic() seconds: first send, last reply), ``elapsed`` (s),
    ``latencies_ns`` (bytes: n int64, native order, sorted ascending)."""
    cdef Client c
    cdef int err
    cdef bytes lat
    cdef zmsg *frames = NULL
    if n < 1 or window < 1 or payload < ID_SIZE:
        raise ValueError("n >= 1, window >= 1, payload >= 8")
    if len(nonce) != 8:
        raise ValueError("nonce: 8 bytes")
    if mode not in (MODE_FBC, MODE_REQ, MODE_REQ_FBC_FRAMES, MODE_FBC2):
        raise ValueError("mode: MODE_FBC, MODE_REQ, MODE_REQ_FBC_FRAMES or MODE_FBC2")
    memset(&c, 0, sizeof(c))
    c.sock = <void *><size_t>sock.underlying
    c.mode = mode
    c.n = n
    c.window = window
    c.payload = payload
    c.first = first
    memcpy(c.nonce, <const char *>nonce, 8)
    c.stall_ns = <int64_t>(stall * 1e9)
    c.parent = parent
    c.pad = <uint8_t *>malloc(payload)
    c.sent_at = <int64_t *>malloc(n * sizeof(int64_t))
    c.lat = <int64_t *>malloc(n * sizeof(int64_t))
    c.done = <uint8_t *>calloc(n, 1)
    frames = <zmsg *>malloc(MAXF * sizeof(zmsg))
    try:
        if c.pad == NULL or c.sent_at == NULL or c.lat == NULL or c.done == NULL or frames == NULL:
            raise MemoryError()
        memset(c.pad, ord("x"), payload)
        with nogil:
            err = client_loop(&c, frames)
            if err == 0:
                qsort(c.lat, n, sizeof(int64_t), cmp_i64)
        if err:
            raise RuntimeError(f"loadgen client: {_ERRORS.get(err, err)} (value {c.bad_value}); "
                               f"{c.received}/{n} replies, {c.sent} sent")
        lat = PyBytes_FromStringAndSize(<char *>c.lat, n * sizeof(int64_t))
        return {"n": n, "start": c.t0 / 1e9, "end": c.t1 / 1e9, "elapsed": (c.t1 - c.t0) / 1e9,
                "latencies_ns": lat}
    finally:
        free(c.pad)
        free(c.sent_at)
        free(c.lat)
        free(c.done)
        free(frames)


# -- the worker ----------------------------------------------------------------------------


cdef int send_ready(void *sock, unsigned long credit, const char *sig) noexcept nogil:
    cdef uint8_t cr[4]
    cdef uint8_t cmd = CMD_READY
    cr[0] = <uint8_t>(credit >> 24)
    cr[1] = <uint8_t>(credit >> 16)
    cr[2] = <uint8_t>(credit >> 8)
    cr[3] = <uint8_t>credit
    if (send_buf(sock, NULL, 0, ZSNDMORE) or send_buf(sock, sig, SIGNATURE_SIZE, ZSNDMORE)
            or send_buf(sock, &cmd, 1, ZSNDMORE) or send_buf(sock, cr, 4, 0)):
        return -1
    return 0


cdef int send_heartbeat(void *sock, const char *sig) noexcept nogil:
    cdef uint8_t cmd = CMD_HEARTBEAT
    if (send_buf(sock, NULL, 0, ZSNDMORE) or send_buf(sock, sig, SIGNATURE_SIZE, ZSNDMORE)
            or send_buf(sock, &cmd, 1, 0)):
        return -1
    return 0


cdef int answer_batch(void *sock, zmsg *f, int nf) noexcept nogil:
    """The FBW02 ANSWER of the TASK in f[0..nf): [payload frames..., header] after the
    three frames "", FBW02, TASK; one OK record per job, the frames sent back as they came."""
    cdef uint8_t cmd = CMD_ANSWER
    cdef const uint8_t *th
    cdef uint8_t *ah
    cdef size_t k, j
    cdef zmsg header
    if nf < 5 or zmsg_size(&f[nf - 1]) == 0 or zmsg_size(&f[nf - 1]) % TASK_RECORD_SIZE:
        return 1
    k = zmsg_size(&f[nf - 1]) // TASK_RECORD_SIZE
    if zmsg_init_size(&header, k * ANSWER_RECORD_SIZE) != 0:
        return -1
    th = <const uint8_t *>zmsg_data(&f[nf - 1])
    ah = <uint8_t *>zmsg_data(&header)
    for j in range(k):
        memcpy(ah + j * ANSWER_RECORD_SIZE, th + j * TASK_RECORD_SIZE, 16)
        ah[j * ANSWER_RECORD_SIZE + 16] = R_OK
        ah[j * ANSWER_RECORD_SIZE + 17] = th[j * TASK_RECORD_SIZE + 16]
        ah[j * ANSWER_RECORD_SIZE + 18] = th[j * TASK_RECORD_SIZE + 17]
    if (send_buf(sock, NULL, 0, ZSNDMORE) or send_buf(sock, WORKER_SIGNATURE_V2, SIGNATURE_SIZE, ZSNDMORE)
            or send_buf(sock, &cmd, 1, ZSNDMORE)):
        zmsg_close(&header)
        return -1
    while zmsg_send(&header, sock, ZSNDMORE) < 0:
        if zerrno() != EINTR:
            zmsg_close(&header)
            return -1
    return -1 if send_frames(sock, f, 3, nf - 1) else 0


cdef int send_frames(void *sock, zmsg *f, int first, int n) noexcept nogil:
    """Send f[first..n) as the rest of a message (zero-copy: libzmq takes them)."""
    cdef int k
    for k in range(first, n):
        while zmsg_send(&f[k], sock, ZSNDMORE if k + 1 < n else 0) < 0:
            if zerrno() != EINTR:
                return -1
    return 0


cdef struct Worker:
    void *sock
    int mode
    unsigned long credit
    int64_t hb_ns
    long long count
    int stop_fd
    int parent
    int64_t end_ns
    long long answered
    long long heartbeats
    long long disconnects
    long long other
    int stopped_by   # 1 count, 2 stop fd, 3 parent gone, 4 lifetime


cdef int worker_loop(Worker *w, zmsg *f) noexcept nogil:
    cdef int nf = 0
    cdef int rc, k, nitems
    cdef uint8_t cmd = CMD_ANSWER
    cdef const uint8_t *p
    cdef zpollitem items[2]
    cdef int64_t now, last_hb
    cdef int fbw = w.mode == M_FBW or w.mode == M_FBW2
    cdef const char *sig = WORKER_SIGNATURE_V2 if w.mode == M_FBW2 else WORKER_SIGNATURE
    items[0].socket = w.sock
    items[0].fd = 0
    items[0].events = ZPOLLIN
    items[0].revents = 0
    items[1].socket = NULL
    items[1].fd = w.stop_fd
    items[1].events = ZPOLLIN
    items[1].revents = 0
    nitems = 2 if w.stop_fd >= 0 else 1
    if fbw and send_ready(w.sock, w.credit, sig):
        return E_SEND
    last_hb = now_ns()
    while True:
        k = 0
        while k < BATCH:
            rc = recv_message(w.sock, f, &nf, ZDONTWAIT)
            if rc == 0:
                break
            if rc < 0:
                return E_RECV
            k += 1
            if rc == 2:
                w.other += 1
                continue
            if not fbw:
                # [client id, b"", payload] straight back
                rc = send_frames(w.sock, f, 0, nf)
                close_frames(f, nf)
                if rc:
                    return E_SEND
                w.answered += 1
            elif nf >= 3 and zmsg_size(&f[0]) == 0 and zmsg_size(&f[1]) == SIGNATURE_SIZE \
                    and memcmp(zmsg_data(&f[1]), sig, SIGNATURE_SIZE) == 0 and zmsg_size(&f[2]) == 1:
                p = <const uint8_t *>zmsg_data(&f[2])
                if p[0] == CMD_TASK and w.mode == M_FBW2:
                    rc = answer_batch(w.sock, f, nf)
                    if rc < 0:
                        close_frames(f, nf)
                        return E_SEND
                    if rc:
                        w.other += 1
                    else:
                        w.answered += (zmsg_size(&f[nf - 1]) // TASK_RECORD_SIZE)
                    close_frames(f, nf)
                elif p[0] == CMD_TASK and nf >= 5:
                    # ANSWER: "", FBW01, 0x03, then the task id and payload frames as received
                    rc = (send_buf(w.sock, NULL, 0, ZSNDMORE)
                          or send_buf(w.sock, WORKER_SIGNATURE, SIGNATURE_SIZE, ZSNDMORE)
                          or send_buf(w.sock, &cmd, 1, ZSNDMORE) or send_frames(w.sock, f, 3, nf))
                    close_frames(f, nf)
                    if rc:
                        return E_SEND
                    w.answered += 1
                else:
                    if p[0] == CMD_DISCONNECT:
                        w.disconnects += 1
                        close_frames(f, nf)
                        if send_ready(w.sock, w.credit, sig):
                            return E_SEND
                    else:
                        if p[0] != CMD_HEARTBEAT:
                            w.other += 1
                        close_frames(f, nf)
            else:
                w.other += 1
                close_frames(f, nf)
            if w.count > 0 and w.answered >= w.count:
                w.stopped_by = 1
                return 0
        now = now_ns()
        if fbw and now - last_hb >= w.hb_ns:
            if send_heartbeat(w.sock, sig):
                return E_SEND
            w.heartbeats += 1
            last_hb = now
        if k:
            continue
        if now > w.end_ns:
            w.stopped_by = 4
            return 0
        rc = zpoll(items, nitems, 100)
        if rc < 0:
            if zerrno() == EINTR:
                continue
            return E_POLL
        if nitems == 2 and items[1].revents:
            w.stopped_by = 2
            return 0
        if rc == 0 and w.parent > 0 and getppid() != w.parent:
            w.stopped_by = 3
            return 0


def worker(sock, int mode=MODE_FBW, unsigned long credit=MAX_CREDIT, double heartbeat=0.5,
           long long count=0, int stop_fd=-1, int parent=0, double lifetime=900.0):
    """Serve until stopped (see the module doc); returns a dict of counts and
    ``stopped_by`` (``count``, ``stop_fd``, ``parent``, ``lifetime``)."""
    cdef Worker w
    cdef int err
    cdef zmsg *frames
    if mode not in (MODE_FBW, MODE_ECHO, MODE_FBW2):
        raise ValueError("mode: MODE_FBW, MODE_ECHO or MODE_FBW2")
    if credit > 65536 or heartbeat <= 0:
        raise ValueError("credit <= 65536, heartbeat > 0")
    memset(&w, 0, sizeof(w))
    w.sock = <void *><size_t>sock.underlying
    w.mode = mode
    w.credit = credit
    w.hb_ns = <int64_t>(heartbeat * 1e9)
    w.count = count
    w.stop_fd = stop_fd
    w.parent = parent
    w.end_ns = now_ns() + <int64_t>(lifetime * 1e9)
    frames = <zmsg *>malloc(MAXF * sizeof(zmsg))
    if frames == NULL:
        raise MemoryError()
    with nogil:
        err = worker_loop(&w, frames)
    free(frames)
    if err:
        raise RuntimeError(f"loadgen worker: {_ERRORS.get(err, err)}; {w.answered} answered")
    return {"answered": w.answered, "heartbeats": w.heartbeats, "disconnects": w.disconnects,
            "other": w.other,
            "stopped_by": {1: "count", 2: "stop_fd", 3: "parent", 4: "lifetime"}.get(w.stopped_by, "?")}


# -- the original protocol's workers (2010) --------------------------------------------------


cdef int send_original_ready(void *sock) noexcept nogil:
    """What a REQ worker sends when it wants a job: [b"", b"ready"] (the DEALER adds no
    delimiter of its own, so it is written here, as a REQ socket would)."""
    if send_buf(sock, NULL, 0, ZSNDMORE) or send_buf(sock, b"ready", 5, 0):
        return -1
    return 0


cdef int original_loop(void **socks, int n, void *push, zpollitem *items, zmsg *f, Worker *w) noexcept nogil:
    cdef int i, rc, nf = 0
    for i in range(n):
        if send_original_ready(socks[i]):
            return E_SEND
    while True:
        rc = zpoll(items, n, 100)
        if rc < 0:
            if zerrno() == EINTR:
                continue
            return E_POLL
        if rc == 0:
            if now_ns() > w.end_ns:
                w.stopped_by = 4
                return 0
            if w.parent > 0 and getppid() != w.parent:
                w.stopped_by = 3
                return 0
            continue
        for i in range(n):
            if not items[i].revents & ZPOLLIN:
                continue
            while True:
                rc = recv_message(socks[i], f, &nf, ZDONTWAIT)
                if rc == 0:
                    break
                if rc < 0:
                    return E_RECV
                if rc == 2 or nf < 3 or zmsg_size(&f[0]) != 0:
                    w.other += 1
                    if rc != 2:
                        close_frames(f, nf)
                    continue
                # [b"", task id, payload...]: [task id, payload...] back on PUSH
                # (zero-copy), then ready again on this socket: one job at a time per
                # socket, as in 2010.
                rc = send_frames(push, f, 1, nf)
                close_frames(f, nf)
                if rc or send_original_ready(socks[i]):
                    return E_SEND
                w.answered += 1
                if w.count > 0 and w.answered >= w.count:
                    w.stopped_by = 1
                    return 0


def original_worker(socks, push, long long count=0, int parent=0, double lifetime=900.0):
    """Workers of the original (2010) protocol: each DEALER of `socks`, connected to the
    broker's workers endpoint, plays one REQ worker (ready, one job, its answer pushed
    on `push`, connected to the answers endpoint, ready again), so that a process holds
    len(socks) jobs at once. Runs like worker(); returns the same dict."""
    cdef Worker w
    cdef int err, i, n = len(socks)
    cdef void **handles = NULL
    cdef void *push_handle = <void *><size_t>push.underlying
    cdef zpollitem *items = NULL
    cdef zmsg *frames = NULL
    if n < 1 or n > 4096:
        raise ValueError("1 to 4096 sockets")
    memset(&w, 0, sizeof(w))
    w.count = count
    w.parent = parent
    w.end_ns = now_ns() + <int64_t>(lifetime * 1e9)
    handles = <void **>malloc(n * sizeof(void *))
    items = <zpollitem *>malloc(n * sizeof(zpollitem))
    frames = <zmsg *>malloc(MAXF * sizeof(zmsg))
    try:
        if handles == NULL or items == NULL or frames == NULL:
            raise MemoryError()
        for i in range(n):
            handles[i] = <void *><size_t>socks[i].underlying
            items[i].socket = handles[i]
            items[i].fd = 0
            items[i].events = ZPOLLIN
            items[i].revents = 0
        with nogil:
            err = original_loop(handles, n, push_handle, items, frames, &w)
    finally:
        free(handles)
        free(items)
        free(frames)
    if err:
        raise RuntimeError(f"loadgen original worker: {_ERRORS.get(err, err)}; {w.answered} answered")
    return {"answered": w.answered, "heartbeats": 0, "disconnects": 0, "other": w.other,
            "stopped_by": {1: "count", 2: "stop_fd", 3: "parent", 4: "lifetime"}.get(w.stopped_by, "?")}
