#include "zip_layout.h"

#include <algorithm>

namespace ckptio {
namespace {

constexpr uint64_t kU32Max = 0xFFFFFFFFull;
constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kDescriptorSig = 0x08074b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint16_t kFlagsWithDescriptor = 0x0808;  // bit 3: descriptor follows; bit 11: UTF-8
constexpr uint16_t kFlagsEmpty = 0x0800;

void Put16(std::string* s, uint64_t v) {
  s->push_back(static_cast<char>(v & 0xFF));
  s->push_back(static_cast<char>((v >> 8) & 0xFF));
}
void Put32(std::string* s, uint64_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void Put64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

// miniz's mz_zip_writer_create_zip64_extra_data: id 0x0001, then the present fields.
std::string Zip64Extra(const uint64_t* usize, const uint64_t* csize, const uint64_t* offset) {
  std::string body;
  if (usize) Put64(&body, *usize);
  if (csize) Put64(&body, *csize);
  if (offset) Put64(&body, *offset);
  std::string out;
  Put16(&out, 0x0001);
  Put16(&out, body.size());
  return out + body;
}

uint16_t FlagsFor(uint64_t size) { return size == 0 ? kFlagsEmpty : kFlagsWithDescriptor; }

}  // namespace

Status ZipLayout::Plan(const std::vector<RecordSpec>& records, uint64_t alignment, ZipLayout* out) {
  if (alignment < 64 || alignment > 65536 || (alignment & (alignment - 1)) != 0)
    return Status::InvalidArgument("alignment must be a power of two in [64, 65536]");
  out->records_.clear();
  out->names_.clear();
  uint64_t cursor = 0;
  uint64_t tail = 0;
  for (const RecordSpec& r : records) {
    if (r.name.empty() || r.name.size() > 0xFFFF)
      return Status::InvalidArgument("record name must be 1..65535 bytes: '" + r.name + "'");
    RecordPlacement p;
    p.header_offset = cursor;
    p.size = r.size;
    p.zip64 = r.size >= kU32Max || cursor >= kU32Max;
    const bool big_size = r.size >= kU32Max;
    const bool big_offset = cursor >= kU32Max;

    std::string extra;
    if (p.zip64) {
      const uint64_t zero = 0;  // miniz leaves the local csize 0
      extra = Zip64Extra(big_size ? &r.size : nullptr, big_size ? &zero : nullptr,
                         big_offset ? &cursor : nullptr);
    }
    // PyTorch's getPadding: pad with an "FB" extra so the payload is aligned.
    const uint64_t start = cursor + 30 + r.name.size() + extra.size() + 4;
    const uint64_t padding = (alignment - start % alignment) % alignment;
    extra += "FB";
    Put16(&extra, padding);
    extra.append(padding, 'Z');

    std::string& h = p.header_bytes;
    Put32(&h, kLocalHeaderSig);
    Put16(&h, 0);                 // version needed
    Put16(&h, FlagsFor(r.size));  // flags
    Put16(&h, 0);                 // method: stored
    Put16(&h, 0);                 // time
    Put16(&h, 0);                 // date
    Put32(&h, 0);                 // crc: in the descriptor
    Put32(&h, 0);                 // compressed size
    Put32(&h, 0);                 // uncompressed size
    Put16(&h, r.name.size());
    Put16(&h, extra.size());
    h += r.name;
    h += extra;

    p.data_offset = cursor + h.size();
    p.descriptor_size = r.size == 0 ? 0 : (p.zip64 ? 24 : 16);
    cursor = p.data_offset + r.size + p.descriptor_size;

    // Central directory entry size: 46 + name + (ZIP64 extra if any).
    uint64_t cd_extra = 0;
    if (p.zip64) cd_extra = 4 + (big_size ? 16 : 0) + (big_offset ? 8 : 0);
    tail += 46 + r.name.size() + cd_extra;

    out->records_.push_back(std::move(p));
    out->names_.push_back(r.name);
  }
  out->cd_offset_ = cursor;
  out->tail_size_ = tail + 56 + 20 + 22;
  return Status::OK();
}

std::string ZipLayout::Descriptor(size_t i, uint32_t crc) const {
  const RecordPlacement& p = records_[i];
  std::string d;
  if (p.descriptor_size == 0) return d;
  Put32(&d, kDescriptorSig);
  Put32(&d, crc);
  if (p.zip64) {
    Put64(&d, p.size);
    Put64(&d, p.size);
  } else {
    Put32(&d, p.size);
    Put32(&d, p.size);
  }
  return d;
}

std::string ZipLayout::Tail(const std::vector<uint32_t>& crcs) const {
  std::string t;
  t.reserve(tail_size_);
  for (size_t i = 0; i < records_.size(); ++i) {
    const RecordPlacement& p = records_[i];
    const bool big_size = p.size >= kU32Max;
    const bool big_offset = p.header_offset >= kU32Max;
    std::string extra;
    if (p.zip64)
      extra = Zip64Extra(big_size ? &p.size : nullptr, big_size ? &p.size : nullptr,
                         big_offset ? &p.header_offset : nullptr);
    Put32(&t, kCentralHeaderSig);
    Put16(&t, 0);  // version made by
    Put16(&t, 0);  // version needed
    Put16(&t, FlagsFor(p.size));
    Put16(&t, 0);  // method
    Put16(&t, 0);  // time
    Put16(&t, 0);  // date
    Put32(&t, crcs[i]);
    Put32(&t, std::min(p.size, kU32Max));
    Put32(&t, std::min(p.size, kU32Max));
    Put16(&t, names_[i].size());
    Put16(&t, extra.size());
    Put16(&t, 0);  // comment length
    Put16(&t, 0);  // disk number start
    Put16(&t, 0);  // internal attributes
    Put32(&t, 0);  // external attributes
    Put32(&t, std::min(p.header_offset, kU32Max));
    t += names_[i];
    t += extra;
  }
  const uint64_t cd_size = t.size();
  const uint64_t n = records_.size();
  const uint64_t zip64_end_offset = cd_offset_ + cd_size;

  Put32(&t, kZip64EndSig);
  Put64(&t, 44);      // size of the rest of this record
  Put16(&t, 0x031E);  // version made by (miniz)
  Put16(&t, 45);      // version needed: ZIP64
  Put32(&t, 0);       // this disk
  Put32(&t, 0);       // disk with the directory
  Put64(&t, n);
  Put64(&t, n);
  Put64(&t, cd_size);
  Put64(&t, cd_offset_);

  Put32(&t, kZip64LocatorSig);
  Put32(&t, 0);
  Put64(&t, zip64_end_offset);
  Put32(&t, 1);  // total disks

  Put32(&t, kEndSig);
  Put16(&t, 0);
  Put16(&t, 0);
  Put16(&t, std::min<uint64_t>(n, 0xFFFF));
  Put16(&t, std::min<uint64_t>(n, 0xFFFF));
  Put32(&t, std::min(cd_size, kU32Max));
  Put32(&t, std::min(cd_offset_, kU32Max));
  Put16(&t, 0);  // comment length
  return t;
}

}  // namespace ckptio
