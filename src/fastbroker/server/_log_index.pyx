# cython: language_level=3
# server/_log_index.pyx: LogIndex compiled (twin of server/log_index.py, same names and
# the same behaviour; _select.log_index() chooses).
#
# The log store's hot path: a turn's records (one bytes object from the core's
# journal, Journal.encode) are written with one pwrite and indexed here, by request
# id, without a Python object per record; the index says which records are still
# live, so that a compaction copies just those into a new file. Open addressing on the
# 16-byte ids (linear probing, deletion by backward shift: no tombstones to sweep).
#
# Owns: two id tables (requests: their SUBMIT record and attempts; outcomes: their
# FINISH record) and the file descriptor it writes, until compact() moves it to another.
# Docs: docs/ARCHITECTURE.md, "The log store".

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, mmap, munmap
from posix.unistd cimport pwrite

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastbroker._crc32 cimport fb_crc32, fb_crc32_init, fb_get_u32, fb_put_u32
from fastbroker._protocol cimport (
    J_FINISH, J_FORGET, J_START, J_SUBMIT, LOG_ENTRY_SIZE, LOG_RECORD_HEAD, LOG_START_SIZE, REQUEST_ID_SIZE,
)

fb_crc32_init()

DEF COPY_BUFFER = 1 << 20  # bytes a compaction gathers before each write
DEF RADIX = 1 << 16  # buckets of a pass of sort_by_offset


cdef struct Slot:
    uint64_t offset  # where the record starts in the file
    uint32_t length  # the whole record, head included
    uint32_t attempts  # requests: the latest START's (or the SUBMIT's own)
    uint8_t id[16]
    uint8_t used


cdef struct Table:
    Slot *slots
    size_t cap  # a power of two, or 0
    size_t count


cdef struct Moved:
    uint64_t offset
    size_t slot


cdef extern from *:
    void prefetch "__builtin_prefetch"(const void *address) nogil


cdef inline size_t id_hash(const uint8_t *rid) noexcept nogil:
    cdef uint64_t a, b
    memcpy(&a, rid, 8)
    memcpy(&b, rid + 8, 8)
    a ^= b * <uint64_t>0x9E3779B97F4A7C15
    a ^= a >> 33
    a *= <uint64_t>0xFF51AFD7ED558CCD
    a ^= a >> 33
    return <size_t>a


cdef Py_ssize_t table_find(Table *t, const uint8_t *rid) noexcept nogil:
    """The slot holding rid, or -1."""
    cdef size_t mask, i
    if t.cap == 0:
        return -1
    mask = t.cap - 1
    i = id_hash(rid) & mask
    while t.slots[i].used:
        if memcmp(t.slots[i].id, rid, REQUEST_ID_SIZE) == 0:
            return <Py_ssize_t>i
        i = (i + 1) & mask
    return -1


cdef int table_grow(Table *t) except -1:
    cdef size_t ncap = t.cap * 2 if t.cap else 1024
    cdef Slot *old = t.slots
    cdef size_t old_cap = t.cap, i, j, mask = ncap - 1
    cdef Slot *grown = <Slot *>calloc(ncap, sizeof(Slot))
    if grown == NULL:
        raise MemoryError()
    for i in range(old_cap):
        if old[i].used:
            j = id_hash(old[i].id) & mask
            while grown[j].used:
                j = (j + 1) & mask
            grown[j] = old[i]
    t.slots = grown
    t.cap = ncap
    free(old)
    return 0


cdef Slot *table_add(Table *t, const uint8_t *rid) except NULL:
    """A new slot for rid (not in the table), its fields to be set by the caller."""
    cdef size_t mask, i
    if (t.count + 1) * 10 > t.cap * 7:
        table_grow(t)
    mask = t.cap - 1
    i = id_hash(rid) & mask
    while t.slots[i].used:
        i = (i + 1) & mask
    t.slots[i].used = 1
    memcpy(t.slots[i].id, rid, REQUEST_ID_SIZE)
    t.count += 1
    return &t.slots[i]


cdef void table_remove(Table *t, size_t i) noexcept nogil:
    """Empty slot i, and move back the ones after it that would no longer be found."""
    cdef size_t mask = t.cap - 1, j = i, home
    t.slots[i].used = 0
    t.count -= 1
    while True:
        j = (j + 1) & mask
        if not t.slots[j].used:
            return
        home = id_hash(t.slots[j].id) & mask
        # Slot j stays if its home lies cyclically in (i, j].
        if (home > i and home <= j) if i <= j else (home > i or home <= j):
            continue
        t.slots[i] = t.slots[j]
        t.slots[j].used = 0
        i = j


cdef int sort_by_offset(Moved *moved, size_t n) except -1:
    """Sort by offset: a radix sort, 16 bits a pass from the lowest, as many passes as
    the largest offset needs (two for a file under 4 GiB). qsort, with a call per
    comparison, was a fifth of a loaded broker's CPU in compactions of ~10^5 kept outcomes."""
    cdef Moved *spare
    cdef Moved *src = moved
    cdef Moved *dst
    cdef Moved *swap
    cdef size_t *starts
    cdef size_t i, total, c, digit
    cdef uint64_t top = 0
    cdef int shift = 0
    if n < 2:
        return 0
    for i in range(n):
        if moved[i].offset > top:
            top = moved[i].offset
    spare = <Moved *>malloc(n * sizeof(Moved))
    starts = <size_t *>malloc(RADIX * sizeof(size_t))
    if spare == NULL or starts == NULL:
        free(spare)
        free(starts)
        raise MemoryError()
    dst = spare
    while shift < 64 and (top >> shift):
        memset(starts, 0, RADIX * sizeof(size_t))
        for i in range(n):
            starts[(src[i].offset >> shift) & (RADIX - 1)] += 1
        total = 0
        for i in range(RADIX):
            c = starts[i]
            starts[i] = total
            total += c
        for i in range(n):
            digit = (src[i].offset >> shift) & (RADIX - 1)
            dst[starts[digit]] = src[i]
            starts[digit] += 1
        swap = src
        src = dst
        dst = swap
        shift += 16
    if src != moved:
        memcpy(moved, src, n * sizeof(Moved))
    free(spare)
    free(starts)
    return 0


cdef int write_all(int fd, const uint8_t *data, size_t size, uint64_t at) except -1:
    cdef ssize_t n
    while size:
        with nogil:
            n = pwrite(fd, data, size, at)
        if n < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, "cannot write the log")
        data += n
        size -= <size_t>n
        at += <uint64_t>n
    return 0


cdef class LogIndex:
    """The live records of an open log: written with append(), copied with compact()."""

    cdef int fd
    cdef uint64_t end  # the file's size: where the next record goes
    cdef uint64_t live  # bytes of the live SUBMIT and FINISH records
    cdef Table reqs
    cdef Table outs

    def __cinit__(self, int fd, uint64_t end):
        self.fd = fd
        self.end = end

    def __dealloc__(self):
        free(self.reqs.slots)
        free(self.outs.slots)

    @property
    def size(self) -> int:
        """Bytes in the file (the header included)."""
        return self.end

    @property
    def live_bytes(self) -> int:
        """Bytes of the records a compaction would keep (the START records it writes aside)."""
        return self.live

    @property
    def requests(self) -> int:
        return self.reqs.count

    @property
    def outcomes(self) -> int:
        return self.outs.count

    def load(self, uint64_t start) -> None:
        """Index the records already in the file, from `start` (past its header) to its
        size: those that log_records.read_log read back whole. Nothing is written."""
        cdef const uint8_t *data
        cdef uint64_t at = start
        cdef uint64_t length
        cdef size_t mapped = <size_t>self.end
        if self.end <= start:
            return
        data = <const uint8_t *>mmap(NULL, mapped, PROT_READ, MAP_SHARED, self.fd, 0)
        if <void *>data == MAP_FAILED:
            raise OSError(errno, "cannot map the log")
        try:
            while at < self.end:
                if self.end - at < LOG_RECORD_HEAD + LOG_ENTRY_SIZE:
                    raise ValueError("log records cut short")
                length = LOG_RECORD_HEAD + <uint64_t>fb_get_u32(data + at)
                if length > self.end - at:
                    raise ValueError("log records cut short")
                self.index(data + at + LOG_RECORD_HEAD, at, <uint32_t>length)
                at += length
        finally:
            munmap(<void *>data, mapped)

    def append(self, bytes blob) -> None:
        """Write records (encoded by the core's journal or log_records) at the end of the
        file, then index them. OSError if the write fails (nothing is indexed then);
        ValueError if blob is not whole records."""
        cdef const uint8_t *data = <const uint8_t *>PyBytes_AS_STRING(blob)
        cdef size_t size = <size_t>PyBytes_GET_SIZE(blob), at = 0, length, home
        while at < size:  # first check it all: nothing half-indexed
            if size - at < LOG_RECORD_HEAD + LOG_ENTRY_SIZE:
                raise ValueError("log records cut short")
            length = LOG_RECORD_HEAD + fb_get_u32(data + at)
            if length > size - at:
                raise ValueError("log records cut short")
            if self.outs.cap and data[at + LOG_RECORD_HEAD] >= J_FINISH:
                # The outcomes' table is large (every kept outcome) and each lookup a
                # cache miss: ask for the turn's slots now, so the misses overlap.
                home = id_hash(data + at + LOG_RECORD_HEAD + 4) & (self.outs.cap - 1)
                prefetch(&self.outs.slots[home])
            at += length
        write_all(self.fd, data, size, self.end)
        at = 0
        while at < size:
            length = LOG_RECORD_HEAD + fb_get_u32(data + at)
            self.index(data + at + LOG_RECORD_HEAD, self.end + at, <uint32_t>length)
            at += length
        self.end += size

    cdef int index(self, const uint8_t *body, uint64_t offset, uint32_t length) except -1:
        """One record's change to the live set, as log_records.read_log makes it."""
        cdef const uint8_t *rid = body + 4
        cdef Py_ssize_t i
        cdef Slot *s
        if body[0] == J_SUBMIT:
            if table_find(&self.reqs, rid) < 0:  # a second SUBMIT of an id changes nothing
                s = table_add(&self.reqs, rid)
                s.offset = offset
                s.length = length
                s.attempts = fb_get_u32(body + LOG_ENTRY_SIZE)
                self.live += length
        elif body[0] == J_START:
            i = table_find(&self.reqs, rid)
            if i >= 0:
                self.reqs.slots[i].attempts = fb_get_u32(body + LOG_ENTRY_SIZE)
        elif body[0] == J_FINISH:
            i = table_find(&self.reqs, rid)
            if i >= 0:
                self.live -= self.reqs.slots[i].length
                table_remove(&self.reqs, <size_t>i)
            i = table_find(&self.outs, rid)
            if i >= 0:
                s = &self.outs.slots[i]
                self.live -= s.length
            else:
                s = table_add(&self.outs, rid)
            s.offset = offset
            s.length = length
            self.live += length
        elif body[0] == J_FORGET:
            i = table_find(&self.outs, rid)
            if i >= 0:
                self.live -= self.outs.slots[i].length
                table_remove(&self.outs, <size_t>i)
        return 0

    def compact(self, int fd, uint64_t start) -> int:
        """Copy the live records to fd from offset `start` (its header before it): the
        outcomes, then the requests, each in the order written, a request that started
        followed by a START with its attempts. Then fd is the file written and this one
        is no longer used. Returns the new size. OSError if a write fails: nothing
        changes then."""
        cdef Moved *order = NULL
        cdef uint64_t *new_offsets = NULL
        cdef uint8_t *buf = NULL
        cdef const uint8_t *old = NULL
        cdef size_t n = self.reqs.count + self.outs.count, k = 0, i, fill = 0, nouts
        cdef uint64_t at = start, live = 0
        cdef size_t mapped = <size_t>self.end
        cdef Slot *s
        cdef uint8_t start_rec[LOG_RECORD_HEAD + LOG_START_SIZE]
        cdef uint8_t *body = start_rec + LOG_RECORD_HEAD
        try:
            order = <Moved *>malloc((n + 1) * sizeof(Moved))
            new_offsets = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
            buf = <uint8_t *>malloc(COPY_BUFFER)
            if order == NULL or new_offsets == NULL or buf == NULL:
                raise MemoryError()
            old = <const uint8_t *>mmap(NULL, mapped, PROT_READ, MAP_SHARED, self.fd, 0)
            if <void *>old == MAP_FAILED:
                old = NULL
                raise OSError(errno, "cannot map the log")
            for i in range(self.outs.cap):
                if self.outs.slots[i].used:
                    order[k].offset = self.outs.slots[i].offset
                    order[k].slot = i
                    k += 1
            nouts = k
            for i in range(self.reqs.cap):
                if self.reqs.slots[i].used:
                    order[k].offset = self.reqs.slots[i].offset
                    order[k].slot = i
                    k += 1
            sort_by_offset(order, nouts)
            sort_by_offset(order + nouts, n - nouts)
            for k in range(n):
                s = &self.outs.slots[order[k].slot] if k < nouts else &self.reqs.slots[order[k].slot]
                if fill + s.length > COPY_BUFFER:
                    write_all(fd, buf, fill, at - fill)
                    fill = 0
                new_offsets[k] = at
                if s.length > COPY_BUFFER:
                    write_all(fd, old + s.offset, s.length, at)
                else:
                    memcpy(buf + fill, old + s.offset, s.length)
                    fill += s.length
                at += s.length
                live += s.length
                if k >= nouts and s.attempts != fb_get_u32(old + s.offset + LOG_RECORD_HEAD + LOG_ENTRY_SIZE):
                    if fill + sizeof(start_rec) > COPY_BUFFER:
                        write_all(fd, buf, fill, at - fill)
                        fill = 0
                    body[0] = J_START
                    body[1] = body[2] = body[3] = 0
                    memcpy(body + 4, s.id, REQUEST_ID_SIZE)
                    fb_put_u32(body + LOG_ENTRY_SIZE, s.attempts)
                    fb_put_u32(start_rec, LOG_START_SIZE)
                    fb_put_u32(start_rec + 4, fb_crc32(body, LOG_START_SIZE))
                    memcpy(buf + fill, start_rec, sizeof(start_rec))
                    fill += sizeof(start_rec)
                    at += sizeof(start_rec)
            write_all(fd, buf, fill, at - fill)
            for k in range(n):  # written: now the index may point into the new file
                s = &self.outs.slots[order[k].slot] if k < nouts else &self.reqs.slots[order[k].slot]
                s.offset = new_offsets[k]
            self.fd = fd
            self.end = at
            self.live = live
            return at
        finally:
            if old != NULL:
                munmap(<void *>old, mapped)
            free(order)
            free(new_offsets)
            free(buf)
