// SaveJob: writes one checkpoint file from caller-owned record bytes, in
// parallel aligned blocks, and commits it durably:
//   temp file -> blocks -> fdatasync -> rename -> fsync(directory).
//
// The file is cut into aligned blocks, claimed in order by up to queue_depth
// runners. Each block checksums its payload pieces while copying them; a block
// that holds data descriptors or the central directory (bytes that depend on
// CRCs) waits only until every earlier block is checksummed, so checksumming
// and writing overlap in one pass. On any error the temporary file is removed
// and the destination is untouched.
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
  uint64_t base_offset = 0;      // where the archive starts in the file (multiple of 4096)
  bool into_existing = false;    // write into an existing file; no temp file, sync or rename
};

// Starts writing `records` to `path` on `pool`; returns at once.
// REQUIRES: every RecordSpec::data stays valid and unchanged until the
// ticket's WaitSourcesReleased() returns (at the latest, until it is done).
// `pool` and `buffers` (of options.block_bytes + 2 pages) must outlive the job.
std::shared_ptr<Ticket> StartSave(const std::string& path, std::vector<RecordSpec> records,
                                  const WriteOptions& options, ThreadPool* pool, BufferPool* buffers);

}  // namespace ckptio
