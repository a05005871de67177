/* CRC-32 (the IEEE polynomial, zlib.crc32's) and little-endian stores, for the log
 * store's records: core/journal.pxi writes records, server/_log_index.pyx writes the
 * START records of a compaction; log_records.py checks both with zlib.crc32.
 *
 * Slicing by 8 (eight 1 KiB tables): about 1 ns a byte, against ~3 for a byte at a
 * time; a job's three records are ~150 bytes. The tables are the module's own
 * (static): fb_crc32_init() fills them once, at the module's import.
 */
#ifndef FASTBROKER_CRC32_H
#define FASTBROKER_CRC32_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fastbroker's log records are little-endian and written with memcpy: a big-endian build needs byte swaps"
#endif

static uint32_t fb_crc32_table[8][256];

static void fb_crc32_init(void) {
    uint32_t i, c;
    int k;
    for (i = 0; i < 256; i++) {
        c = i;
        for (k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        fb_crc32_table[0][i] = c;
    }
    for (i = 0; i < 256; i++) {
        c = fb_crc32_table[0][i];
        for (k = 1; k < 8; k++) {
            c = fb_crc32_table[0][c & 0xff] ^ (c >> 8);
            fb_crc32_table[k][i] = c;
        }
    }
}

static uint32_t fb_crc32(const uint8_t *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu, a, b;
    while (n >= 8) {
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= crc;
        crc = fb_crc32_table[7][a & 0xff] ^ fb_crc32_table[6][(a >> 8) & 0xff] ^
              fb_crc32_table[5][(a >> 16) & 0xff] ^ fb_crc32_table[4][a >> 24] ^
              fb_crc32_table[3][b & 0xff] ^ fb_crc32_table[2][(b >> 8) & 0xff] ^
              fb_crc32_table[1][(b >> 16) & 0xff] ^ fb_crc32_table[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = fb_crc32_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static inline void fb_put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void fb_put_i32(uint8_t *p, int32_t v) { memcpy(p, &v, 4); }
static inline void fb_put_f64(uint8_t *p, double v) { memcpy(p, &v, 8); }
static inline uint32_t fb_get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

#endif
