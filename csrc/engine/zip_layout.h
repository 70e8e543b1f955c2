// The byte layout of torch.save's zip archive (miniz as PyTorch patches it),
// planned from (name, size) pairs before any byte is written.
//
// Every record is stored uncompressed behind a 30-byte local header whose CRC
// and sizes are zero, an optional ZIP64 extra and an "FB" padding extra that
// puts the payload on an `alignment` boundary. A data descriptor (16 bytes,
// 24 with ZIP64) follows each non-empty payload. The central directory, the
// ZIP64 end record and locator, and the classic end record close the file.
// CRCs appear only in descriptors and the directory, so payloads can be
// written in any order and those two filled in last.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "status.h"

namespace ckptio {

struct RecordSpec {
  std::string name;         // full name inside the archive, e.g. "model/data/0"
  const uint8_t* data;      // REQUIRES: valid for `size` bytes until the save completes
  uint64_t size;
};

struct RecordPlacement {
  uint64_t header_offset;      // local header
  uint64_t data_offset;        // first payload byte; a multiple of the alignment
  uint64_t size;
  uint32_t descriptor_size;    // 0 for empty records
  bool zip64;                  // size or header offset >= 0xFFFFFFFF
  std::string header_bytes;    // local header + name + extras: [header_offset, data_offset)
};

class ZipLayout {
 public:
  // Plans `records` in order. Fails on names longer than 65535 bytes or an
  // alignment that is not a power of two in [64, 65536].
  static Status Plan(const std::vector<RecordSpec>& records, uint64_t alignment, ZipLayout* out);

  const std::vector<RecordPlacement>& records() const { return records_; }
  uint64_t central_directory_offset() const { return cd_offset_; }
  uint64_t tail_size() const { return tail_size_; }  // directory + end records
  uint64_t file_size() const { return cd_offset_ + tail_size_; }

  // The data descriptor of record i (descriptor_size bytes) for `crc`.
  std::string Descriptor(size_t i, uint32_t crc) const;
  // Central directory + ZIP64 end + locator + end record, for the records' CRCs.
  std::string Tail(const std::vector<uint32_t>& crcs) const;

 private:
  std::vector<RecordPlacement> records_;
  std::vector<std::string> names_;
  uint64_t cd_offset_ = 0;
  uint64_t tail_size_ = 0;
};

}  // namespace ckptio
