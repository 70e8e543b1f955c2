#include "read_job.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "crc32.h"

namespace ckptio {
namespace {

// One unit of work: either a slice of one large record, read straight into
// its destination, or a run of small neighbouring records, read with one
// request into a bounce buffer and copied out.
struct WorkItem {
  size_t first;  // index into the sorted requests
  size_t last;   // one past; last == first + 1 for a slice
  uint64_t slice_offset;  // for a slice: offset inside the record
  uint64_t slice_len;
  size_t piece;           // for a slice: its index among the record's pieces
  bool is_slice;
};

class ReadJob : public std::enable_shared_from_this<ReadJob> {
 public:
  ReadJob(std::string path, std::vector<ReadRequest> requests, const ReadOptions& options,
          ThreadPool* pool, BufferPool* buffers)
      : path_(std::move(path)), requests_(std::move(requests)), options_(options), pool_(pool),
        buffers_(buffers), ticket_(std::make_shared<Ticket>()) {
    ticket_->set_path(path_);
  }

  std::shared_ptr<Ticket> Start() {
    Status s = ReadableFile::Open(path_, options_.direct, &file_);
    if (!s.ok()) {
      ticket_->RecordError(s);
      ticket_->Finish(JobStats{path_, 0, 0, false});
      return ticket_;
    }
    Plan();
    const size_t runners = std::max<size_t>(1, std::min(options_.queue_depth, work_.size()));
    if (work_.empty()) {
      Finish();
      return ticket_;
    }
    active_.store(runners);
    auto self = shared_from_this();
    for (size_t i = 0; i < runners; ++i) pool_->Submit([self] { self->Run(); });
    return ticket_;
  }

 private:
  void Plan() {
    std::sort(requests_.begin(), requests_.end(),
              [](const ReadRequest& a, const ReadRequest& b) { return a.offset < b.offset; });
    const uint64_t block = options_.block_bytes;
    const uint64_t small = block / 4;
    pieces_.resize(requests_.size());
    size_t i = 0;
    while (i < requests_.size()) {
      const ReadRequest& r = requests_[i];
      if (r.size >= small) {
        size_t n = static_cast<size_t>((r.size + block - 1) / block);
        pieces_[i].assign(n, 0);
        for (size_t k = 0; k < n; ++k) {
          const uint64_t off = k * block;
          work_.push_back({i, i + 1, off, std::min(block, r.size - off), k, true});
        }
        ++i;
        continue;
      }
      // Group small records whose span (from the first's page) fits a block.
      const uint64_t start = RoundDown(r.offset, kPageSize);
      size_t j = i;
      while (j < requests_.size() && requests_[j].size < small &&
             requests_[j].offset + requests_[j].size - start <= block) {
        pieces_[j].assign(1, 0);
        ++j;
      }
      if (j == i) {  // cannot happen (small < block), but never loop forever
        pieces_[i].assign(1, 0);
        j = i + 1;
      }
      work_.push_back({i, j, 0, 0, 0, false});
      i = j;
    }
  }

  void Run() {
    AlignedBuffer bounce = buffers_->Acquire();
    if (bounce.data() == nullptr)
      ticket_->RecordError(Status::IOError(ENOMEM, path_, "could not allocate an I/O buffer"));
    while (!ticket_->failed()) {
      const size_t i = next_.fetch_add(1);
      if (i >= work_.size()) break;
      Status s = work_[i].is_slice ? ReadSlice(work_[i], bounce.data()) : ReadGroup(work_[i], bounce.data());
      if (!s.ok()) ticket_->RecordError(s);
    }
    buffers_->Release(std::move(bounce));
    if (active_.fetch_sub(1) == 1) Finish();
  }

  // Reads file bytes [offset, offset+len) and returns where they landed:
  // into `dest` when given, else into `bounce` (aligned down to a page so
  // O_DIRECT can carry it).
  Status ReadRange(uint64_t offset, uint64_t len, uint8_t* dest, uint64_t dest_room, uint8_t* bounce,
                   const std::string& record, const uint8_t** where) {
    size_t got = 0;
    Status s;
    if (dest != nullptr) {
      const uint64_t whole = RoundUp(len, kPageSize);
      const bool direct = file_.has_direct() && offset % kPageSize == 0 && IsAligned(dest, kPageSize) &&
                          dest_room >= whole;
      s = file_.ReadAt(offset, dest, direct ? whole : len, &got, direct);
      if (direct) direct_bytes_.fetch_add(len, std::memory_order_relaxed);
      *where = dest;
    } else {
      const uint64_t start = RoundDown(offset, kPageSize);
      const uint64_t whole = RoundUp(offset + len, kPageSize) - start;
      s = file_.ReadAt(start, bounce, whole, &got, file_.has_direct());
      if (file_.has_direct()) direct_bytes_.fetch_add(len, std::memory_order_relaxed);
      got = got >= offset - start ? got - (offset - start) : 0;
      *where = bounce + (offset - start);
    }
    if (!s.ok()) return s;
    if (got < len)
      return Status::Corrupt(path_, record, "file is truncated: the record's payload ends past the end of the file");
    bytes_.fetch_add(len, std::memory_order_relaxed);
    return Status::OK();
  }

  Status ReadSlice(const WorkItem& w, uint8_t* bounce) {
    const ReadRequest& r = requests_[w.first];
    uint8_t* dest = r.dest ? r.dest + w.slice_offset : nullptr;
    const uint64_t room = r.dest ? r.dest_capacity - w.slice_offset : 0;
    const uint8_t* where = nullptr;
    Status s = ReadRange(r.offset + w.slice_offset, w.slice_len, dest, room, bounce, r.name, &where);
    if (!s.ok()) return s;
    if (r.verify) pieces_[w.first][w.piece] = Crc32(0, where, w.slice_len);
    return Status::OK();
  }

  Status ReadGroup(const WorkItem& w, uint8_t* bounce) {
    const ReadRequest& first = requests_[w.first];
    const ReadRequest& last = requests_[w.last - 1];
    const uint64_t begin = first.offset, end = last.offset + last.size;
    const uint8_t* where = nullptr;
    Status s = ReadRange(begin, end - begin, nullptr, 0, bounce, first.name, &where);
    if (!s.ok()) return s;
    for (size_t i = w.first; i < w.last; ++i) {
      const ReadRequest& r = requests_[i];
      const uint8_t* src = where + (r.offset - begin);
      if (r.dest && r.size) std::memcpy(r.dest, src, r.size);
      if (r.verify) pieces_[i][0] = Crc32(0, src, r.size);
    }
    return Status::OK();
  }

  void Finish() {
    if (!ticket_->failed()) {
      const uint64_t block = options_.block_bytes;
      for (size_t i = 0; i < requests_.size(); ++i) {
        const ReadRequest& r = requests_[i];
        if (!r.verify) continue;
        uint32_t crc = 0;
        for (size_t k = 0; k < pieces_[i].size(); ++k) {
          const uint64_t len = std::min(block, r.size - std::min(r.size, k * block));
          crc = k == 0 ? pieces_[i][k] : Crc32Combine(crc, pieces_[i][k], len);
        }
        if (crc != r.crc) {
          char msg[160];
          std::snprintf(msg, sizeof msg,
                        "CRC-32 mismatch: the file records %08x but the payload's %llu bytes give %08x "
                        "(the checkpoint is corrupt)",
                        r.crc, static_cast<unsigned long long>(r.size), crc);
          ticket_->RecordError(Status::Corrupt(path_, r.name, msg));
          break;
        }
      }
    }
    const uint64_t bytes = bytes_.load();
    ticket_->Finish(JobStats{path_, bytes, 0, bytes > 0 && direct_bytes_.load() * 2 >= bytes});
  }

  const std::string path_;
  std::vector<ReadRequest> requests_;
  const ReadOptions options_;
  ThreadPool* const pool_;
  BufferPool* const buffers_;
  std::shared_ptr<Ticket> ticket_;
  ReadableFile file_;
  std::vector<WorkItem> work_;
  std::vector<std::vector<uint32_t>> pieces_;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> direct_bytes_{0};
};

}  // namespace

std::shared_ptr<Ticket> StartRead(const std::string& path, std::vector<ReadRequest> requests,
                                  const ReadOptions& options, ThreadPool* pool, BufferPool* buffers) {
  auto job = std::make_shared<ReadJob>(path, std::move(requests), options, pool, buffers);
  return job->Start();
}

}  // namespace ckptio
