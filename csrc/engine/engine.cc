#include "engine.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <new>

#include "fault_injection.h"

namespace ckptio {

Engine::Engine(const EngineOptions& options)
    : options_(options),
      owner_pid_(::getpid()),
      // Reads block in the kernel, not on a core: the I/O pool always has a
      // thread for each request in flight plus the read prefaulter, however
      // few cores there are. Copies stay at num_threads (they are CPU work).
      pool_(std::make_unique<ThreadPool>(std::max(options.num_threads, options.queue_depth + 1))),
      copy_pool_(options.num_threads > 1 ? std::make_unique<ThreadPool>(options.num_threads - 1) : nullptr) {}

Engine::~Engine() {
  // After fork() only the forking thread exists in the child; joining the
  // parent's workers would hang, so the child leaks them.
  if (::getpid() != owner_pid_) {
    (void)pool_.release();
    (void)copy_pool_.release();
  }
}

BufferPool* Engine::BuffersFor(size_t block_bytes) {
  std::lock_guard<std::mutex> lock(buffers_mu_);
  auto& pool = buffers_[block_bytes];
  if (!pool) pool = std::make_unique<BufferPool>(block_bytes + 2 * kPageSize);
  return pool.get();
}

std::shared_ptr<Ticket> Engine::Save(const std::string& path, std::vector<RecordSpec> records, uint64_t alignment,
                                     size_t block_bytes, size_t queue_depth, uint64_t base_offset,
                                     bool into_existing) {
  WriteOptions w;
  w.block_bytes = block_bytes ? block_bytes : options_.block_bytes;
  w.queue_depth = queue_depth ? queue_depth : options_.queue_depth;
  w.direct = options_.direct;
  w.alignment = alignment;
  w.base_offset = base_offset;
  w.into_existing = into_existing;
  return StartSave(path, std::move(records), w, pool_.get(), BuffersFor(w.block_bytes));
}

ReadHandle Engine::Read(const std::string& path, std::vector<ReadRequest> requests) {
  ReadOptions r;
  r.block_bytes = options_.block_bytes;
  r.queue_depth = options_.queue_depth;
  r.direct = options_.direct;
  r.zero_copy = options_.zero_copy_reads;
  r.prefault = options_.read_prefault;
  return StartRead(path, std::move(requests), r, pool_.get(), BuffersFor(r.block_bytes));
}

Status Engine::ReadDirectory(const std::string& path, std::vector<ZipEntry>* entries, uint64_t* file_size,
                             uint64_t base, uint64_t size) {
  ReadableFile file;
  Status s = ReadableFile::Open(path, DirectIoMode::kOff, &file);
  if (!s.ok()) return s;
  *file_size = file.size();
  return ReadZipDirectory(&file, base, size, entries);
}

Status Engine::ReadDirectories(const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& windows,
                               std::vector<std::vector<ZipEntry>>* entries) {
  ReadableFile file;
  Status s = ReadableFile::Open(path, DirectIoMode::kOff, &file);
  if (!s.ok()) return s;
  entries->assign(windows.size(), {});
  std::vector<Status> results(windows.size());
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  const size_t workers = std::max<size_t>(1, std::min(options_.queue_depth, windows.size()));
  size_t running = workers;
  for (size_t w = 0; w < workers; ++w) {
    pool_->Submit([&] {
      for (size_t i = next.fetch_add(1); i < windows.size(); i = next.fetch_add(1)) {
        try {  // pool tasks must not throw; a hostile directory size could make the parser's buffer fail
          results[i] = ReadZipDirectory(&file, windows[i].first, windows[i].second, &(*entries)[i]);
        } catch (const std::bad_alloc&) {
          results[i] = Status::IOError(ENOMEM, path, "out of memory reading an archive directory");
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      if (--running == 0) cv.notify_all();
    });
  }
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return running == 0; });
  for (const Status& r : results)
    if (!r.ok()) return r;
  return Status::OK();
}

Status Engine::Copy(const std::vector<CopySpan>& spans) {
  if (int err = FaultInjector::Get().BeforeCopy()) {
    return Status::FromErrno(err, "snapshot copy (injected fault)", "");
  }
  ParallelCopy(spans, copy_pool_.get());
  return Status::OK();
}

}  // namespace ckptio
