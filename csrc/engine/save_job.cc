#include "save_job.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "crash_recorder.h"
#include "crc32.h"

namespace ckptio {
namespace {

// Copy+checksum step: small enough that the CRC reads the bounce buffer from cache.
constexpr uint64_t kCopyStep = 256 << 10;

// A contiguous run of file bytes and where they come from.
struct Segment {
  uint64_t offset;
  uint64_t len;
  const uint8_t* src;
  int64_t record;      // payload of this record, or -1 for header/descriptor/tail bytes
  bool crc_dependent;  // descriptor or directory: known once earlier payloads are checksummed
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
    StartRunners();
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
    descriptor_pos_.assign(recs.size(), 0);
    crcs_.assign(recs.size(), 0);
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& r = recs[i];
      descriptor_pos_[i] = desc_pos;
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
    num_blocks_ = static_cast<size_t>((padded_size_ + block - 1) / block);
    checksummed_.assign(num_blocks_, 0);
    written_.assign(num_blocks_, 0);
    last_payload_block_ = 0;
    for (const auto& r : recs)
      if (r.size) last_payload_block_ = std::max<size_t>(last_payload_block_, (r.data_offset + r.size - 1) / block);
    pieces_.resize(recs.size());
    for (size_t i = 0; i < recs.size(); ++i) {
      const auto& r = recs[i];
      if (r.size == 0) continue;
      const uint64_t first = r.data_offset / block, last = (r.data_offset + r.size - 1) / block;
      pieces_[i].assign(last - first + 1, 0);
    }

    if (options_.base_offset % kPageSize != 0)
      return Status::InvalidArgument("an archive's base offset must be a multiple of 4096");
    if (options_.into_existing) {
      temp_path_ = path_;
      return WritableFile::OpenExisting(path_, options_.direct, &file_);
    }
    temp_path_ = TemporaryPathFor(path_);
    s = WritableFile::Create(temp_path_, options_.direct, &file_);
    if (!s.ok()) return s;
    temp_created_ = true;
    return Status::OK();
  }

  void StartRunners() {
    const size_t n = num_blocks_;
    const size_t runners = std::max<size_t>(1, std::min(options_.queue_depth, n));
    active_.store(runners);
    auto self = shared_from_this();
    for (size_t i = 0; i < runners; ++i) pool_->Submit([self] { self->Run(); });
  }

  void Run() {
    AlignedBuffer bounce = buffers_->Acquire();
    if (bounce.data() == nullptr) Fail(Status::IOError(ENOMEM, path_, "could not allocate an I/O buffer"));
    while (!ticket_->failed()) {
      const size_t b = next_.fetch_add(1);
      if (b >= num_blocks_) break;
      Status s = ProcessBlock(b, bounce.data());
      if (!s.ok()) Fail(s);
    }
    buffers_->Release(std::move(bounce));
    if (active_.fetch_sub(1) == 1) {
      if (ticket_->failed())
        Abort();
      else
        Commit();
    }
  }

  // Block b = file bytes [b*block, (b+1)*block). Blocks are claimed in
  // order. Each first checksums its payload pieces and publishes that; a
  // block holding descriptors or the directory then waits until every
  // earlier block has done so (their CRCs are all it needs), fills those
  // bytes and writes.
  Status ProcessBlock(size_t b, uint8_t* bounce) {
    const uint64_t block = options_.block_bytes;
    const uint64_t b0 = b * block, b1 = std::min(b0 + block, padded_size_);
    auto first = std::upper_bound(segments_.begin(), segments_.end(), b0,
                                  [](uint64_t off, const Segment& s) { return off < s.offset; });
    if (first != segments_.begin()) --first;
    const auto& records = layout_.records();

    // A block wholly inside one page-aligned payload goes to disk from the
    // caller's memory; any other block is composed in the bounce buffer.
    const bool in_place = first->offset <= b0 && first->offset + first->len >= b1 && first->record >= 0 &&
                          IsAligned(first->src + (b0 - first->offset), kPageSize);
    bool crc_dependent = false;
    uint64_t filled = b0;
    for (auto s = first; s != segments_.end() && s->offset < b1; ++s) {
      if (s->offset + s->len <= b0) continue;
      const uint64_t lo = std::max(b0, s->offset), hi = std::min(b1, s->offset + s->len);
      filled = hi;
      if (s->crc_dependent) {
        crc_dependent = true;
        continue;
      }
      const uint8_t* src = s->src + (lo - s->offset);
      if (in_place) {
        pieces_[s->record][b - records[s->record].data_offset / block] = Crc32(0, src, hi - lo);
        continue;
      }
      // Copy and checksum in cache-sized steps: the CRC then reads the
      // bounce buffer from cache instead of memory.
      uint32_t crc = 0;
      for (uint64_t pos = lo; pos < hi;) {
        const uint64_t n = std::min<uint64_t>(kCopyStep, hi - pos);
        std::memcpy(bounce + (pos - b0), s->src + (pos - s->offset), n);
        if (s->record >= 0) crc = Crc32(crc, bounce + (pos - b0), n);
        pos += n;
      }
      if (s->record >= 0) pieces_[s->record][b - records[s->record].data_offset / block] = crc;
    }
    if (!in_place && filled < b1) std::memset(bounce + (filled - b0), 0, b1 - filled);  // tail padding
    MarkChecksummed(b);

    if (crc_dependent) {
      if (!WaitChecksummedBelow(b)) return Status::OK();  // another block failed
      FillCrcDependentBytes(b1);
      for (auto s = first; s != segments_.end() && s->offset < b1; ++s) {
        if (!s->crc_dependent || s->offset + s->len <= b0) continue;
        const uint64_t lo = std::max(b0, s->offset), hi = std::min(b1, s->offset + s->len);
        std::memcpy(bounce + (lo - b0), s->src + (lo - s->offset), hi - lo);
      }
    }
    const uint8_t* out = in_place ? first->src + (b0 - first->offset) : bounce;
    Status s = file_.WriteAt(options_.base_offset + b0, out, b1 - b0);
    if (s.ok()) MarkWritten(b);
    return s;
  }

  // Once every block holding payload bytes is on its way to disk, the
  // caller's memory is no longer read: a streaming caller may go on.
  void MarkWritten(size_t b) {
    bool released = false;
    {
      std::lock_guard<std::mutex> lock(crc_mu_);
      written_[b] = 1;
      while (written_frontier_ < num_blocks_ && written_[written_frontier_]) ++written_frontier_;
      released = written_frontier_ > last_payload_block_ && !released_reported_;
      if (released) released_reported_ = true;
    }
    if (released) ticket_->MarkSourcesReleased();
  }

  void MarkChecksummed(size_t b) {
    {
      std::lock_guard<std::mutex> lock(crc_mu_);
      checksummed_[b] = 1;
      while (crc_frontier_ < num_blocks_ && checksummed_[crc_frontier_]) ++crc_frontier_;
    }
    crc_cv_.notify_all();
  }

  // True once every block before b is checksummed; false if the job failed.
  bool WaitChecksummedBelow(size_t b) {
    std::unique_lock<std::mutex> lock(crc_mu_);
    while (crc_frontier_ < b) {
      if (ticket_->failed()) return false;
      crc_cv_.wait_for(lock, std::chrono::milliseconds(50));
    }
    return !ticket_->failed();
  }

  // Fills the descriptors that start before `end` (and the directory, once
  // the last block needs it). REQUIRES: blocks up to end's are checksummed.
  void FillCrcDependentBytes(uint64_t end) {
    std::lock_guard<std::mutex> lock(crc_mu_);
    const auto& recs = layout_.records();
    const uint64_t block = options_.block_bytes;
    for (; filled_records_ < recs.size(); ++filled_records_) {
      const size_t i = filled_records_;
      const auto& r = recs[i];
      if (r.data_offset + r.size >= end) break;
      if (r.size == 0) continue;
      uint32_t crc = 0;
      for (size_t k = 0; k < pieces_[i].size(); ++k) {
        const uint64_t b0 = (r.data_offset / block + k) * block;
        const uint64_t len = std::min(b0 + block, r.data_offset + r.size) - std::max(b0, r.data_offset);
        crc = k == 0 ? pieces_[i][k] : Crc32Combine(crc, pieces_[i][k], len);
      }
      crcs_[i] = crc;
      std::string d = layout_.Descriptor(i, crc);
      std::memcpy(&descriptor_bytes_[descriptor_pos_[i]], d.data(), d.size());
    }
    if (filled_records_ == recs.size() && end > layout_.central_directory_offset() && !tail_filled_) {
      std::string tail = layout_.Tail(crcs_);
      std::memcpy(tail_bytes_.data(), tail.data(), tail.size());
      tail_filled_ = true;
    }
  }

  void Commit() {
    if (options_.into_existing) {  // the caller commits the assembled file
      const bool direct = file_.direct();
      Status s = file_.Close();
      if (!s.ok()) {
        Fail(s);
        Abort();
        return;
      }
      ticket_->Finish(JobStats{path_, layout_.file_size(), 0, direct, options_.block_bytes});
      return;
    }
    Status s = file_.Truncate(layout_.file_size());
    if (s.ok()) s = file_.Sync();
    const bool direct = file_.direct();
    if (s.ok()) s = file_.Close();
    int replaced = -1;
    if (s.ok()) s = RenameDurably(temp_path_, path_, &replaced);
    if (!s.ok()) {
      if (replaced >= 0) ::close(replaced);
      Fail(s);
      Abort();
      return;
    }
    ticket_->Finish(JobStats{path_, layout_.file_size(), 0, direct, options_.block_bytes});
    // The save is durable and reported; only now let the kernel free the
    // replaced file's blocks, on this engine thread, off the caller's path.
    if (replaced >= 0) ::close(replaced);
  }

  // Errors name the destination, the path the user knows, not the temporary file.
  void Fail(const Status& s) {
    ticket_->RecordError(s.path().empty() || s.path() == temp_path_ ? s.WithPath(path_) : s);
  }

  void Abort() {
    file_.Close();
    if (temp_created_) {
      ::unlink(temp_path_.c_str());
      CrashRecorder::Get().Record("unlink", temp_path_);
    }
    ticket_->Finish(JobStats{path_, 0, 0, false, options_.block_bytes});
  }

  const std::string path_;
  const std::vector<RecordSpec> specs_;
  const WriteOptions options_;
  ThreadPool* const pool_;
  BufferPool* const buffers_;
  std::shared_ptr<Ticket> ticket_;

  ZipLayout layout_;
  std::vector<Segment> segments_;          // sorted by offset, contiguous
  std::vector<std::vector<uint32_t>> pieces_;  // per record: CRC of its part in each block
  uint64_t padded_size_ = 0;
  size_t num_blocks_ = 0;

  // CRC-dependent bytes, filled in file order as blocks need them.
  std::mutex crc_mu_;  // guards everything down to tail_filled_
  std::condition_variable crc_cv_;
  std::vector<char> checksummed_;  // per block: its payload pieces are done
  size_t crc_frontier_ = 0;        // every block below this is checksummed
  std::vector<uint8_t> descriptor_bytes_;
  std::vector<size_t> descriptor_pos_;  // per record: its descriptor in descriptor_bytes_
  std::vector<uint32_t> crcs_;
  size_t filled_records_ = 0;      // records whose descriptor is filled
  std::vector<uint8_t> tail_bytes_;  // directory + end records
  bool tail_filled_ = false;
  std::vector<char> written_;      // per block: its write returned
  size_t written_frontier_ = 0;    // every block below this is written
  size_t last_payload_block_ = 0;  // last block holding caller memory
  bool released_reported_ = false;
  std::string temp_path_;
  bool temp_created_ = false;
  WritableFile file_;
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
