#include "parallel_copy.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>

namespace ckptio {
namespace {

// Copies bytes [begin, end) of the spans laid end to end.
void CopyRange(const std::vector<CopySpan>& spans, uint64_t begin, uint64_t end) {
  uint64_t span_start = 0;
  for (const CopySpan& s : spans) {
    uint64_t span_end = span_start + s.size;
    if (span_end > begin && span_start < end) {
      uint64_t from = std::max(begin, span_start) - span_start;
      uint64_t to = std::min(end, span_end) - span_start;
      std::memcpy(s.dst + from, s.src + from, to - from);
    }
    if (span_end >= end) break;
    span_start = span_end;
  }
}

struct Latch {
  std::mutex mu;
  std::condition_variable cv;
  size_t pending;
};

}  // namespace

void ParallelCopy(const std::vector<CopySpan>& spans, ThreadPool* pool) {
  uint64_t total = 0;
  for (const CopySpan& s : spans) total += s.size;
  if (total == 0) return;
  size_t workers = pool == nullptr ? 0 : pool->size();
  size_t parts = std::min<uint64_t>(workers + 1, std::max<uint64_t>(1, total / kMinCopyPart));
  auto bound = [&](size_t i) { return total / parts * i + std::min<uint64_t>(i, total % parts); };

  // The latch is shared with the workers: it outlives this frame only if a
  // worker still holds it after the last notify, which the count rules out.
  auto latch = std::make_shared<Latch>();
  latch->pending = parts - 1;
  for (size_t i = 1; i < parts; ++i) {
    uint64_t begin = bound(i), end = bound(i + 1);
    pool->Submit([&spans, begin, end, latch] {
      CopyRange(spans, begin, end);
      std::lock_guard<std::mutex> lock(latch->mu);
      if (--latch->pending == 0) latch->cv.notify_all();
    });
  }
  CopyRange(spans, bound(0), bound(1));
  std::unique_lock<std::mutex> lock(latch->mu);
  latch->cv.wait(lock, [&] { return latch->pending == 0; });
}

}  // namespace ckptio
