// Page-aligned heap memory: the only kind of memory O_DIRECT accepts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include <sys/mman.h>

namespace ckptio {

constexpr size_t kPageSize = 4096;
constexpr size_t kHugePageSize = 2 << 20;

inline uint64_t RoundUp(uint64_t n, uint64_t align) { return (n + align - 1) / align * align; }
inline uint64_t RoundDown(uint64_t n, uint64_t align) { return n / align * align; }
inline bool IsAligned(const void* p, size_t align) {
  return reinterpret_cast<uintptr_t>(p) % align == 0;
}

// Owns `capacity` bytes starting on a page. Move-only.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Allocates capacity bytes (rounded up to a page). With `prefault`, touches
  // every page so that the first copy into it pays no page faults. On
  // failure data() is null.
  explicit AlignedBuffer(size_t capacity, bool prefault) {
    if (capacity == 0) return;
    void* p = nullptr;
    // Large buffers go on 2 MiB boundaries and ask for transparent huge
    // pages: 512x fewer page faults when the buffer is first filled.
    const size_t align = capacity >= kHugePageSize ? kHugePageSize : kPageSize;
    if (posix_memalign(&p, align, RoundUp(capacity, kPageSize)) != 0) return;
    if (align == kHugePageSize) madvise(p, RoundDown(capacity, kHugePageSize), MADV_HUGEPAGE);
    if (prefault) std::memset(p, 0, RoundUp(capacity, kPageSize));
    data_ = static_cast<uint8_t*>(p);
    capacity_ = capacity;
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), capacity_(o.capacity_) {
    o.data_ = nullptr;
    o.capacity_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    if (this != &o) {
      std::free(data_);
      data_ = o.data_;
      capacity_ = o.capacity_;
      o.data_ = nullptr;
      o.capacity_ = 0;
    }
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t capacity() const { return capacity_; }

 private:
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace ckptio
