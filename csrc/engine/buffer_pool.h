// Reusable page-aligned, pre-faulted bounce buffers of one size. First-touch
// page faults cost several times a copy, so buffers are kept across jobs.
#pragma once

#include <mutex>
#include <vector>

#include "aligned_buffer.h"

namespace ckptio {

class BufferPool {
 public:
  explicit BufferPool(size_t buffer_bytes) : buffer_bytes_(buffer_bytes) {}

  // Returns a free buffer, allocating one when none is free. An invalid
  // (null) buffer means the allocation failed.
  AlignedBuffer Acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        AlignedBuffer b = std::move(free_.back());
        free_.pop_back();
        return b;
      }
    }
    return AlignedBuffer(buffer_bytes_, /*prefault=*/true);
  }
  void Release(AlignedBuffer b) {
    if (b.data() == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(b));
  }
  size_t buffer_bytes() const { return buffer_bytes_; }

 private:
  const size_t buffer_bytes_;
  std::mutex mu_;  // guards free_
  std::vector<AlignedBuffer> free_;
};

}  // namespace ckptio
