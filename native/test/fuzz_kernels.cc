// Fuzz harness for the C++ side: task validation, row geometry (including the
// embedding sub-block offsets) and every sparsifier and rescale on small random
// tensors, each also merged through a RowSink in slabs (the same results, or refused). Bytes decide shapes, dtypes, parameters and values; buffers are sized
// exactly, so AddressSanitizer reports any access outside them.
//   libFuzzer: clang++ -fsanitize=fuzzer,address -DDELLA_LIBFUZZER ... (cmake -DDELLA_FUZZ=ON)
//   without it: a driver feeds random inputs (ctest runs it, ideally with -DDELLA_SANITIZE=ON)
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "../src/kernels/merge_cpu.h"
#include "della/tensor_rules.h"

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, i = 0;
  uint8_t byte() { return i < n ? p[i++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) v = (v << 8) | byte();
    return v;
  }
  float unit() { return static_cast<float>(u32() >> 8) / 16777216.0f; }
};

size_t dsize(della::DType t) { return della::dtype_size(t); }

// Slabs in buffers of exactly their size (AddressSanitizer sees a byte written past a
// slab), copied into `out` when handed back.
class ExactSink : public della::RowSink {
 public:
  ExactSink(uint64_t rows, uint64_t row_bytes, std::vector<uint8_t>& out) : rows_(rows), row_bytes_(row_bytes), out_(out) {}
  uint64_t slab_rows() const override { return rows_; }
  uint8_t* room(uint64_t, uint64_t rows) override {
    slab_.assign(rows * row_bytes_, 0xa5);
    return slab_.data();
  }
  void put(uint64_t row0, uint64_t rows, uint8_t* bytes) override {
    std::memcpy(out_.data() + row0 * row_bytes_, bytes, rows * row_bytes_);
    put_rows += rows;
  }
  void finish() override {}
  uint64_t put_rows = 0;

 private:
  uint64_t rows_, row_bytes_;
  std::vector<uint8_t>& out_;
  std::vector<uint8_t> slab_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, size};
  const unsigned rank = in.byte() % 4;
  std::vector<int64_t> shape(rank);
  uint64_t numel = 1;
  for (auto& d : shape) {
    d = in.byte() % 9;
    numel *= static_cast<uint64_t>(d);
  }
  if (numel > 4096) return 0;
  const unsigned K = 1 + in.byte() % 4;
  della::MergeTask t;
  t.linear = in.byte() % 8 == 0;
  t.shape = shape;
  t.base_dtype = static_cast<della::DType>(in.byte() % 4);
  t.out_dtype = static_cast<della::DType>(in.byte() % 4);
  t.sparsifier = t.linear ? della::Sparsifier::None : static_cast<della::Sparsifier>(in.byte() % 5);
  t.rescale = static_cast<della::Rescale>(in.byte() % 5);
  t.consensus = static_cast<della::Consensus>(in.byte() % 3);
  t.normalize = in.byte() & 1;
  t.lambda = (in.byte() % 5) * 0.5;
  t.tensor_id = in.u32();
  t.seed = in.u32();
  std::vector<uint8_t> base(numel * dsize(t.base_dtype));
  for (auto& b : base) b = in.byte();
  t.base = base.data();
  std::vector<std::vector<uint8_t>> experts(K);
  const bool sub_block = rank > 0 && in.byte() % 4 == 0;
  for (unsigned k = 0; k < K; ++k) {
    della::ExpertInput e;
    e.dtype = static_cast<della::DType>(in.byte() % 4);
    e.shape = shape;
    if (sub_block)
      for (auto& d : e.shape) d += 1 + in.byte() % 2;
    uint64_t en = 1;
    for (int64_t d : e.shape) en *= static_cast<uint64_t>(d);
    experts[k].resize(en * dsize(e.dtype));
    for (auto& b : experts[k]) b = in.byte();
    e.data = experts[k].data();
    e.weight = in.unit() * 2 - 1;
    e.density = in.byte() % 3 == 0 ? 1.0 : 0.05 + 0.9 * in.unit();
    const double room = e.density < 0.5 ? e.density : 1 - e.density;
    e.epsilon = room * in.unit() * 0.99;
    e.gamma = in.unit() * 0.5;
    t.experts.push_back(e);
  }
  std::vector<uint8_t> out(numel * dsize(t.out_dtype));
  t.out = out.data();
  t.digest = in.byte() & 1;
  const unsigned threads = 1 + in.byte() % 3;
  std::vector<della::MergeStats> stats;
  try {
    della::run_batch({t}, {}, threads, stats);
  } catch (const std::invalid_argument&) {
    return 0;  // refused by validate_task: a clean answer
  }
  // The same task through a sink, each slab in a buffer of exactly its size: the same
  // bytes, statistics and digest, or (a slab too small for a work item) refused.
  const della::Geometry g = della::geometry(shape);
  const uint64_t rows = g.rows, row_bytes = g.n * dsize(t.out_dtype);
  std::vector<uint8_t> slabbed(out.size(), 0xa5);
  ExactSink sink(rows == 0 ? 1 : 1 + in.byte() % (rows + 1), row_bytes, slabbed);
  della::MergeTask s = t;
  s.out = nullptr;
  s.sink = &sink;
  std::vector<della::MergeStats> sstats;
  try {
    della::run_batch({s}, {}, threads, sstats);
  } catch (const std::invalid_argument&) {
    if (sink.slab_rows() >= rows || sink.put_rows != 0) __builtin_trap();  // refused only when a slab cannot hold an item
    return 0;
  }
  if (slabbed != out || sstats[0].kept != stats[0].kept || sstats[0].nonfinite != stats[0].nonfinite ||
      sstats[0].out_nonfinite != stats[0].out_nonfinite || sstats[0].digest != stats[0].digest ||
      sink.put_rows != rows)
    __builtin_trap();
  return 0;
}

#ifndef DELLA_LIBFUZZER
int main(int argc, char** argv) {
  const unsigned runs = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10)) : 3000;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20240617);
  std::vector<uint8_t> buf;
  for (unsigned r = 0; r < runs; ++r) {
    buf.resize(rng() % 20000);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
  }
  std::printf("fuzz_kernels: %u random inputs, no fault\n", runs);
  return 0;
}
#endif
