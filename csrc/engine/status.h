// Status: the result of every engine operation. Engine code never throws
// across threads; it returns a Status that says what failed and where.
#pragma once

#include <string>
#include <utility>

namespace ckptio {

class Status {
 public:
  enum class Code {
    kOk = 0,
    kIOError = 1,          // a system call failed; errno() says why
    kNotFound = 2,         // the file does not exist
    kCorrupt = 3,          // the file is not a valid checkpoint; record() names the part
    kInvalidArgument = 4,  // the caller asked for something impossible
    kCancelled = 5,        // the job was cancelled before it finished
  };

  Status() = default;

  static Status OK() { return Status(); }
  static Status IOError(int err, std::string path, std::string message) {
    return Status(Code::kIOError, err, std::move(path), "", std::move(message));
  }
  static Status NotFound(std::string path, std::string message) {
    return Status(Code::kNotFound, 2 /*ENOENT*/, std::move(path), "", std::move(message));
  }
  static Status Corrupt(std::string path, std::string record, std::string message) {
    return Status(Code::kCorrupt, 0, std::move(path), std::move(record), std::move(message));
  }
  static Status InvalidArgument(std::string message) {
    return Status(Code::kInvalidArgument, 0, "", "", std::move(message));
  }
  static Status Cancelled(std::string path) {
    return Status(Code::kCancelled, 0, std::move(path), "", "cancelled");
  }
  // Builds an IOError (or NotFound for ENOENT) from errno after `what` failed on `path`.
  static Status FromErrno(int err, const std::string& what, const std::string& path);

  // The same status reported against `path` (e.g. the destination instead
  // of the temporary file that was being written).
  Status WithPath(std::string path) const {
    Status s = *this;
    s.path_ = std::move(path);
    return s;
  }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  int error_number() const { return errno_; }
  const std::string& path() const { return path_; }
  const std::string& record() const { return record_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

 private:
  Status(Code code, int err, std::string path, std::string record, std::string message)
      : code_(code), errno_(err), path_(std::move(path)), record_(std::move(record)),
        message_(std::move(message)) {}

  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string path_;
  std::string record_;
  std::string message_;
};

}  // namespace ckptio
