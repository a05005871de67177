# The CRC-32 and little-endian stores of _crc32.h, for the log store's records: shared
# by fastbroker._core (core/journal.pxi's encode) and fastbroker.server._log_index.

from libc.stdint cimport int32_t, uint8_t, uint32_t


cdef extern from "_crc32.h" nogil:
    void fb_crc32_init()
    uint32_t fb_crc32(const uint8_t *p, size_t n)
    void fb_put_u32(uint8_t *p, uint32_t v)
    void fb_put_i32(uint8_t *p, int32_t v)
    void fb_put_f64(uint8_t *p, double v)
    uint32_t fb_get_u32(const uint8_t *p)
