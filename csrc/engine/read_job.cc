#include "read_job.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include <sys/mman.h>

#include "crc32.h"

namespace ckptio {

bool ReadProgress::Wait(size_t i, double timeout_seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [&] { return stopped_ || done_[i]; };
  if (timeout_seconds < 0) {
    cv_.wait(lock, ready);
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeout_seconds), ready);
}

void ReadProgress::MarkDone(size_t i) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_[i] = 1;
  }
  cv_.notify_all();
}

void ReadProgress::StopAll() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
}

namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older headers lack the name
#endif

// Maps the pages under [p, p + len) writable without touching their bytes.
// False where the kernel does not know MADV_POPULATE_WRITE.
bool PopulateWrite(uint8_t* p, uint64_t len) {
  const uint64_t start = RoundDown(reinterpret_cast<uintptr_t>(p), kPageSize);
  const uint64_t end = RoundUp(reinterpret_cast<uintptr_t>(p) + len, kPageSize);
  if (::madvise(reinterpret_cast<void*>(start), end - start, MADV_POPULATE_WRITE) == 0) return true;
  return errno != EINVAL;  // EFAULT/ENOMEM on odd mappings: skip that span, keep going
}

// One unit of work: a slice of one large record, read straight into its
// destination, or a run of small neighbouring records (headers included),
// read with one request into a bounce buffer and copied out.
struct WorkItem {
  size_t first;  // index into order_
  size_t last;   // one past; first + 1 for a slice
  uint64_t slice_offset;  // for a slice: offset inside the payload
  uint64_t slice_len;
  size_t piece;  // for a slice: its index among the record's pieces
  bool is_slice;
};

class ReadJob : public std::enable_shared_from_this<ReadJob> {
 public:
  ReadJob(std::string path, std::vector<ReadRequest> requests, const ReadOptions& options, ThreadPool* pool,
          BufferPool* buffers)
      : path_(std::move(path)), requests_(std::move(requests)), options_(options), pool_(pool),
        buffers_(buffers), ticket_(std::make_shared<Ticket>()),
        progress_(std::make_shared<ReadProgress>(requests_.size())) {
    ticket_->set_path(path_);
  }

  ReadHandle Start() {
    ReadHandle handle{ticket_, progress_};
    Status s = ReadableFile::Open(path_, options_.direct, &file_);
    if (s.ok()) s = Plan();
    if (!s.ok()) {
      ticket_->RecordError(s);
      Finish();
      return handle;
    }
    if (work_.empty()) {
      Finish();
      return handle;
    }
    const size_t runners = std::max<size_t>(1, std::min(options_.queue_depth, work_.size()));
    const bool prefault = options_.prefault && HasDestinations();
    active_.store(runners + (prefault ? 1 : 0));
    auto self = shared_from_this();
    // The prefaulter first: with a small pool it must not wait for the readers to finish.
    if (prefault) pool_->Submit([self] { self->Prefault(); });
    for (size_t i = 0; i < runners; ++i) pool_->Submit([self] { self->Run(); });
    return handle;
  }

 private:
  Status Plan() {
    const size_t n = requests_.size();
    order_.resize(n);
    for (size_t i = 0; i < n; ++i) order_[i] = i;
    std::sort(order_.begin(), order_.end(),
              [&](size_t a, size_t b) { return requests_[a].header_offset < requests_[b].header_offset; });
    data_offset_.assign(n, 0);
    pieces_.resize(n);
    pieces_left_ = std::vector<std::atomic<size_t>>(n);

    const uint64_t block = options_.block_bytes;
    const uint64_t small = block / 4;
    size_t k = 0;
    while (k < n) {
      const size_t i = order_[k];
      const ReadRequest& r = requests_[i];
      if (r.end_offset < r.header_offset || r.end_offset - r.header_offset < 30 + r.size)
        return Status::Corrupt(path_, r.name, "record does not fit between its header and the next record");
      if (r.size >= small) {
        // A large record: learn where its payload starts, then cut it into slices.
        uint8_t header[30];
        size_t got = 0;
        Status s = file_.ReadAt(r.header_offset, header, sizeof header, &got, false);
        if (!s.ok()) return s;
        if (got != sizeof header)
          return Status::Corrupt(path_, r.name, "file is truncated inside the record's local header");
        s = SetDataOffset(i, header);
        if (!s.ok()) return s;
        const size_t count = static_cast<size_t>((r.size + block - 1) / block);
        pieces_[i].assign(count, 0);
        pieces_left_[i].store(count);
        for (size_t p = 0; p < count; ++p)
          work_.push_back({k, k + 1, p * block, std::min(block, r.size - p * block), p, true});
        ++k;
        continue;
      }
      // Small records whose headers and payloads fit one block together.
      const uint64_t start = RoundDown(r.header_offset, kPageSize);
      size_t j = k;
      while (j < n && requests_[order_[j]].size < small && requests_[order_[j]].end_offset - start <= block &&
             requests_[order_[j]].end_offset >= requests_[order_[j]].header_offset) {
        pieces_[order_[j]].assign(1, 0);
        pieces_left_[order_[j]].store(1);
        ++j;
      }
      if (j == k) {  // a single record whose padding makes it span more than a block
        pieces_[i].assign(1, 0);
        pieces_left_[i].store(1);
        j = k + 1;
      }
      work_.push_back({k, j, 0, 0, 0, false});
      k = j;
    }
    return Status::OK();
  }

  // Parses the local header of request i and checks its payload lies within
  // the record's extent.
  Status SetDataOffset(size_t i, const uint8_t* h) {
    const ReadRequest& r = requests_[i];
    const uint32_t sig = h[0] | (h[1] << 8) | (h[2] << 16) | (static_cast<uint32_t>(h[3]) << 24);
    if (sig != kLocalHeaderSig) return Status::Corrupt(path_, r.name, "local header has a bad signature");
    const uint64_t name_len = h[26] | (h[27] << 8), extra_len = h[28] | (h[29] << 8);
    const uint64_t data = r.header_offset + 30 + name_len + extra_len;
    if (data > r.end_offset || r.size > r.end_offset - data)
      return Status::Corrupt(path_, r.name, "payload runs past the start of the next record");
    data_offset_[i] = data;
    return Status::OK();
  }

  bool HasDestinations() const {
    for (const ReadRequest& r : requests_)
      if (r.dest != nullptr && r.size > 0) return true;
    return false;
  }

  // Faults in the destination pages of the work items the readers have not
  // reached yet, in the order they will be read. Fresh memory costs a page
  // fault (and the kernel zeroing the page) on first touch; done inside a
  // read, that CPU time sits between one request and the next, done here it
  // overlaps the reads in flight. MADV_POPULATE_WRITE maps the pages without
  // writing to them, so racing with a reader that already got there is
  // harmless. Live tensors (load_into) are already mapped: a cheap walk.
  void Prefault() {
    for (size_t w = 0; w < work_.size() && !ticket_->failed(); ++w) {
      w = std::max(w, next_.load(std::memory_order_relaxed));  // never behind the readers
      if (w >= work_.size()) break;
      const WorkItem& item = work_[w];
      for (size_t k = item.first; k < item.last; ++k) {
        const ReadRequest& r = requests_[order_[k]];
        if (r.dest == nullptr || r.size == 0) continue;
        const uint64_t offset = item.is_slice ? item.slice_offset : 0;
        const uint64_t len = item.is_slice ? item.slice_len : r.size;
        if (!PopulateWrite(r.dest + offset, len)) {
          RunnerDone();
          return;  // unsupported kernel: the readers fault pages themselves
        }
      }
    }
    RunnerDone();
  }

  void Run() {
    AlignedBuffer bounce = buffers_->Acquire();
    if (bounce.data() == nullptr)
      ticket_->RecordError(Status::IOError(ENOMEM, path_, "could not allocate an I/O buffer"));
    while (!ticket_->failed()) {
      const size_t w = next_.fetch_add(1);
      if (w >= work_.size()) break;
      Status s = work_[w].is_slice ? ReadSlice(work_[w], bounce.data()) : ReadGroup(work_[w], bounce.data());
      if (!s.ok()) {
        ticket_->RecordError(s);
        progress_->StopAll();  // a waiter on any record must see the failure now
      }
    }
    buffers_->Release(std::move(bounce));
    RunnerDone();
  }

  void RunnerDone() {
    if (active_.fetch_sub(1) == 1) Finish();
  }

  // Reads file bytes [offset, offset+len) for a destination `dest` (null:
  // checksum only). A page-aligned dest with room for whole pages is read
  // into with O_DIRECT; otherwise the bytes land in `bounce` (O_DIRECT from
  // the page below `offset` when the file allows). *where points at the
  // first requested byte, wherever it landed; *got counts requested bytes
  // read. The caller copies from *where to dest when they differ, after
  // checksumming them while they are still in cache.
  Status ReadRange(uint64_t offset, uint64_t len, uint8_t* dest, uint64_t dest_room, uint8_t* bounce,
                   const uint8_t** where, uint64_t* got_out) {
    size_t got = 0;
    Status s;
    const bool into_dest = dest != nullptr && options_.zero_copy && file_.has_direct() && offset % kPageSize == 0 &&
                           IsAligned(dest, kPageSize) && dest_room >= RoundUp(len, kPageSize);
    if (into_dest) {
      s = file_.ReadAt(offset, dest, RoundUp(len, kPageSize), &got, true);
      direct_bytes_.fetch_add(len, std::memory_order_relaxed);
      *where = dest;
    } else if (dest != nullptr && !file_.has_direct()) {
      s = file_.ReadAt(offset, dest, len, &got, false);  // buffered anyway: straight into dest
      *where = dest;
    } else {
      const uint64_t start = RoundDown(offset, kPageSize);
      const uint64_t whole = RoundUp(offset + len, kPageSize) - start;
      s = file_.ReadAt(start, bounce, whole, &got, file_.has_direct());
      if (file_.has_direct()) direct_bytes_.fetch_add(len, std::memory_order_relaxed);
      got = got >= offset - start ? got - (offset - start) : 0;
      *where = bounce + (offset - start);
    }
    *got_out = std::min<uint64_t>(got, len);
    if (s.ok()) bytes_.fetch_add(*got_out, std::memory_order_relaxed);
    return s;
  }

  Status ReadSlice(const WorkItem& w, uint8_t* bounce) {
    const size_t i = order_[w.first];
    const ReadRequest& r = requests_[i];
    uint8_t* dest = r.dest ? r.dest + w.slice_offset : nullptr;
    const uint64_t room = r.dest ? r.dest_capacity - w.slice_offset : 0;
    const uint8_t* where = nullptr;
    uint64_t got = 0;
    if (dest != nullptr) progress_->MarkWritten(i);
    Status s = ReadRange(data_offset_[i] + w.slice_offset, w.slice_len, dest, room, bounce, &where, &got);
    if (!s.ok()) return s;
    if (got < w.slice_len) return Truncated(r);
    if (r.verify) pieces_[i][w.piece] = Crc32(0, where, w.slice_len);
    if (dest != nullptr && where != dest) std::memcpy(dest, where, w.slice_len);
    return PieceDone(i);
  }

  Status ReadGroup(const WorkItem& w, uint8_t* bounce) {
    const uint64_t begin = requests_[order_[w.first]].header_offset;
    const uint64_t end = requests_[order_[w.last - 1]].end_offset;
    const uint8_t* where = nullptr;
    uint64_t got = 0;
    Status s = ReadRange(begin, end - begin, nullptr, 0, bounce, &where, &got);
    if (!s.ok()) return s;
    for (size_t k = w.first; k < w.last; ++k) {
      const size_t i = order_[k];
      const ReadRequest& r = requests_[i];
      const uint64_t h = r.header_offset - begin;
      if (got < h + 30) return Truncated(r);
      s = SetDataOffset(i, where + h);
      if (!s.ok()) return s;
      const uint64_t d = data_offset_[i] - begin;
      if (got < d + r.size) return Truncated(r);
      if (r.verify) {
        pieces_[i][0] = Crc32(0, where + d, r.size);
        // A small record is whole here: a damaged one never reaches dest.
        if (pieces_[i][0] != r.crc) return PieceDone(i);
      }
      if (r.dest && r.size) {
        progress_->MarkWritten(i);
        std::memcpy(r.dest, where + d, r.size);
      }
      s = PieceDone(i);
      if (!s.ok()) return s;
    }
    return Status::OK();
  }

  Status Truncated(const ReadRequest& r) {
    return Status::Corrupt(path_, r.name, "file is truncated: the record ends past the end of the file");
  }

  // Counts one piece of request i; the last one checks the record's CRC.
  Status PieceDone(size_t i) {
    if (pieces_left_[i].fetch_sub(1) != 1) return Status::OK();
    const ReadRequest& r = requests_[i];
    if (r.verify) {
      const uint64_t block = options_.block_bytes;
      uint32_t crc = 0;
      for (size_t k = 0; k < pieces_[i].size(); ++k) {
        const uint64_t len = std::min(block, r.size - std::min(r.size, k * block));
        crc = k == 0 ? pieces_[i][k] : Crc32Combine(crc, pieces_[i][k], len);
      }
      if (crc != r.crc) {
        char msg[200];
        std::snprintf(msg, sizeof msg,
                      "CRC-32 mismatch: the file records %08x but the payload's %llu bytes give %08x "
                      "(the checkpoint is corrupt)",
                      r.crc, static_cast<unsigned long long>(r.size), crc);
        return Status::Corrupt(path_, r.name, msg);
      }
    }
    progress_->MarkDone(i);
    return Status::OK();
  }

  void Finish() {
    const uint64_t bytes = bytes_.load();
    // Stats first: waiters woken by StopAll may read them at once.
    JobStats stats{path_, bytes, 0, bytes > 0 && direct_bytes_.load() * 2 >= bytes, options_.block_bytes};
    progress_->StopAll();
    ticket_->Finish(stats);
  }

  const std::string path_;
  const std::vector<ReadRequest> requests_;
  const ReadOptions options_;
  ThreadPool* const pool_;
  BufferPool* const buffers_;
  std::shared_ptr<Ticket> ticket_;
  std::shared_ptr<ReadProgress> progress_;
  ReadableFile file_;
  std::vector<size_t> order_;          // request indices by file position
  std::vector<uint64_t> data_offset_;  // per request, once its header is parsed
  std::vector<WorkItem> work_;
  std::vector<std::vector<uint32_t>> pieces_;
  std::vector<std::atomic<size_t>> pieces_left_;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> active_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<uint64_t> direct_bytes_{0};
};

}  // namespace

ReadHandle StartRead(const std::string& path, std::vector<ReadRequest> requests, const ReadOptions& options,
                     ThreadPool* pool, BufferPool* buffers) {
  auto job = std::make_shared<ReadJob>(path, std::move(requests), options, pool, buffers);
  return job->Start();
}

}  // namespace ckptio
