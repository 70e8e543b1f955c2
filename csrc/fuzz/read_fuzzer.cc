// libFuzzer target: every byte string is a candidate checkpoint. The engine
// parses its directory and, when that succeeds, reads and CRC-checks every
// record, exactly as ckptio.verify does. Built with AddressSanitizer, so a
// read outside the file or a buffer overrun stops the fuzzer; the directory
// parser must also refuse absurd sizes before allocating. The same bytes also
// go through the pickle opcode check that guards the fast unpickling path.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/pickle_check.h"

using namespace ckptio;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Engine* engine = [] {
    EngineOptions o;
    o.num_threads = 2;
    o.block_bytes = 1 << 20;
    o.queue_depth = 2;
    o.direct = DirectIoMode::kOff;  // memfd: no O_DIRECT
    return new Engine(o);
  }();
  CheckFastPickle(data, size);
  int fd = memfd_create("checkpoint", 0);
  if (fd < 0) return 0;
  size_t written = 0;
  while (written < size) {
    ssize_t n = write(fd, data + written, size - written);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  std::vector<ZipEntry> entries;
  uint64_t file_size = 0;
  Status s = engine->ReadDirectory(path, &entries, &file_size);
  if (s.ok()) {
    std::vector<ReadRequest> requests;
    for (const ZipEntry& e : entries)
      requests.push_back(ReadRequest{e.name, e.header_offset, e.end_offset, e.size, e.crc, true, nullptr, 0});
    ReadHandle h = engine->Read(path, std::move(requests));
    h.ticket->Wait(-1);
  }
  close(fd);
  return 0;
}
