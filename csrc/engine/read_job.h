// ReadJob: reads records of a checkpoint in parallel, O_DIRECT where the
// offsets allow, verifying each record's CRC-32 as its bytes arrive.
//
// Requests are located by their local header offset and the offset where the
// next record begins, both known from the central directory alone: the local
// headers (which give the payload's exact start) are parsed from the same
// reads that fetch the payloads, so opening a file with thousands of records
// costs no extra seeks. Each request completes on its own, so a caller can
// use record i while later ones are still arriving.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "file_io.h"
#include "thread_pool.h"
#include "ticket.h"

namespace ckptio {

struct ReadRequest {
  std::string name;        // for error messages
  uint64_t header_offset;  // the record's local header
  uint64_t end_offset;     // where the next record (or the directory) begins
  uint64_t size;           // payload bytes, from the central directory
  uint32_t crc;            // expected CRC-32
  bool verify;             // compare against `crc`
  uint8_t* dest;           // null: checksum only (verify without keeping the bytes)
  uint64_t dest_capacity;  // >= size; a page-aligned dest with capacity >= RoundUp(size, 4096)
                           // lets whole pages be read into it with O_DIRECT. Any other dest
                           // (a live tensor's memory) is filled from an O_DIRECT bounce block,
                           // checksummed there while hot, then copied.
};

struct ReadOptions {
  size_t block_bytes = 8 << 20;
  size_t queue_depth = 4;
  DirectIoMode direct = DirectIoMode::kAuto;
  bool prefault = true;  // fault destination pages in ahead of the reads (see Prefault)
  // O_DIRECT straight into page-aligned destinations. Off, every read lands
  // in a bounce block (which stays in cache), is checksummed there and
  // copied out: on the VMs measured (virtio) that was ~20% faster than DMA
  // into a large destination, even counting the copy. Devices that DMA into
  // RAM at full speed may prefer it on (CKPTIO_READ_ZERO_COPY=1).
  bool zero_copy = false;
};

// Which requests of a read job are finished. Shared by the job and its caller.
class ReadProgress {
 public:
  explicit ReadProgress(size_t n) : done_(n, 0) {}
  // Blocks up to `timeout_seconds` (< 0: forever) until request i is finished
  // or the whole job has stopped; true if either happened.
  bool Wait(size_t i, double timeout_seconds);
  void MarkDone(size_t i);
  void StopAll();  // the job ended (possibly failed): wake every waiter
  // Request i's destination is about to receive bytes. After a failed job,
  // the requests never marked written still hold their old contents.
  void MarkWritten(size_t i) { written_[i].store(1, std::memory_order_relaxed); }
  bool Written(size_t i) const { return written_[i].load(std::memory_order_relaxed) != 0; }
  size_t size() const { return done_.size(); }

 private:
  std::mutex mu_;  // guards done_ and stopped_
  std::condition_variable cv_;
  std::vector<char> done_;
  bool stopped_ = false;
  std::unique_ptr<std::atomic<uint8_t>[]> written_{new std::atomic<uint8_t>[done_.size()]()};
};

struct ReadHandle {
  std::shared_ptr<Ticket> ticket;
  std::shared_ptr<ReadProgress> progress;  // indexed like the requests passed in
};

// Starts reading `requests` from `path` on `pool`; returns at once.
// REQUIRES: every dest stays valid until the ticket is done. `buffers` hands
// out buffers of at least block_bytes + 2 pages.
ReadHandle StartRead(const std::string& path, std::vector<ReadRequest> requests, const ReadOptions& options,
                     ThreadPool* pool, BufferPool* buffers);

}  // namespace ckptio
