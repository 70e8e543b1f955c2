// Ticket: the shared state of one queued engine job, and the caller's handle
// on it. Workers record progress and the first error; any thread may wait.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "status.h"

namespace ckptio {

struct JobStats {
  std::string path;
  uint64_t bytes = 0;      // file bytes written or payload bytes read
  double seconds = 0;      // from submission to completion
  bool direct_io = false;  // whether O_DIRECT carried the bulk of the I/O
  uint64_t block_bytes = 0;  // size of one I/O request
};

class Ticket {
 public:
  Ticket() : start_(std::chrono::steady_clock::now()) {}

  // Blocks up to `timeout_seconds` (< 0: forever); true once the job is done.
  bool Wait(double timeout_seconds) {
    std::unique_lock<std::mutex> lock(mu_);
    if (timeout_seconds < 0) {
      cv_.wait(lock, [this] { return done_; });
      return true;
    }
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), [this] { return done_; });
  }
  bool done() const {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  // Save jobs: blocks until the job no longer reads the caller's record
  // memory (it may still be writing from its own buffers, syncing and
  // renaming); true once that is so. Every finished job has released it.
  bool WaitSourcesReleased(double timeout_seconds) {
    std::unique_lock<std::mutex> lock(mu_);
    auto ready = [this] { return released_ || done_; };
    if (timeout_seconds < 0) {
      cv_.wait(lock, ready);
      return true;
    }
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), ready);
  }
  // REQUIRES: done(). The first error any worker hit, or OK.
  Status status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  JobStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  // Asks the job to stop early; it then finishes with a Cancelled status and
  // leaves nothing behind. Waiting is still required before freeing buffers.
  void Cancel() {
    RecordError(Status::Cancelled(path_for_errors_));
  }

  // --- for the engine ---
  void set_path(const std::string& path) { path_for_errors_ = path; }
  // Keeps the first error; later ones are usually consequences of it.
  void RecordError(const Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (status_.ok() && !s.ok()) status_ = s;
    failed_.store(true, std::memory_order_release);
  }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  void MarkSourcesReleased() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
  }
  void Finish(JobStats stats) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      stats_ = std::move(stats);
      done_ = true;
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  bool released_ = false;
  Status status_;
  JobStats stats_;
  std::atomic<bool> failed_{false};
  std::string path_for_errors_;
  const std::chrono::steady_clock::time_point start_;
};

}  // namespace ckptio
