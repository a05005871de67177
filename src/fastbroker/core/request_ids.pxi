# core/request_ids.pxi: CidIndex, the 16-byte FBC01 request id -> value index, keys
# stored inline, and RequestIds, the class around one.
# Open addressing with linear probing. It grows without a pause: a full table
# is replaced by one twice its size, and the old one's entries move over a
# few at every insert, while lookups search both. The old table only loses
# entries (to tombstones, so its probe chains stay whole); the new one is an
# ordinary table with backward-shift deletion.
#
# Owns: a CidIndex's tables (structs in _core.pxd).
# Touches: nothing else. Users: BrokerCore's `ids` (id -> request slot, or kept
# outcome slot | DONE_BIT), shared by ClientSide and KeptOutcomes; tests use it alone.

cdef enum:
    CID_EMPTY = 0
    CID_TOMB = 1
    CID_MOVES_PER_INSERT = 8  # old buckets moved per insert: done long before the next growth
    HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
    PREFETCH_AHEAD = 8  # batches (SUBMIT, ANSWER) ask for the id slots of the records this far ahead


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *address, size_t length, int advice)
    int MADV_HUGEPAGE


cdef inline size_t cid_table_bytes(size_t cap) noexcept nogil:
    """What a table of cap entries takes: a big one in whole huge pages."""
    cdef size_t size = cap * sizeof(CEnt)
    if size < HUGE_PAGE:
        return size
    return (size + HUGE_PAGE - 1) & ~(<size_t>HUGE_PAGE - 1)


cdef CEnt *cid_table_alloc(size_t cap) noexcept nogil:
    """A zeroed table of cap entries, or NULL. One of 2 MiB or more is mapped on its own
    and asked to live on huge pages (transparent huge pages, where the system offers
    them on request): its lookups land anywhere in it, and with 4 KiB pages each was a
    TLB miss besides a cache miss, a page walk that a VM makes longer still. Its pages
    are zero and come as they are first touched: no pause to clear it."""
    cdef size_t size = cid_table_bytes(cap)
    cdef void *table
    if size < HUGE_PAGE:
        return <CEnt *>calloc(cap, sizeof(CEnt))
    table = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if table == MAP_FAILED:
        return NULL
    madvise(table, size, MADV_HUGEPAGE)  # advice: without it, ordinary pages
    return <CEnt *>table


cdef void cid_table_free(CEnt *table, size_t cap) noexcept nogil:
    """Give back a table of cid_table_alloc(cap)."""
    cdef size_t size = cid_table_bytes(cap)
    if table == NULL:
        return
    if size < HUGE_PAGE:
        free(table)
    else:
        munmap(table, size)


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64's finalizer: every input bit reaches every output bit, so
    # sequential or patterned ids spread as well as random ones.
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline uint64_t cid_hash(const CidIndex *m, const uint8_t *key) noexcept nogil:
    cdef uint64_t a, b
    memcpy(&a, key, 8)
    memcpy(&b, key + 8, 8)
    return mix64(a ^ mix64(b ^ m.seed))


cdef inline uint32_t cid_tag(uint64_t h) noexcept nogil:
    return <uint32_t>(h >> 32) | 2


cdef inline CEnt *cid_probe(CEnt *ents, size_t cap, const uint8_t *key, uint64_t h) noexcept nogil:
    cdef size_t mask = cap - 1
    cdef size_t i = h & mask
    cdef uint32_t tag = cid_tag(h)
    while ents[i].tag != CID_EMPTY:
        if ents[i].tag == tag and memcmp(ents[i].key, key, 16) == 0:
            return &ents[i]
        i = (i + 1) & mask
    return NULL


cdef inline void cidx_prefetch(const CidIndex *m, const uint8_t *key) noexcept nogil:
    """Ask for the cache line of key's home slot, for a cidx_find to come: with many kept
    outcomes the table is far larger than the caches and each lookup a miss; asked for
    a batch at a time, the misses overlap instead of following one another."""
    if m.cap:
        prefetch(&m.ents[cid_hash(m, key) & (m.cap - 1)])


cdef CEnt *cidx_find(CidIndex *m, const uint8_t *key) noexcept nogil:
    """The entry holding key, or NULL. Valid until the next insert or delete."""
    cdef uint64_t h
    cdef CEnt *e
    if m.cap == 0:
        return NULL
    h = cid_hash(m, key)
    e = cid_probe(m.ents, m.cap, key, h)
    if e == NULL and m.old != NULL:
        e = cid_probe(m.old, m.old_cap, key, h)
    return e


cdef inline void cid_place(CEnt *ents, size_t cap, const uint8_t *key, uint64_t h, uint32_t value) noexcept nogil:
    cdef size_t mask = cap - 1
    cdef size_t i = h & mask
    while ents[i].tag != CID_EMPTY:
        i = (i + 1) & mask
    memcpy(ents[i].key, key, 16)
    ents[i].value = value
    ents[i].tag = cid_tag(h)


cdef void cid_move_some(CidIndex *m, size_t n) noexcept nogil:
    cdef CEnt *e
    while n and m.old != NULL:
        e = &m.old[m.old_next]
        if e.tag > CID_TOMB:
            cid_place(m.ents, m.cap, e.key, cid_hash(m, e.key), e.value)
            e.tag = CID_TOMB
        m.old_next += 1
        n -= 1
        if m.old_next == m.old_cap:
            cid_table_free(m.old, m.old_cap)
            m.old = NULL
            m.old_cap = m.old_next = 0


cdef int cidx_insert(CidIndex *m, const uint8_t *key, uint32_t value) noexcept nogil:
    """Add key (not present) -> value. -1 when out of memory."""
    cdef size_t ncap
    cdef CEnt *nents
    if (m.count + 1) * 2 > m.cap:
        if m.old != NULL:
            cid_move_some(m, m.old_cap)  # not reached at the pace below; kept as a bound
        ncap = m.cap * 2 if m.cap else 64
        nents = cid_table_alloc(ncap)
        if nents == NULL:
            return -1
        m.old = m.ents
        m.old_cap = m.cap
        m.old_next = 0
        m.ents = nents
        m.cap = ncap
    cid_place(m.ents, m.cap, key, cid_hash(m, key), value)
    m.count += 1
    cid_move_some(m, CID_MOVES_PER_INSERT)
    return 0


cdef void cidx_delete(CidIndex *m, CEnt *e) noexcept nogil:
    """Remove the entry e (from cidx_find)."""
    cdef size_t mask, i, j, k
    m.count -= 1
    if m.old != NULL and e >= m.old and e < m.old + m.old_cap:
        e.tag = CID_TOMB
        return
    mask = m.cap - 1
    i = <size_t>(e - m.ents)
    j = i
    m.ents[i].tag = CID_EMPTY
    while True:
        j = (j + 1) & mask
        if m.ents[j].tag == CID_EMPTY:
            return
        k = cid_hash(m, m.ents[j].key) & mask
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            m.ents[i] = m.ents[j]
            m.ents[j].tag = CID_EMPTY
            i = j


cdef void cidx_free(CidIndex *m) noexcept nogil:
    cid_table_free(m.ents, m.cap)
    cid_table_free(m.old, m.old_cap)
    m.ents = m.old = NULL
    m.cap = m.count = m.old_cap = m.old_next = 0


cdef class RequestIds:
    """The 16-byte request-id index on its own (for tests): id -> 32-bit value."""

    def __cinit__(self, seed=None):
        self.m.seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed

    def __dealloc__(self):
        cidx_free(&self.m)

    cdef const uint8_t *_key(self, bytes key) except NULL:
        if len(key) != REQUEST_ID_SIZE:
            raise ValueError("a request id is 16 bytes")
        return <const uint8_t *><const char *>key

    # -- the core's interface ------------------------------------------------

    cdef inline CEnt *entry(self, const uint8_t *key) noexcept nogil:
        """The entry holding key, or NULL. Valid until the next add or remove."""
        return cidx_find(&self.m, key)

    cdef inline void prefetch(self, const uint8_t *key) noexcept nogil:
        """Start bringing key's slot into the cache, for an entry() soon after."""
        cidx_prefetch(&self.m, key)

    cdef inline int add(self, const uint8_t *key, uint32_t value) noexcept nogil:
        """Add key (not present) -> value. -1 when out of memory."""
        return cidx_insert(&self.m, key, value)

    cdef inline void remove(self, CEnt *e) noexcept nogil:
        """Remove the entry e (from entry())."""
        cidx_delete(&self.m, e)

    cdef void clear(self) noexcept nogil:
        """Forget every id (the seed stays)."""
        cidx_free(&self.m)

    # -- Python interface (tests) --------------------------------------------

    def insert(self, bytes key, uint32_t value):
        """Add key -> value; KeyError if key is there already."""
        cdef const uint8_t *k = self._key(key)
        if cidx_find(&self.m, k) != NULL:
            raise KeyError(key)
        if cidx_insert(&self.m, k, value) < 0:
            raise MemoryError()

    def get(self, bytes key):
        """The value of key, or None."""
        cdef CEnt *e = cidx_find(&self.m, self._key(key))
        return None if e == NULL else e.value

    def delete(self, bytes key):
        """Remove key; False if it was not there."""
        cdef CEnt *e = cidx_find(&self.m, self._key(key))
        if e == NULL:
            return False
        cidx_delete(&self.m, e)
        return True

    @property
    def growing(self):
        """True while entries of a smaller table are still being moved over."""
        return self.m.old != NULL

    def __len__(self):
        return self.m.count
