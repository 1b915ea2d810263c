#ifndef TANDEM_CRC32C_H
#define TANDEM_CRC32C_H
#include <stddef.h>
#include <stdint.h>

/// Extends a CRC32C (Castagnoli) over `length` bytes. Start with 0; the value is
/// pre- and post-inverted inside, so calls chain: crc(a+b) == extend(extend(0,a),b).
uint32_t tandem_crc32c_extend(uint32_t crc, const void *data, size_t length);

/// 1 when the SSE4.2 crc32 instruction is used, 0 for the table fallback.
int tandem_crc32c_hardware(void);
#endif
