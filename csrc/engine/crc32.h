// CRC-32 with zip's (IEEE, reflected 0xEDB88320) polynomial: the checksum that
// zip readers, `unzip -t` and ckptio.load verify.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ckptio {

// Extends `crc` (the CRC of earlier bytes, 0 for none) over data[0, len).
// Uses PCLMULQDQ folding when the CPU has it, slicing-by-8 otherwise.
// Thread-safe; pure function.
uint32_t Crc32(uint32_t crc, const void* data, size_t len);

// The same, always with the portable table code (for tests and the benchmark).
uint32_t Crc32Portable(uint32_t crc, const void* data, size_t len);

// CRC of A||B given crc(A), crc(B) and len(B): lets chunks be checksummed in
// parallel and combined in O(log len) time.
uint32_t Crc32Combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// "pclmul" or "portable": what Crc32 uses on this CPU.
const char* Crc32Backend();

}  // namespace ckptio
