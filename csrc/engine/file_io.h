// Thin, errno-checked wrappers over the POSIX calls the engine uses. Every
// failure comes back as a Status that names the file.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "aligned_buffer.h"
#include "status.h"

namespace ckptio {

enum class DirectIoMode { kAuto = 0, kRequire = 1, kOff = 2 };

// A file being written at explicit offsets by several threads at once.
class WritableFile {
 public:
  // Creates `path` exclusively (it must not exist). With kAuto, O_DIRECT is
  // tried first and dropped where the filesystem refuses it (tmpfs: EINVAL).
  static Status Create(const std::string& path, DirectIoMode mode, WritableFile* out);
  // Opens an existing file for writing at offsets (no truncation).
  static Status OpenExisting(const std::string& path, DirectIoMode mode, WritableFile* out);

  WritableFile() = default;
  ~WritableFile();  // closes, without syncing or unlinking
  WritableFile(const WritableFile&) = delete;
  WritableFile& operator=(const WritableFile&) = delete;

  // Writes all of data[0, len) at `offset`, retrying EINTR and short writes.
  // REQUIRES (while direct()): data, offset and len are multiples of 4096.
  // If the filesystem rejects O_DIRECT at write time in kAuto mode, the file
  // switches to buffered I/O and the write is retried.
  Status WriteAt(uint64_t offset, const void* data, size_t len);
  Status Truncate(uint64_t size);
  Status Sync();  // fdatasync
  Status Close();

  bool direct() const { return direct_.load(std::memory_order_relaxed); }
  const std::string& path() const { return path_; }

 private:
  static Status Open(const std::string& path, DirectIoMode mode, bool create, WritableFile* out);

  int fd_ = -1;
  std::string path_;
  DirectIoMode mode_ = DirectIoMode::kAuto;
  std::atomic<bool> direct_{false};
};

// A file read at explicit offsets by several threads at once, through a
// buffered descriptor and, where the filesystem allows, an O_DIRECT one.
class ReadableFile {
 public:
  static Status Open(const std::string& path, DirectIoMode mode, ReadableFile* out);
  ReadableFile() = default;
  ~ReadableFile();
  ReadableFile(const ReadableFile&) = delete;
  ReadableFile& operator=(const ReadableFile&) = delete;

  // Reads up to `len` bytes at `offset`; *got is less than len only at EOF.
  // With direct=true, REQUIRES data, offset, len multiples of 4096 and
  // has_direct(); falls back to the buffered descriptor on EINVAL.
  Status ReadAt(uint64_t offset, void* data, size_t len, size_t* got, bool direct);
  bool has_direct() const { return direct_fd_ >= 0; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  int direct_fd_ = -1;
  uint64_t size_ = 0;
  std::string path_;
};

// The temporary name a save into `final_path` writes first:
// "<dir>/.ckptio-tmp-<pid>-<n>", unique within this process. The name holds
// nothing of `final_path`'s base name (see file_io.cc).
std::string TemporaryPathFor(const std::string& final_path);

// rename(from, to), then fsync of the directory holding `to`, so that the new
// name survives a power loss.
//
// Replacing a large file frees the old file's blocks, ~0.2 s per GiB on ext4,
// inside rename() when its name was the last reference. With `replaced`
// non-null, the file being replaced is first opened (O_PATH: no permission
// needed, never blocks) and its descriptor handed back in *replaced (-1 if
// there was none), so its blocks are freed only when the caller closes it,
// which it can do after the save is reported done. No extra name exists at
// any moment, and the commit order is unchanged.
Status RenameDurably(const std::string& from, const std::string& to, int* replaced = nullptr);

// The directory part of `path` ("." when there is none).
std::string DirectoryOf(const std::string& path);

}  // namespace ckptio
