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
Status ReadZipDirectory(ReadableFile* file, std::vector<ZipEntry>* entries);

}  // namespace ckptio
