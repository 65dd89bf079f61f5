// BlockWriter: files covered by ranges of random lengths, written in random order from
// four threads, from memory aligned like the file (the O_DIRECT path), misaligned (the
// bounce buffer) and through the page cache; every byte read back. Prints the seed of
// any failure. Runs in the current directory (the build tree), whose file system is
// the one merges usually write to.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "../src/io/block_writer.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::vector<uint8_t> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return out;
  uint8_t buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  std::fclose(f);
  return out;
}

// One file of `size` bytes; returns whether O_DIRECT was in use at the end.
bool cover(uint64_t seed, size_t size, bool allow_direct, bool phase_aligned) {
  const std::string path = "block_writer_test." + std::to_string(seed) + ".bin";
  unlink(path.c_str());
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> want(size);
  for (auto& b : want) b = static_cast<uint8_t>(rng());
  // Ranges: mostly small (many partial blocks), some large (direct interiors).
  std::vector<std::pair<size_t, size_t>> ranges;
  for (size_t at = 0; at < size;) {
    const size_t r = rng() % 4;
    size_t len = r == 0 ? 1 + rng() % 64 : r == 1 ? 1 + rng() % 5000 : 1 + rng() % (3 * 4096 * 16);
    len = std::min(len, size - at);
    ranges.emplace_back(at, len);
    at += len;
  }
  std::shuffle(ranges.begin(), ranges.end(), rng);
  auto w = della_io::create_output(path, size, allow_direct);
  std::atomic<size_t> next{0};
  std::atomic<int> errors{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < ranges.size();) {
      const auto [at, len] = ranges[i];
      // Source memory: aligned like the file offset, or shifted by a few bytes.
      const size_t k = della_io::BlockWriter::kBlock;
      const size_t shift = phase_aligned ? at % k : (at + 1 + i % 7) % k;
      uint8_t* mem = static_cast<uint8_t*>(std::aligned_alloc(k, (len + shift + k) / k * k));
      std::memcpy(mem + shift, want.data() + at, len);
      try {
        w->write(at, mem + shift, len);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "seed %llu: %s\n", static_cast<unsigned long long>(seed), e.what());
        ++errors;
      }
      std::free(mem);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  const bool direct = w->direct();
  const std::string tag = "seed " + std::to_string(seed) + " size " + std::to_string(size) +
                          (allow_direct ? " direct" : " buffered") + (phase_aligned ? " aligned" : " shifted");
  check(errors == 0, tag + ": write errors");
  check(w->pending_bytes() == 0, tag + ": " + std::to_string(w->pending_bytes()) + " bytes still pending");
  w.reset();
  const std::vector<uint8_t> got = read_all(path);
  check(got == want, tag + ": file bytes differ from what was written");
  unlink(path.c_str());
  return direct;
}

template <class E, class F>
void expect_throw(F f, const std::string& what) {
  try {
    f();
  } catch (const E&) {
    return;
  }
  check(false, what + ": no exception");
}

}  // namespace

int main() {
  const uint64_t base = std::random_device{}();
  std::printf("block_writer_test: base seed %llu\n", static_cast<unsigned long long>(base));
  int direct_used = 0;
  const size_t fixed[] = {1, 100, 4095, 4096, 4097, 8192 + 123, 3 * 4096, 1 << 20};
  uint64_t seed = base;
  for (size_t size : fixed)
    for (int mode = 0; mode < 3; ++mode) direct_used += cover(seed++, size, mode != 2, mode == 0);
  std::mt19937_64 rng(base);
  for (int i = 0; i < 24; ++i) {
    const size_t size = 1 + rng() % (3 << 20);
    direct_used += cover(seed++, size, i % 3 != 2, i % 2 == 0);
  }
  std::printf("block_writer_test: O_DIRECT %s on this file system\n", direct_used > 0 ? "used" : "not available");

  // Misuse: outside the file, a byte written twice, a file that exists.
  const std::string path = "block_writer_test.misuse.bin";
  unlink(path.c_str());
  {
    auto w = della_io::create_output(path, 10000, true);
    uint8_t bytes[16] = {};
    expect_throw<std::out_of_range>([&] { w->write(9990, bytes, 16); }, "write past the end");
    w->write(0, bytes, 8);
    expect_throw<std::logic_error>([&] { w->write(4, bytes, 8); }, "overlapping writes");
    expect_throw<std::system_error>([&] { della_io::create_output(path, 10, true); }, "creating an existing file");
  }
  unlink(path.c_str());
  {  // an empty file needs no writes
    auto w = della_io::create_output(path, 0, true);
    check(w->pending_bytes() == 0, "empty file pending");
  }
  unlink(path.c_str());
  if (failures) {
    std::fprintf(stderr, "block_writer_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("block_writer_test: ok\n");
  return 0;
}
