#include "crash_recorder.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

namespace ckptio {

namespace {

std::string ReadWholeFile(const std::string& path) {
  std::string out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;  // gone meanwhile (a concurrent unlink): recorded as empty
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

// Every entry under `root`, depth first, in name order (stable snapshots).
void WalkTree(const std::string& root, const std::string& relative, std::vector<TreeEntry>* out) {
  const std::string dir = relative.empty() ? root : root + "/" + relative;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    TreeEntry entry;
    entry.relative_path = relative.empty() ? name : relative + "/" + name;
    struct stat st;
    if (::lstat((root + "/" + entry.relative_path).c_str(), &st) != 0) continue;
    entry.inode = st.st_ino;
    entry.directory = S_ISDIR(st.st_mode);
    if (S_ISREG(st.st_mode)) entry.contents = ReadWholeFile(root + "/" + entry.relative_path);
    const bool recurse = entry.directory;
    const std::string child = entry.relative_path;
    out->push_back(std::move(entry));
    if (recurse) WalkTree(root, child, out);
  }
}

}  // namespace

CrashRecorder& CrashRecorder::Get() {
  static CrashRecorder recorder;
  return recorder;
}

void CrashRecorder::Start(const std::string& root) {
  std::lock_guard<std::mutex> lock(mu_);
  root_ = root;
  events_.clear();
  recording_.store(true, std::memory_order_relaxed);
}

std::vector<CrashEvent> CrashRecorder::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  recording_.store(false, std::memory_order_relaxed);
  return std::move(events_);
}

void CrashRecorder::Record(const char* kind, const std::string& path, const std::string& path2, int fd) {
  if (!recording()) return;
  CrashEvent event;
  event.kind = kind;
  event.path = path;
  event.path2 = path2;
  struct stat st;
  if (fd >= 0 && ::fstat(fd, &st) == 0) event.inode = st.st_ino;
  // One lock around the snapshot and the append: the log's order is the order
  // the effects were seen in, and no snapshot interleaves with another.
  std::lock_guard<std::mutex> lock(mu_);
  if (!recording_.load(std::memory_order_relaxed)) return;
  WalkTree(root_, "", &event.tree);
  events_.push_back(std::move(event));
}

}  // namespace ckptio
