// A fixed set of worker threads over a FIFO task queue.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ckptio {

class ThreadPool {
 public:
  explicit ThreadPool(size_t num_threads);
  // Runs every queued task, then joins the workers.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Queues `task`; any thread may call, including a worker. Tasks must not
  // throw: engine code reports failures through Status.
  void Submit(std::function<void()> task);
  size_t size() const { return workers_.size(); }

 private:
  void WorkerLoop();

  std::mutex mu_;  // guards queue_ and stopping_ only; tasks run unlocked
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace ckptio
