// A test seam in the file layer: makes chosen system calls fail or misbehave
// the way disks and kernels do (EIO at a byte, ENOSPC, a failing fsync, short
// writes, EINTR storms) and a snapshot copy fail (standing in for a device
// copy error), so tests can check that every such failure is reported,
// leaves the destination untouched and keeps the engine usable.
//
// Off unless a test arms it through ckptio._C (never from an environment
// variable): an unarmed check is one relaxed atomic load.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace ckptio {

struct FaultPlan {
  enum class Kind { kNone = 0, kWriteErrorAtByte, kFsyncError, kShortWrites, kEintrStorm, kCopyError };
  Kind kind = Kind::kNone;
  int error_number = 0;     // errno to report (EIO, ENOSPC, ...)
  uint64_t at_byte = 0;     // kWriteErrorAtByte: the first failing file offset
  uint64_t max_chunk = 0;   // kShortWrites: most bytes one write() moves
  uint64_t count = 0;       // kEintrStorm: how many calls fail with EINTR first
};

class FaultInjector {
 public:
  static FaultInjector& Get();

  void Arm(const FaultPlan& plan);
  void Disarm();
  bool armed() const { return armed_.load(std::memory_order_relaxed); }

  // Called before a pwrite of `len` bytes at `offset`. Returns 0 to proceed
  // (possibly with *len lowered: a short write) or an errno to fail with.
  int BeforeWrite(uint64_t offset, size_t* len);
  // Called before fdatasync/fsync: 0 or an errno.
  int BeforeSync();
  // Called before a batched snapshot copy: 0 or an errno (kCopyError, once per arming).
  int BeforeCopy();

  // The power-loss simulator's mutation proof: leave out the commit's file
  // data sync and/or its directory sync (the call then reports success), so
  // tests can show the simulator notices each one missing.
  void SkipSyncs(bool file_data, bool directory) {
    skip_file_sync_.store(file_data, std::memory_order_relaxed);
    skip_directory_sync_.store(directory, std::memory_order_relaxed);
  }
  bool skips_file_sync() const { return skip_file_sync_.load(std::memory_order_relaxed); }
  bool skips_directory_sync() const { return skip_directory_sync_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> armed_{false};
  std::atomic<bool> skip_file_sync_{false};
  std::atomic<bool> skip_directory_sync_{false};
  std::mutex mu_;  // guards plan_ and eintr_left_
  FaultPlan plan_;
  uint64_t eintr_left_ = 0;
};

}  // namespace ckptio
