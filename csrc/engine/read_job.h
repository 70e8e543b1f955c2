// ReadJob: reads records of a checkpoint in parallel, O_DIRECT where the
// offsets allow, verifying each record's CRC-32 as its bytes arrive.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "file_io.h"
#include "thread_pool.h"
#include "ticket.h"

namespace ckptio {

struct ReadRequest {
  std::string name;      // for error messages
  uint64_t offset;       // file offset of the payload
  uint64_t size;
  uint32_t crc;          // expected CRC-32
  bool verify;           // compare against `crc`
  uint8_t* dest;         // null: checksum only (verify without keeping the bytes)
  uint64_t dest_capacity;  // >= size; page-aligned dest with capacity >= RoundUp(size, 4096)
                           // lets whole pages be read with O_DIRECT
};

struct ReadOptions {
  size_t block_bytes = 8 << 20;
  size_t queue_depth = 4;
  DirectIoMode direct = DirectIoMode::kAuto;
};

// Starts reading `requests` from `path` on `pool`; returns at once.
// REQUIRES: every dest stays valid until the ticket is done. `buffers` hands
// out buffers of at least block_bytes + 2 pages.
std::shared_ptr<Ticket> StartRead(const std::string& path, std::vector<ReadRequest> requests,
                                  const ReadOptions& options, ThreadPool* pool, BufferPool* buffers);

}  // namespace ckptio
