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
  uint64_t header_offset;
  uint64_t data_offset;  // first payload byte, from the local header
  uint64_t size;
  uint32_t crc;
};

// Parses the directory of `file`. Fails with Corrupt (naming the part) for
// anything that is not a well-formed archive of stored records lying wholly
// inside the file.
Status ReadZipDirectory(ReadableFile* file, std::vector<ZipEntry>* entries);

}  // namespace ckptio
