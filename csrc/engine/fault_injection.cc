#include "fault_injection.h"

#include <cerrno>

namespace ckptio {

FaultInjector& FaultInjector::Get() {
  static FaultInjector injector;
  return injector;
}

void FaultInjector::Arm(const FaultPlan& plan) {
  std::lock_guard<std::mutex> lock(mu_);
  plan_ = plan;
  eintr_left_ = plan.count;
  armed_.store(plan.kind != FaultPlan::Kind::kNone, std::memory_order_relaxed);
}

void FaultInjector::Disarm() { Arm(FaultPlan{}); }

int FaultInjector::BeforeWrite(uint64_t offset, size_t* len) {
  if (!armed()) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  switch (plan_.kind) {
    case FaultPlan::Kind::kWriteErrorAtByte:
      if (offset + *len > plan_.at_byte) return plan_.error_number;
      return 0;
    case FaultPlan::Kind::kShortWrites:
      if (plan_.max_chunk && *len > plan_.max_chunk) *len = plan_.max_chunk;
      return 0;
    case FaultPlan::Kind::kEintrStorm:
      if (eintr_left_ > 0) {
        --eintr_left_;
        return EINTR;
      }
      return 0;
    default:
      return 0;
  }
}

int FaultInjector::BeforeSync() {
  if (!armed()) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  if (plan_.kind == FaultPlan::Kind::kFsyncError) return plan_.error_number;
  if (plan_.kind == FaultPlan::Kind::kEintrStorm && eintr_left_ > 0) {
    --eintr_left_;
    return EINTR;
  }
  return 0;
}

int FaultInjector::BeforeCopy() {
  if (!armed()) return 0;
  std::lock_guard<std::mutex> lock(mu_);
  if (plan_.kind != FaultPlan::Kind::kCopyError) return 0;
  plan_.kind = FaultPlan::Kind::kNone;  // one failed copy: the next save is fine
  armed_.store(false, std::memory_order_relaxed);
  return plan_.error_number;
}

}  // namespace ckptio
