// Engine: the process-wide owner of the worker threads and I/O buffers that
// every save, load and verify job runs on. Knows bytes, files and records,
// never tensors or Python objects.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "parallel_copy.h"
#include "read_job.h"
#include "save_job.h"
#include "thread_pool.h"
#include "ticket.h"
#include "zip_directory.h"

namespace ckptio {

struct EngineOptions {
  size_t num_threads = 2;
  size_t block_bytes = 8 << 20;  // multiple of 4096
  size_t queue_depth = 4;
  DirectIoMode direct = DirectIoMode::kAuto;
  bool zero_copy_reads = false;  // see ReadOptions::zero_copy
  bool read_prefault = true;     // see ReadOptions::prefault (off only to measure what it buys)
};

class Engine {
 public:
  // REQUIRES: options validated by the caller (ckptio/config.py does it).
  explicit Engine(const EngineOptions& options);
  // Finishes every queued job, then joins the workers. In a forked child,
  // where the workers do not exist, it abandons them instead.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // See StartSave: `records` must stay valid until the ticket releases them.
  // A non-zero block_bytes / queue_depth overrides the engine's for this job
  // (streaming saves use a pair of chunk-sized blocks).
  // With `into_existing`, the archive is written at `base_offset` (a multiple
  // of 4096) of the existing file `path`, which is neither synced nor renamed:
  // the caller assembles several archives into one file and commits it.
  std::shared_ptr<Ticket> Save(const std::string& path, std::vector<RecordSpec> records, uint64_t alignment,
                               size_t block_bytes = 0, size_t queue_depth = 0, uint64_t base_offset = 0,
                               bool into_existing = false);
  // See StartRead: destinations must stay valid until the ticket is done.
  ReadHandle Read(const std::string& path, std::vector<ReadRequest> requests);
  // Synchronous: parses the archive directory of `path`, or of the archive
  // occupying bytes [base, base + size) of it.
  Status ReadDirectory(const std::string& path, std::vector<ZipEntry>* entries, uint64_t* file_size,
                       uint64_t base = 0, uint64_t size = UINT64_MAX);
  // Synchronous: the directories of many archives in one file (windows of
  // {base, size}, as in a DCP rank file), parsed queue_depth at a time on the
  // I/O threads. Fails with the first failing window's status.
  Status ReadDirectories(const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& windows,
                         std::vector<std::vector<ZipEntry>>* entries);

  // Synchronous: copies every span on the engine's copy threads and the
  // calling thread (see ParallelCopy). Copies never queue behind file I/O.
  // Fails only when a test has armed a kCopyError fault.
  Status Copy(const std::vector<CopySpan>& spans);

  const EngineOptions& options() const { return options_; }

 private:
  BufferPool* BuffersFor(size_t block_bytes);

  const EngineOptions options_;
  const int owner_pid_;
  // Bounce buffers by block size. Declared before pool_: they outlive the workers.
  std::mutex buffers_mu_;
  std::map<size_t, std::unique_ptr<BufferPool>> buffers_;
  std::unique_ptr<ThreadPool> pool_;
  // Snapshot copies: num_threads - 1 workers, the caller being the last
  // (none with one thread: the caller copies alone).
  std::unique_ptr<ThreadPool> copy_pool_;
};

}  // namespace ckptio
