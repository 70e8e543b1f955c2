#include "zip_directory.h"

#include <algorithm>
#include <cstring>

namespace ckptio {
namespace {

constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint64_t kU32Max = 0xFFFFFFFFull;
// Far beyond any real checkpoint's directory; refuses absurd allocations.
constexpr uint64_t kMaxDirectoryBytes = 1ull << 30;

uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Get32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t Get64(const uint8_t* p) {
  return static_cast<uint64_t>(Get32(p)) | (static_cast<uint64_t>(Get32(p + 4)) << 32);
}

// Reads archive bytes [offset, offset+len) of the window starting at `base`.
Status ReadExactly(ReadableFile* f, uint64_t base, uint64_t offset, void* buf, size_t len, const char* what) {
  size_t got = 0;
  Status s = f->ReadAt(base + offset, buf, len, &got, /*direct=*/false);
  if (!s.ok()) return s;
  if (got != len)
    return Status::Corrupt(f->path(), what, "file is truncated (ends inside the " +
                                                std::string(what) + ")");
  return Status::OK();
}

}  // namespace

Status ReadZipDirectory(ReadableFile* file, uint64_t base, uint64_t size, std::vector<ZipEntry>* entries) {
  const std::string& path = file->path();
  if (base > file->size())
    return Status::Corrupt(path, "archive", "the archive's offset lies beyond the end of the file");
  const uint64_t file_size = std::min(size, file->size() - base);  // the archive's size
  entries->clear();
  if (file_size < 22)
    return Status::Corrupt(path, "end of central directory",
                           "not a checkpoint: the file is only " + std::to_string(file_size) +
                               " bytes, too small for a zip archive");

  // The end record sits in the last 22 + 65535 (max comment) bytes. A
  // checkpoint has no comment, and its ZIP64 records and directory take well
  // under 8 KiB: one small read usually holds all of them (a DCP rank file
  // has an archive per item, so this is one read per item instead of four,
  // of up to 64 KiB each). Only a long comment needs the full tail.
  std::vector<uint8_t> tail;
  uint64_t tail_start = 0;
  int64_t eocd = -1;
  for (uint64_t want : {uint64_t{8192}, uint64_t{22 + 0xFFFF}}) {
    const uint64_t tail_len = std::min<uint64_t>(file_size, want);
    if (tail_len <= tail.size()) break;  // the first read already held the whole archive
    tail.resize(tail_len);
    tail_start = file_size - tail_len;
    Status s = ReadExactly(file, base, tail_start, tail.data(), tail_len, "end of central directory");
    if (!s.ok()) return s;
    for (int64_t i = static_cast<int64_t>(tail_len) - 22; i >= 0; --i) {
      if (Get32(&tail[i]) == kEndSig && i + 22 + Get16(&tail[i + 20]) == static_cast<int64_t>(tail_len)) {
        eocd = i;
        break;
      }
    }
    if (eocd >= 0) break;
  }
  if (eocd < 0)
    return Status::Corrupt(path, "end of central directory",
                           "not a checkpoint: no zip end-of-directory record (truncated or not a zip file)");
  // Archive bytes [offset, offset + len), from the tail when it holds them.
  auto read_at = [&](uint64_t offset, void* buf, size_t len, const char* what) {
    if (offset >= tail_start && offset - tail_start <= tail.size() && len <= tail.size() - (offset - tail_start)) {
      if (len > 0) std::memcpy(buf, &tail[offset - tail_start], len);
      return Status::OK();
    }
    return ReadExactly(file, base, offset, buf, len, what);
  };
  Status s;
  const uint64_t eocd_offset = tail_start + static_cast<uint64_t>(eocd);
  const uint8_t* e = &tail[eocd];
  uint64_t count = Get16(e + 10);
  uint64_t cd_size = Get32(e + 12);
  uint64_t cd_offset = Get32(e + 16);
  uint64_t cd_limit = eocd_offset;  // the directory must end before this

  // ZIP64: the locator sits right before the end record.
  if (eocd_offset >= 20) {
    uint8_t loc[20];
    s = read_at(eocd_offset - 20, loc, 20, "zip64 locator");
    if (!s.ok()) return s;
    if (Get32(loc) == kZip64LocatorSig) {
      const uint64_t z64_offset = Get64(loc + 8);
      if (z64_offset > eocd_offset - 20 || eocd_offset - 20 - z64_offset < 56)
        return Status::Corrupt(path, "zip64 end of central directory", "points outside the file");
      uint8_t z[56];
      s = read_at(z64_offset, z, 56, "zip64 end of central directory");
      if (!s.ok()) return s;
      if (Get32(z) != kZip64EndSig)
        return Status::Corrupt(path, "zip64 end of central directory", "bad signature");
      count = Get64(z + 32);
      cd_size = Get64(z + 40);
      cd_offset = Get64(z + 48);
      cd_limit = z64_offset;
    }
  }
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset)
    return Status::Corrupt(path, "central directory", "lies outside the file (truncated?)");
  if (cd_size > kMaxDirectoryBytes)
    return Status::Corrupt(path, "central directory", "declares an implausible size");
  if (count > cd_size / 46)
    return Status::Corrupt(path, "central directory", "declares more entries than it holds");

  std::vector<uint8_t> cd(cd_size);
  s = read_at(cd_offset, cd.data(), cd_size, "central directory");
  if (!s.ok()) return s;

  entries->reserve(count);
  uint64_t pos = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (cd_size - pos < 46 || Get32(&cd[pos]) != kCentralHeaderSig)
      return Status::Corrupt(path, "central directory", "entry " + std::to_string(i) + " is malformed");
    const uint8_t* h = &cd[pos];
    const uint16_t method = Get16(h + 10);
    uint32_t crc = Get32(h + 16);
    uint64_t csize = Get32(h + 20);
    uint64_t usize = Get32(h + 24);
    const uint64_t name_len = Get16(h + 28), extra_len = Get16(h + 30), comment_len = Get16(h + 32);
    uint64_t header_offset = Get32(h + 42);
    if (cd_size - pos - 46 < name_len + extra_len + comment_len)
      return Status::Corrupt(path, "central directory", "entry " + std::to_string(i) + " overruns it");
    std::string name(reinterpret_cast<const char*>(h + 46), name_len);

    // ZIP64 extra: present fields appear in this order for values saturated at 0xFFFFFFFF.
    const uint8_t* x = h + 46 + name_len;
    uint64_t xpos = 0;
    while (xpos + 4 <= extra_len) {
      const uint16_t id = Get16(x + xpos), len = Get16(x + xpos + 2);
      if (xpos + 4 + len > extra_len) break;
      if (id == 0x0001) {
        const uint8_t* f = x + xpos + 4;
        uint64_t avail = len;
        auto take = [&](uint64_t* v) {
          if (*v == kU32Max && avail >= 8) {
            *v = Get64(f);
            f += 8;
            avail -= 8;
          }
        };
        take(&usize);
        take(&csize);
        take(&header_offset);
      }
      xpos += 4 + len;
    }
    pos += 46 + name_len + extra_len + comment_len;

    if (method != 0)
      return Status::Corrupt(path, name, "record is compressed; checkpoints store records uncompressed");
    if (csize != usize)
      return Status::Corrupt(path, name, "stored record has different compressed and uncompressed sizes");
    if (header_offset > cd_offset || cd_offset - header_offset < 30 + usize)
      return Status::Corrupt(path, name,
                             "record of " + std::to_string(usize) + " bytes lies outside the data (truncated?)");
    entries->push_back(ZipEntry{std::move(name), header_offset, cd_offset, usize, crc});
  }
  for (ZipEntry& e : *entries) {  // absolute from here on
    e.header_offset += base;
    e.end_offset += base;
  }
  // Each record extends to the next one's header.
  std::vector<size_t> order(entries->size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return (*entries)[a].header_offset < (*entries)[b].header_offset; });
  for (size_t k = 0; k + 1 < order.size(); ++k) {
    ZipEntry& e = (*entries)[order[k]];
    e.end_offset = (*entries)[order[k + 1]].header_offset;
    if (e.end_offset - e.header_offset < 30 + e.size)
      return Status::Corrupt(path, e.name, "record overlaps the next record");
  }
  return Status::OK();
}

}  // namespace ckptio
