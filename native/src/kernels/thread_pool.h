// A small persistent pool: run(n, threads, fn) calls fn(item, worker) for every item
// in [0, n) on up to `threads` threads (the caller is worker 0) and returns when all
// are done. Which thread runs an item never changes a result: items write disjoint
// outputs, and per-item statistics are integers summed after the run.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace della {

class ThreadPool {
 public:
  using Fn = std::function<void(size_t item, unsigned worker)>;

  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs fn over [0, n). Concurrent callers are serialized. The first exception
  // thrown by any item is rethrown here after all workers have stopped.
  void run(size_t n, unsigned threads, const Fn& fn);

  static unsigned hardware_threads();

 private:
  void ensure_workers(unsigned count);
  void worker_loop(unsigned index);
  void drain(unsigned worker);

  std::mutex run_mutex_;  // one run at a time
  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const Fn* fn_ = nullptr;
  size_t n_ = 0;
  size_t next_ = 0;
  unsigned active_limit_ = 0;  // workers with index < this take part
  unsigned running_ = 0;
  unsigned long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

ThreadPool& global_pool();

}  // namespace della
