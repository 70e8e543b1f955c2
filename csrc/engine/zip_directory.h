// Reads the central directory of a zip archive, treating every number in the
// file as hostile: each offset and size is checked against the file's real
// size before anything is allocated or read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "file_io.h"
#include "status.h"

namespace ckptio {

struct ZipEntry {
  std::string name;
  uint64_t header_offset;  // local header
  uint64_t end_offset;     // where the next record (or the directory) begins
  uint64_t size;
  uint32_t crc;
};

// Parses the directory of `file` (its tail only: local headers are read with
// the payloads). Fails with Corrupt (naming the part) for anything that is
// not a well-formed archive of stored records, each fitting between its
// header and the next record.
//
// The archive may be a window of the file: bytes [base, base + size) (as in a
// torch.distributed.checkpoint file, where each tensor is an archive at some
// offset). Offsets inside it are relative to `base`; the entries' offsets are
// returned absolute, ready for a ReadJob on the whole file.
Status ReadZipDirectory(ReadableFile* file, uint64_t base, uint64_t size, std::vector<ZipEntry>* entries);

}  // namespace ckptio
