// One call that copies many (src, dst, size) spans, split across threads:
// the async snapshot of a checkpoint's storages into a staging slot, with no
// per-tensor work left on the Python side.
#pragma once

#include <cstdint>
#include <vector>

#include "thread_pool.h"

namespace ckptio {

struct CopySpan {
  const uint8_t* src;
  uint8_t* dst;
  uint64_t size;
};

// Copies every span and returns when all bytes are copied. The bytes are
// cut into equal contiguous parts (never smaller than kMinCopyPart), run on
// `pool`'s workers and on the calling thread itself; spans are split across
// parts wherever a boundary falls, so one large tensor is copied in parallel
// as well as many small ones.
// REQUIRES: spans do not overlap; memory stays valid until this returns.
// `pool` may be shared only with other copies (a copy queued behind a
// file write would wait for the disk); null copies on the caller alone.
void ParallelCopy(const std::vector<CopySpan>& spans, ThreadPool* pool);

constexpr uint64_t kMinCopyPart = 4ull << 20;

}  // namespace ckptio
