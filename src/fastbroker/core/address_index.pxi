# core/address_index.pxi: AddrIndex, worker address (length-prefixed routing frames)
# -> slot. Open addressing with linear probing; backward-shift deletion keeps probe
# chains intact without tombstones. The index owns its keys.
#
# Owns: an AddrIndex's entries and keys (structs in _core.pxd).
# Touches: nothing else. Users: IdleWorkers (its index) and WorkerSessions (its index),
# with the same key format, so a session's key finds the worker in the idle FIFO.

cdef inline uint64_t hash_bytes(const uint8_t *p, size_t n) noexcept nogil:
    # FNV-1a: identities are short and chosen by peers; this only spreads them.
    cdef uint64_t h = 14695981039346656037ULL
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef uint8_t *make_key(zmsg *frames, int n, size_t *keylen) noexcept nogil:
    """Malloc'd length-prefixed concatenation of n routing frames, or NULL."""
    cdef size_t total = 0, off = 0, sz
    cdef int i
    cdef uint8_t *key
    for i in range(n):
        total += 4 + zmsg_size(&frames[i])
    key = <uint8_t *>malloc(total if total else 1)
    if key == NULL:
        return NULL
    for i in range(n):
        sz = zmsg_size(&frames[i])
        key[off] = sz & 0xFF
        key[off + 1] = (sz >> 8) & 0xFF
        key[off + 2] = (sz >> 16) & 0xFF
        key[off + 3] = (sz >> 24) & 0xFF
        memcpy(key + off + 4, zmsg_data(&frames[i]), sz)
        off += 4 + sz
    keylen[0] = total
    return key


cdef int aidx_find(AddrIndex *m, const uint8_t *key, size_t keylen, uint64_t h) noexcept nogil:
    """Entry index holding key, or -1."""
    cdef size_t i, mask
    if m.cap == 0:
        return -1
    mask = m.cap - 1
    i = h & mask
    while m.ents[i].key != NULL:
        if m.ents[i].hash == h and m.ents[i].keylen == keylen and memcmp(m.ents[i].key, key, keylen) == 0:
            return <int>i
        i = (i + 1) & mask
    return -1


cdef inline void aidx_place(AEnt *ents, size_t mask, AEnt e) noexcept nogil:
    cdef size_t i = e.hash & mask
    while ents[i].key != NULL:
        i = (i + 1) & mask
    ents[i] = e


cdef int aidx_insert(AddrIndex *m, uint8_t *key, size_t keylen, uint64_t h, uint32_t value) noexcept nogil:
    """Add key (not present) -> value, taking ownership of key. -1 when out of memory
    (the key then stays the caller's)."""
    cdef size_t i, ncap
    cdef AEnt *nents
    cdef AEnt e
    if (m.count + 1) * 2 > m.cap:
        ncap = m.cap * 2 if m.cap else 16
        nents = <AEnt *>malloc(ncap * sizeof(AEnt))
        if nents == NULL:
            return -1
        memset(nents, 0, ncap * sizeof(AEnt))
        for i in range(m.cap):
            if m.ents[i].key != NULL:
                aidx_place(nents, ncap - 1, m.ents[i])
        free(m.ents)
        m.ents = nents
        m.cap = ncap
    e.hash = h
    e.key = key
    e.keylen = keylen
    e.value = value
    aidx_place(m.ents, m.cap - 1, e)
    m.count += 1
    return 0


cdef void aidx_delete(AddrIndex *m, size_t i) noexcept nogil:
    """Remove entry i and free its key."""
    cdef size_t mask = m.cap - 1
    cdef size_t j = i, k
    free(m.ents[i].key)
    m.ents[i].key = NULL
    m.count -= 1
    while True:
        j = (j + 1) & mask
        if m.ents[j].key == NULL:
            return
        k = m.ents[j].hash & mask
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            m.ents[i] = m.ents[j]
            m.ents[j].key = NULL
            i = j


cdef void aidx_free(AddrIndex *m) noexcept nogil:
    cdef size_t i
    for i in range(m.cap):
        free(m.ents[i].key)
    free(m.ents)
    m.ents = NULL
    m.cap = m.count = 0
