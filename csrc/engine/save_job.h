// SaveJob: writes one checkpoint file from caller-owned record bytes, in
// parallel aligned blocks, and commits it durably:
//   temp file -> blocks -> fdatasync -> rename -> fsync(directory).
//
// Phase 1 writes every block that holds no CRC-dependent bytes (descriptors,
// central directory) and computes the CRC of every payload piece it sees.
// Phase 2 combines the pieces, fills descriptors and the directory, and
// writes the remaining blocks. On any error the temporary file is removed and
// the destination is untouched.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "file_io.h"
#include "thread_pool.h"
#include "ticket.h"
#include "zip_layout.h"

namespace ckptio {

struct WriteOptions {
  size_t block_bytes = 8 << 20;  // multiple of 4096
  size_t queue_depth = 4;        // blocks in flight for this file
  DirectIoMode direct = DirectIoMode::kAuto;
  uint64_t alignment = 4096;     // payload alignment inside the archive
};

// Starts writing `records` to `path` on `pool`; returns at once.
// REQUIRES: every RecordSpec::data stays valid and unchanged until the
// returned ticket is done. `pool` and `buffers` must outlive the job.
std::shared_ptr<Ticket> StartSave(const std::string& path, std::vector<RecordSpec> records,
                                  const WriteOptions& options, ThreadPool* pool, BufferPool* buffers);

}  // namespace ckptio
