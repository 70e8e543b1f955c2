#include "save_job.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "crc32.h"

namespace ckptio {
namespace {

// A contiguous run of file bytes and where they come from.
struct Segment {
  uint64_t offset;
  uint64_t len;
  const uint8_t* src;
  int64_t record;      // payload of this record, or -1 for header/descriptor/tail bytes
  bool crc_dependent;  // descriptor or directory: known only after phase 1
};

class SaveJob : public std::enable_shared_from_this<SaveJob> {
 public:
  SaveJob(std::string path, std::vector<RecordSpec> records, const WriteOptions& options,
          ThreadPool* pool, BufferPool* buffers)
      : path_(std::move(path)), specs_(std::move(records)), options_(options), pool_(pool),
        buffers_(buffers), ticket_(std::make_shared<Ticket>()) {
    ticket_->set_path(path_);
  }

  std::shared_ptr<Ticket> Start() {
    Status s = Prepare();
    if (!s.ok()) {
      Fail(s);
      Abort();
      return ticket_;
    }
    StartPhase(0);
    return ticket_;
  }

 private:
  Status Prepare() {
    Status s = ZipLayout::Plan(specs_, options_.alignment, &layout_);
    if (!s.ok()) return s;
    const auto& recs = layout_.records();
    size_t desc_total = 0;
    for (const auto& r : recs) desc_total += r.descriptor_size;
    descriptor_bytes_.assign(desc_total, 0);
    tail_bytes_.assign(layout_.tail_size(), 0);

    size_t desc_pos = 0;
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& r = recs[i];
      segments_.push_back({r.header_offset, r.header_bytes.size(),
                           reinterpret_cast<const uint8_t*>(r.header_bytes.data()), -1, false});
      if (r.size) segments_.push_back({r.data_offset, r.size, specs_[i].data, static_cast<int64_t>(i), false});
      if (r.descriptor_size) {
        segments_.push_back({r.data_offset + r.size, r.descriptor_size, &descriptor_bytes_[desc_pos], -1, true});
        desc_pos += r.descriptor_size;
      }
    }
    segments_.push_back({layout_.central_directory_offset(), layout_.tail_size(), tail_bytes_.data(), -1, true});

    const uint64_t block = options_.block_bytes;
    padded_size_ = RoundUp(layout_.file_size(), kPageSize);
    const size_t nblocks = static_cast<size_t>((padded_size_ + block - 1) / block);
    pieces_.resize(recs.size());
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& r = recs[i];
      if (r.size == 0) continue;
      const uint64_t first = r.data_offset / block, last = (r.data_offset + r.size - 1) / block;
      pieces_[i].assign(last - first + 1, 0);
    }
    for (size_t b = 0; b < nblocks; ++b) blocks_[0].push_back(b);

    temp_path_ = TemporaryPathFor(path_);
    s = WritableFile::Create(temp_path_, options_.direct, &file_);
    if (!s.ok()) return s;
    temp_created_ = true;
    return Status::OK();
  }

  void StartPhase(int phase) {
    phase_ = phase;
    next_.store(0);
    const size_t n = blocks_[phase].size();
    if (n == 0) {
      OnPhaseDone();
      return;
    }
    const size_t runners = std::max<size_t>(1, std::min(options_.queue_depth, n));
    active_.store(runners);
    auto self = shared_from_this();
    for (size_t i = 0; i < runners; ++i) pool_->Submit([self] { self->Run(); });
  }

  void Run() {
    AlignedBuffer bounce = buffers_->Acquire();
    if (bounce.data() == nullptr)
      Fail(Status::IOError(ENOMEM, path_, "could not allocate an I/O buffer"));
    const auto& work = blocks_[phase_];
    while (!ticket_->failed()) {
      const size_t i = next_.fetch_add(1);
      if (i >= work.size()) break;
      Status s = ProcessBlock(work[i], bounce.data());
      if (!s.ok()) Fail(s);
    }
    buffers_->Release(std::move(bounce));
    if (active_.fetch_sub(1) == 1) OnPhaseDone();
  }

  // Phase 0: checksum the payload pieces of block b, and write it unless it
  // holds CRC-dependent bytes. Phase 1: write it.
  Status ProcessBlock(size_t b, uint8_t* bounce) {
    const uint64_t block = options_.block_bytes;
    const uint64_t b0 = b * block, b1 = std::min(b0 + block, padded_size_);
    auto it = std::upper_bound(segments_.begin(), segments_.end(), b0,
                               [](uint64_t off, const Segment& s) { return off < s.offset; });
    if (it != segments_.begin()) --it;
    auto first = it;

    bool deferred = false;
    for (auto s = first; s != segments_.end() && s->offset < b1; ++s) {
      if (s->offset + s->len <= b0) continue;
      if (s->crc_dependent) deferred = true;
      if (phase_ == 0 && s->record >= 0) {
        const uint64_t lo = std::max(b0, s->offset), hi = std::min(b1, s->offset + s->len);
        const auto& r = layout_.records()[s->record];
        pieces_[s->record][b - r.data_offset / block] = Crc32(0, s->src + (lo - s->offset), hi - lo);
      }
    }
    if (phase_ == 0 && deferred) {
      std::lock_guard<std::mutex> lock(blocks_deferred_mu_);
      blocks_[1].push_back(b);
      return Status::OK();
    }

    // A block wholly inside one page-aligned payload goes to disk from the
    // caller's memory; any other block is composed in the bounce buffer.
    const uint8_t* out = nullptr;
    if (first->offset <= b0 && first->offset + first->len >= b1 && first->record >= 0 &&
        IsAligned(first->src + (b0 - first->offset), kPageSize)) {
      out = first->src + (b0 - first->offset);
    } else {
      uint64_t filled = b0;
      for (auto s = first; s != segments_.end() && s->offset < b1; ++s) {
        if (s->offset + s->len <= b0) continue;
        const uint64_t lo = std::max(b0, s->offset), hi = std::min(b1, s->offset + s->len);
        std::memcpy(bounce + (lo - b0), s->src + (lo - s->offset), hi - lo);
        filled = hi;
      }
      if (filled < b1) std::memset(bounce + (filled - b0), 0, b1 - filled);  // tail padding
      out = bounce;
    }
    return file_.WriteAt(b0, out, b1 - b0);
  }

  void OnPhaseDone() {
    if (ticket_->failed()) {
      Abort();
      return;
    }
    if (phase_ == 0) {
      FillCrcDependentBytes();
      std::sort(blocks_[1].begin(), blocks_[1].end());
      StartPhase(1);
      return;
    }
    Commit();
  }

  void FillCrcDependentBytes() {
    const auto& recs = layout_.records();
    const uint64_t block = options_.block_bytes;
    std::vector<uint32_t> crcs(recs.size(), 0);
    size_t desc_pos = 0;
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& r = recs[i];
      if (r.size == 0) continue;
      uint32_t crc = 0;
      for (size_t k = 0; k < pieces_[i].size(); ++k) {
        const uint64_t b0 = (r.data_offset / block + k) * block;
        const uint64_t lo = std::max(b0, r.data_offset);
        const uint64_t hi = std::min(b0 + block, r.data_offset + r.size);
        crc = k == 0 ? pieces_[i][k] : Crc32Combine(crc, pieces_[i][k], hi - lo);
      }
      crcs[i] = crc;
      std::string d = layout_.Descriptor(i, crc);
      std::memcpy(&descriptor_bytes_[desc_pos], d.data(), d.size());
      desc_pos += d.size();
    }
    std::string tail = layout_.Tail(crcs);
    std::memcpy(tail_bytes_.data(), tail.data(), tail.size());
  }

  void Commit() {
    Status s = file_.Truncate(layout_.file_size());
    if (s.ok()) s = file_.Sync();
    const bool direct = file_.direct();
    if (s.ok()) s = file_.Close();
    if (s.ok()) s = RenameDurably(temp_path_, path_);
    if (!s.ok()) {
      Fail(s);
      Abort();
      return;
    }
    ticket_->Finish(JobStats{path_, layout_.file_size(), 0, direct});
  }

  // Errors name the destination, the path the user knows, not the temporary file.
  void Fail(const Status& s) {
    ticket_->RecordError(s.path().empty() || s.path() == temp_path_ ? s.WithPath(path_) : s);
  }

  void Abort() {
    file_.Close();
    if (temp_created_) ::unlink(temp_path_.c_str());
    ticket_->Finish(JobStats{path_, 0, 0, false});
  }

  const std::string path_;
  const std::vector<RecordSpec> specs_;
  const WriteOptions options_;
  ThreadPool* const pool_;
  BufferPool* const buffers_;
  std::shared_ptr<Ticket> ticket_;

  ZipLayout layout_;
  std::vector<Segment> segments_;          // sorted by offset, contiguous
  std::vector<uint8_t> descriptor_bytes_;  // filled between the phases
  std::vector<uint8_t> tail_bytes_;        // directory + end records, filled between the phases
  std::vector<std::vector<uint32_t>> pieces_;  // per record: CRC of its part in each block
  uint64_t padded_size_ = 0;
  std::vector<size_t> blocks_[2];  // blocks to visit in each phase
  std::mutex blocks_deferred_mu_;  // guards blocks_[1] during phase 0
  std::string temp_path_;
  bool temp_created_ = false;
  WritableFile file_;
  int phase_ = 0;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> active_{0};
};

}  // namespace

std::shared_ptr<Ticket> StartSave(const std::string& path, std::vector<RecordSpec> records,
                                  const WriteOptions& options, ThreadPool* pool, BufferPool* buffers) {
  auto job = std::make_shared<SaveJob>(path, std::move(records), options, pool, buffers);
  return job->Start();
}

}  // namespace ckptio
