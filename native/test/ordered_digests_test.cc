// The CUDA plugin's output digests (native/src/cuda/ordered_digests.h), without a GPU:
// random outputs cut into random slabs that arrive in random order, interleaved across
// outputs, hashed with 0 to 4 worker threads; every digest must equal XXH64 of the
// whole output. Prints the seed on failure; DELLA_TEST_SEED=S repeats a run.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ordered_digests.h"

using della::cuda::OrderedDigests;

int main() {
  const char* env = std::getenv("DELLA_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::mt19937_64 rng(seed);
  auto pick = [&](uint64_t lo, uint64_t hi) { return std::uniform_int_distribution<uint64_t>(lo, hi)(rng); };
  int failures = 0, cases = 0;
  for (int round = 0; round < 200; ++round) {
    const size_t tasks = pick(1, 6);
    const unsigned workers = static_cast<unsigned>(pick(0, 4));
    std::vector<std::vector<char>> outs(tasks);
    std::vector<uint64_t> rows(tasks), row_bytes(tasks);
    struct Slab {
      size_t task;
      uint64_t row0, rows;
    };
    std::vector<Slab> slabs;
    for (size_t t = 0; t < tasks; ++t) {
      rows[t] = pick(0, 300);
      row_bytes[t] = pick(1, 97);  // odd sizes: pieces that split XXH64's 32-byte stripes
      outs[t].resize(rows[t] * row_bytes[t]);
      for (char& c : outs[t]) c = static_cast<char>(rng());
      for (uint64_t r = 0; r < rows[t];) {
        const uint64_t n = std::min<uint64_t>(rows[t] - r, pick(1, 40));
        slabs.push_back({t, r, n});
        r += n;
      }
    }
    std::shuffle(slabs.begin(), slabs.end(), rng);
    OrderedDigests d(tasks, workers);
    for (const Slab& s : slabs) d.add(s.task, s.row0, s.rows, outs[s.task].data(), row_bytes[s.task]);
    d.wait();
    for (size_t t = 0; t < tasks; ++t) {
      ++cases;
      const uint64_t want = della::xxh64(outs[t].data(), outs[t].size());
      if (d.rows_in(t) != rows[t] || d.digest(t) != want) {
        std::fprintf(stderr, "FAIL [DELLA_TEST_SEED=%llu] round %d output %zu (%llu rows of %llu bytes, %u workers): %llu rows in, digest %016llx, want %016llx\n",
                     static_cast<unsigned long long>(seed), round, t, static_cast<unsigned long long>(rows[t]),
                     static_cast<unsigned long long>(row_bytes[t]), workers, static_cast<unsigned long long>(d.rows_in(t)),
                     static_cast<unsigned long long>(d.digest(t)), static_cast<unsigned long long>(want));
        ++failures;
      }
    }
  }
  // A slab missing: its output's rows stop before it, and the digest is not the whole's.
  {
    std::vector<char> out(10 * 8, 'x');
    OrderedDigests d(1, 2);
    d.add(0, 0, 4, out.data(), 8);
    d.add(0, 6, 4, out.data(), 8);
    d.wait();
    ++cases;
    if (d.rows_in(0) != 4 || d.digest(0) == della::xxh64(out.data(), out.size())) {
      std::fprintf(stderr, "FAIL [DELLA_TEST_SEED=%llu] a missing slab went unnoticed\n", static_cast<unsigned long long>(seed));
      ++failures;
    }
  }
  std::printf("ordered digests: %d of %d outputs right (seed %llu)\n", cases - failures, cases,
              static_cast<unsigned long long>(seed));
  return failures == 0 ? 0 : 1;
}
