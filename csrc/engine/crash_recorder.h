// A test seam for the power-loss simulator (tests/crash_sim.py): while
// armed, every file-system effect a save has (file created, data synced,
// rename, directory synced, unlink) is logged in order, each with a snapshot
// of the directory tree being watched, so that the simulator can rebuild
// every state a power cut at that moment could leave.
//
// The engine records its own effects here; Python-side commits (torch.save
// through committed_file, the manager's pointer, DCP's .metadata) are
// recorded through ckptio._C._crash_record by the test harness. Off unless a
// test arms it: an unarmed check is one relaxed atomic load.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace ckptio {

struct TreeEntry {
  std::string relative_path;  // from the watched root, "/"-separated
  uint64_t inode = 0;
  bool directory = false;
  std::string contents;  // a regular file's bytes
};

struct CrashEvent {
  std::string kind;   // "create", "fsync", "rename", "fsync_dir", "unlink", or a harness kind
  std::string path;   // absolute, as the caller named it
  std::string path2;  // rename's destination
  uint64_t inode = 0; // "fsync": the file made durable
  std::vector<TreeEntry> tree;  // the watched tree just after the effect
};

class CrashRecorder {
 public:
  static CrashRecorder& Get();

  void Start(const std::string& root);
  std::vector<CrashEvent> Stop();
  bool recording() const { return recording_.load(std::memory_order_relaxed); }

  // Logs an effect that has just happened. `fd` (>= 0) names the synced file
  // of an "fsync", whose inode is read from it.
  void Record(const char* kind, const std::string& path, const std::string& path2 = "", int fd = -1);

 private:
  std::atomic<bool> recording_{false};
  std::mutex mu_;  // guards root_ and events_, and orders the log
  std::string root_;
  std::vector<CrashEvent> events_;
};

}  // namespace ckptio
