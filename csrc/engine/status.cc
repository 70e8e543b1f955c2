#include "status.h"

#include <cerrno>
#include <cstring>

namespace ckptio {

Status Status::FromErrno(int err, const std::string& what, const std::string& path) {
  std::string message = what + " failed: " + std::strerror(err);
  if (err == ENOENT) return Status(Code::kNotFound, err, path, "", std::move(message));
  return Status(Code::kIOError, err, path, "", std::move(message));
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out = message_;
  if (!record_.empty()) out += " (record '" + record_ + "')";
  if (!path_.empty()) out += ": " + path_;
  return out;
}

}  // namespace ckptio
