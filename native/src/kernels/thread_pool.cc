#include "thread_pool.h"

#include <algorithm>

namespace della {

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

unsigned ThreadPool::hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

void ThreadPool::ensure_workers(unsigned count) {
  // workers_[i] is worker i + 1; the caller is worker 0.
  while (workers_.size() + 1 < count) {
    const unsigned index = static_cast<unsigned>(workers_.size()) + 1;
    workers_.emplace_back([this, index] { worker_loop(index); });
  }
}

void ThreadPool::drain(unsigned worker) {
  for (;;) {
    size_t item;
    {
      std::lock_guard<std::mutex> lock(m_);
      if (next_ >= n_ || error_) return;
      item = next_++;
    }
    try {
      (*fn_)(item, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(m_);
      if (!error_) error_ = std::current_exception();
      return;
    }
  }
}

void ThreadPool::worker_loop(unsigned index) {
  unsigned long seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return stop_ || (generation_ != seen && index < active_limit_); });
      if (stop_) return;
      seen = generation_;
      ++running_;
    }
    drain(index);
    {
      std::lock_guard<std::mutex> lock(m_);
      --running_;
    }
    done_.notify_all();
  }
}

void ThreadPool::run(size_t n, unsigned threads, const Fn& fn) {
  if (n == 0) return;
  std::lock_guard<std::mutex> serial(run_mutex_);
  threads = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(std::min<size_t>(n, 1024))));
  ensure_workers(threads);
  {
    std::lock_guard<std::mutex> lock(m_);
    fn_ = &fn;
    n_ = n;
    next_ = 0;
    error_ = nullptr;
    active_limit_ = threads;
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lock(m_);
    // Items are all claimed once next_ reaches n_; wait for the claimers to finish.
    done_.wait(lock, [&] { return running_ == 0 && (next_ >= n_ || error_); });
    active_limit_ = 0;
    fn_ = nullptr;
    err = error_;
    error_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

ThreadPool& global_pool() {
  static ThreadPool pool;
  return pool;
}

}  // namespace della
