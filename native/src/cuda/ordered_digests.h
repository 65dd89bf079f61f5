// XXH64 digests of several outputs (MergeTask::digest) whose rows come back in slabs,
// in any order, hashed in row order on worker threads: the CUDA plugin's host thread
// hands each slab over as it lands and goes on staging the next ones (hashing there
// had taken 8-10 of its 15-17 ms a batch on an H100 while the streams needed about 7).
//
// Host code only, no CUDA: native/test/ordered_digests_test.cc checks it on any machine.
// The caller's thread owns the bookkeeping of which rows are in (no locks there); each
// output's stream is updated by one worker only (task % workers), so its pieces stay in
// order. The rows' memory must stay valid until wait() returns.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "della/xxh64.h"

namespace della::cuda {

class OrderedDigests {
 public:
  // `workers` threads (0: hash on the caller's thread, inside add()).
  OrderedDigests(size_t tasks, unsigned workers) : outs_(tasks), queues_(workers) {
    threads_.reserve(workers);
    for (unsigned w = 0; w < workers; ++w) threads_.emplace_back([this, w] { work(w); });
  }
  ~OrderedDigests() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();  // the queues drain first (see work())
  }
  OrderedDigests(const OrderedDigests&) = delete;
  OrderedDigests& operator=(const OrderedDigests&) = delete;

  // Rows [row0, row0 + rows) of output `task` are in, at `out + row0 * row_bytes`.
  void add(size_t task, uint64_t row0, uint64_t rows, const char* out, uint64_t row_bytes) {
    Out& o = outs_.at(task);
    o.waiting[row0] = rows;
    while (!o.waiting.empty() && o.waiting.begin()->first == o.next_row) {
      const uint64_t r = o.waiting.begin()->second;
      submit({&o.stream, out + o.next_row * row_bytes, r * row_bytes}, task);
      o.next_row += r;
      o.waiting.erase(o.waiting.begin());
    }
  }

  // Rows hashed or queued so far, from row 0 on, of output `task`.
  uint64_t rows_in(size_t task) const { return outs_.at(task).next_row; }

  // Blocks until every queued piece is hashed.
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    idle_.wait(lock, [this] { return pending_ == 0; });
  }

  // The digest of output `task`: after wait(), of the rows in so far.
  uint64_t digest(size_t task) const { return outs_.at(task).stream.digest(); }

 private:
  struct Out {
    Xxh64Stream stream;
    uint64_t next_row = 0;
    std::map<uint64_t, uint64_t> waiting;  // row0 -> rows, in but not yet contiguous
  };
  struct Piece {
    Xxh64Stream* stream;
    const char* p;
    uint64_t bytes;
  };

  void submit(const Piece& piece, size_t task) {
    if (queues_.empty()) {
      piece.stream->update(piece.p, piece.bytes);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      queues_[task % queues_.size()].push_back(piece);
      ++pending_;
    }
    wake_.notify_all();
  }

  void work(unsigned w) {
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || !queues_[w].empty(); });
      if (queues_[w].empty()) return;  // stop_, and nothing left to hash
      const Piece piece = queues_[w].front();
      queues_[w].pop_front();
      lock.unlock();
      piece.stream->update(piece.p, piece.bytes);
      lock.lock();
      if (--pending_ == 0) idle_.notify_all();
    }
  }

  std::vector<Out> outs_;
  std::vector<std::deque<Piece>> queues_;  // by worker
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable wake_, idle_;
  uint64_t pending_ = 0;
  bool stop_ = false;
};

}  // namespace della::cuda
