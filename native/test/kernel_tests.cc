// C++ checks of the shared math that need no Node: Philox known answers, dtype
// round trips, and thread-count independence of the CPU kernels.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../src/kernels/keys_avx512.h"
#include "../src/kernels/merge_cpu.h"
#include "../src/kernels/merge_state.h"
#include "../src/kernels/row_io.h"
#include "della/philox.h"
#include "della/xxh64.h"

static int failures = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);         \
      std::fprintf(stderr, "\n");                \
      ++failures;                                \
    }                                            \
  } while (0)

static void philox_known_answers() {
  struct Kat { uint32_t c[4], k[2], want[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& t : kats) {
    const della::Philox4 b = della::philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int i = 0; i < 4; ++i) CHECK(b.v[i] == t.want[i], "philox word %d: %08x != %08x", i, b.v[i], t.want[i]);
  }
}

// The CPU passes draw Philox words 16 blocks at a time (AVX-512) or through a
// vectorized loop: every block must equal the scalar definition, also where the
// counter's low word wraps into the high one.
static void philox_blocks_match_scalar() {
  std::mt19937_64 rng(12345);
  const uint64_t starts[] = {0, 1, 0xfffffff0ull, 0xfffffffbull, 0x1fffffff7ull, 0x123456789abcull};
  std::vector<uint32_t> out(4 * 64);
  for (uint64_t g0 : starts) {
    for (uint64_t count = 1; count <= 64; ++count) {
      const uint32_t tid = static_cast<uint32_t>(rng()), ex = static_cast<uint32_t>(rng() & 63);
      const uint32_t k0 = static_cast<uint32_t>(rng()), k1 = static_cast<uint32_t>(rng());
      std::fill(out.begin(), out.end(), 0xdeadbeefu);
      della::detail::philox_blocks(g0, count, tid, ex, k0, k1, out.data());
      for (uint64_t b = 0; b < count; ++b) {
        const uint64_t g = g0 + b;
        const della::Philox4 w = della::philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), tid, ex, k0, k1);
        for (int i = 0; i < 4; ++i)
          CHECK(out[4 * b + i] == w.v[i], "philox_blocks g0=%llu count=%llu block %llu word %d",
                static_cast<unsigned long long>(g0), static_cast<unsigned long long>(count),
                static_cast<unsigned long long>(b), i);
      }
      CHECK(count == 64 || out[4 * count] == 0xdeadbeefu, "philox_blocks wrote past its blocks");
    }
  }
}

// The vectorizable f32 -> f16 rounding equals the reference one: every pattern around
// and inside the subnormal-half range, and a stride through all of fp32.
static void f16_select_matches() {
  auto check = [](uint32_t bits) {
    const float f = della::bits_f32(bits);
    const uint16_t a = della::f32_to_f16(f), b = della::detail::f32_to_f16_select(f);
    if (a != b) {
      CHECK(false, "f32_to_f16_select(%08x) = %04x, f32_to_f16 = %04x", bits, b, a);
      return false;
    }
    return true;
  };
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint32_t ax = 0x32f00000u; ax <= 0x38900000u; ++ax)
      if (!check(sign | ax)) return;
  for (uint64_t bits = 0; bits <= 0xffffffffull; bits += 97)
    if (!check(static_cast<uint32_t>(bits))) return;
  for (uint32_t bits : {0x477fefffu, 0x477ff000u, 0x7f800000u, 0x7f800001u, 0xffc00000u, 0x387fffffu, 0x38800000u})
    check(bits);
}

// The F16C rows (f16_rows.cc) equal the select code bit for bit: every half pattern
// (signaling and quiet NaNs included) to fp32 with its non-finite count, and fp32 to
// halves and to F16 keys around and inside the subnormal range, on a stride through
// all of fp32 and on the special values. Rows of odd lengths cover the scalar tails.
static void f16c_rows_match() {
#if defined(DELLA_F16C_PATHS)
  if (!della::detail::have_f16c()) {
    std::printf("f16c_rows_match: no F16C on this CPU, skipped\n");
    return;
  }
  std::vector<uint16_t> halves(0x10001);
  for (uint32_t h = 0; h < 0x10001; ++h) halves[h] = static_cast<uint16_t>(h * 40503u);  // every pattern, shuffled
  std::vector<float> got(halves.size());
  const uint64_t bad = della::detail::f16_to_f32_row(reinterpret_cast<const uint8_t*>(halves.data()), halves.size(), got.data());
  uint64_t want_bad = 0;
  for (size_t i = 0; i < halves.size(); ++i) {
    const float w = della::detail::f16_to_f32_select(halves[i]);
    want_bad += !della::is_finite_f32(w);
    if (della::f32_bits(w) != della::f32_bits(got[i])) {
      CHECK(false, "f16_to_f32_row(%04x) = %08x, select %08x", halves[i], della::f32_bits(got[i]), della::f32_bits(w));
      return;
    }
  }
  CHECK(bad == want_bad, "f16_to_f32_row non-finite count %llu, want %llu", static_cast<unsigned long long>(bad),
        static_cast<unsigned long long>(want_bad));
  std::vector<uint32_t> bits;
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint32_t ax = 0x32f00000u; ax <= 0x38900000u; ax += 3) bits.push_back(sign | ax);
  for (uint64_t b = 0; b <= 0xffffffffull; b += 997) bits.push_back(static_cast<uint32_t>(b));
  for (uint32_t b : {0x477fefffu, 0x477ff000u, 0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fbfffffu, 0xffc00000u,
                     0x7fffffffu, 0x387fffffu, 0x38800000u, 0u, 0x80000000u, 1u})
    bits.push_back(b);
  bits.resize(bits.size() - bits.size() % 8 + 5);  // a tail of five
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) v[i] = della::bits_f32(bits[i]);
  std::vector<uint16_t> out(v.size()), keys(v.size());
  della::detail::f32_to_f16_row(v.data(), v.size(), reinterpret_cast<uint8_t*>(out.data()));
  della::detail::f16_keys_row(v.data(), v.size(), keys.data());
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t w = della::detail::f32_to_f16_select(v[i]);
    if (out[i] != w || keys[i] != (w & 0x7fffu)) {
      CHECK(false, "f32_to_f16_row(%08x) = %04x key %04x, select %04x", bits[i], out[i], keys[i], w);
      return;
    }
  }
#endif
}

// The AVX-512 BF16 rows (bf16_rows.cc) equal the scalar code bit for bit: deltas of
// every BF16 pattern against assorted bases (tiny ones, so that many deltas are
// subnormal, where the instruction would read zero), their keys and non-finite count,
// and fp32 to BF16 on a stride through all of fp32 and the special values. Lengths of
// 32k + 5 cover the scalar tails.
static void bf16_rows_match() {
#if defined(DELLA_AVX512_PATHS)
  if (!della::detail::have_avx512_bw()) {
    std::printf("bf16_rows_match: no AVX-512BW on this CPU, skipped\n");
    return;
  }
  std::mt19937 rng(7);
  std::vector<uint16_t> e;
  std::vector<float> b;
  for (uint32_t h = 0; h < 0x10000; ++h) {  // every pattern, against a random fp32 and a near one
    e.push_back(static_cast<uint16_t>(h * 40503u));
    b.push_back(della::bits_f32(rng()));
    e.push_back(static_cast<uint16_t>(h));
    b.push_back(della::bf16_to_f32(static_cast<uint16_t>(h ^ (rng() & 0x3))));
  }
  for (uint32_t t = 0; t < 8192; ++t) {  // tiny values: subnormal deltas
    e.push_back(static_cast<uint16_t>((t & 0x1ff) | (t & 0x1000 ? 0x8000 : 0)));
    b.push_back(della::bf16_to_f32(static_cast<uint16_t>((t * 13) & 0x1ff)));
  }
  e.resize(e.size() - e.size() % 32 + 5);
  b.resize(e.size());
  const uint64_t n = e.size();
  std::vector<float> d(n);
  std::vector<uint16_t> k(n), k2(n);
  const auto* src = reinterpret_cast<const uint8_t*>(e.data());
  std::vector<float> loaded(n), d0(n);
  const uint64_t bad_loaded = della::detail::bf16_to_f32_row(src, n, loaded.data());
  const uint64_t bad_d0 = della::detail::bf16_deltas_row(src, n, b.data(), d0.data());
  uint64_t want_bad = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const float v = della::bf16_to_f32(e[i]);
    want_bad += !della::is_finite_f32(v);
    if (della::f32_bits(loaded[i]) != della::f32_bits(v) || della::f32_bits(d0[i]) != della::f32_bits(v - b[i])) {
      CHECK(false, "bf16_to_f32_row / bf16_deltas_row of %04x - %08x: %08x %08x", e[i], della::f32_bits(b[i]),
            della::f32_bits(loaded[i]), della::f32_bits(d0[i]));
      return;
    }
  }
  CHECK(bad_loaded == want_bad && bad_d0 == want_bad, "bf16 rows non-finite counts %llu %llu, want %llu",
        static_cast<unsigned long long>(bad_loaded), static_cast<unsigned long long>(bad_d0),
        static_cast<unsigned long long>(want_bad));
  if (!della::detail::have_avx512_bf16()) {
    std::printf("bf16_rows_match: no AVX-512 BF16 on this CPU, keys and stores skipped\n");
    return;
  }
  const uint64_t bad = della::detail::bf16_deltas_row(src, n, b.data(), d.data());
  della::detail::bf16_keys_row(d.data(), n, k.data());
  della::detail::bf16_delta_keys_row(src, n, b.data(), k2.data());
  uint64_t subnormal = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const float v = della::bf16_to_f32(e[i]);
    const float wd = v - b[i];
    subnormal += std::fpclassify(wd) == FP_SUBNORMAL;
    const uint16_t wk = della::detail::bf16_key(wd);
    if (della::f32_bits(d[i]) != della::f32_bits(wd) || k[i] != wk || k2[i] != wk) {
      CHECK(false, "bf16 deltas of %04x - %08x: %08x keys %04x %04x, scalar %08x key %04x", e[i], della::f32_bits(b[i]),
            della::f32_bits(d[i]), k[i], k2[i], della::f32_bits(wd), wk);
      return;
    }
  }
  CHECK(bad == want_bad, "bf16_deltas_row non-finite count %llu, want %llu", static_cast<unsigned long long>(bad),
        static_cast<unsigned long long>(want_bad));
  CHECK(subnormal > 1000, "only %llu subnormal deltas tested", static_cast<unsigned long long>(subnormal));
  std::vector<uint32_t> bits;
  for (uint32_t sign : {0u, 0x80000000u})
    for (uint32_t ax = 0; ax <= 0x00900000u; ax += 37) bits.push_back(sign | ax);  // subnormal and the smallest normals
  for (uint64_t x = 0; x <= 0xffffffffull; x += 997) bits.push_back(static_cast<uint32_t>(x));
  for (uint32_t x : {0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fbfffffu,
                     0xffc00000u, 0x7fffffffu, 0x007fffffu, 0x00800000u, 0x0000ffffu, 0x00008000u, 0u, 0x80000000u, 1u})
    bits.push_back(x);
  bits.resize(bits.size() - bits.size() % 32 + 5);
  std::vector<float> v(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) v[i] = della::bits_f32(bits[i]);
  std::vector<uint16_t> out(v.size());
  della::detail::f32_to_bf16_row(v.data(), v.size(), reinterpret_cast<uint8_t*>(out.data()));
  for (size_t i = 0; i < v.size(); ++i) {
    if (out[i] != della::f32_to_bf16(v[i])) {
      CHECK(false, "f32_to_bf16_row(%08x) = %04x, scalar %04x", bits[i], out[i], della::f32_to_bf16(v[i]));
      return;
    }
  }
#endif
}

static void half_round_trips() {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    if ((x & 0x7c00) == 0x7c00 && (x & 0x3ff)) continue;  // NaN payloads
    CHECK(della::f32_to_f16(della::f16_to_f32(x)) == x, "f16 round trip %04x", h);
    CHECK(della::f32_to_bf16(della::bf16_to_f32(x)) == x || ((x & 0x7f80) == 0x7f80 && (x & 0x7f)),
          "bf16 round trip %04x", h);
  }
  CHECK(della::f32_to_f16(65520.0f) == 0x7c00, "65520 -> inf");
  CHECK(della::f32_to_f16(65519.99f) == 0x7bff, "65519.99 -> max");
  CHECK(della::f32_to_f16(std::ldexp(1.0f, -25)) == 0, "2^-25 ties to zero");
  CHECK(della::f32_to_f16(std::ldexp(1.5f, -25)) == 1, "1.5*2^-25 -> 1 ulp");
  CHECK(della::f32_to_bf16(1.00390625f) == 0x3f80, "bf16 tie to even");
}

// A base and two experts of rows x n BF16 values a little apart, and a della task
// over them into BF16 (each test then changes what it checks).
struct TwoExperts {
  int64_t rows, n;
  std::vector<uint16_t> base, e0, e1;

  TwoExperts(int64_t rows_, int64_t n_, uint64_t seed) : rows(rows_), n(n_), base(rows_ * n_), e0(base.size()), e1(base.size()) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    for (size_t i = 0; i < base.size(); ++i) {
      base[i] = della::f32_to_bf16(nd(rng));
      e0[i] = della::f32_to_bf16(della::bf16_to_f32(base[i]) + nd(rng) * 0.1f);
      e1[i] = della::f32_to_bf16(della::bf16_to_f32(base[i]) + nd(rng) * 0.1f);
    }
  }

  della::MergeTask task() const {
    della::MergeTask t;
    t.base = base.data();
    t.base_dtype = della::DType::BF16;
    t.out_dtype = della::DType::BF16;
    t.shape = {rows, n};
    for (const auto* e : {&e0, &e1}) {
      della::ExpertInput in;
      in.data = e->data();
      in.dtype = della::DType::BF16;
      in.shape = t.shape;
      in.weight = 0.7f;
      in.density = 0.4;
      in.epsilon = 0.1;
      in.gamma = 0.05;
      t.experts.push_back(in);
    }
    t.sparsifier = della::Sparsifier::Magprune;
    t.rescale = della::Rescale::Inverse;
    t.consensus = della::Consensus::Sum;
    t.normalize = true;
    t.lambda = 1.1;
    t.tensor_id = 7;
    t.seed = 99;
    return t;
  }
};

static void threads_do_not_change_results() {
  const TwoExperts d(37, 1031, 12345);
  std::vector<uint16_t> out1(d.base.size(), 0xffff), out2(d.base.size(), 0xffff);
  della::MergeTask t1 = d.task(), t2 = d.task();
  t1.out = out1.data();
  t2.out = out2.data();
  std::vector<della::MergeStats> s1, s2;
  della::run_batch({t1}, {}, 1, s1);
  della::run_batch({t2}, {}, 4, s2);
  CHECK(out1 == out2, "1 and 4 threads differ");
  CHECK(s1[0].kept == s2[0].kept, "kept counts differ");
  size_t unwritten = 0;
  for (uint16_t v : out1) unwritten += v == 0xffff;
  CHECK(unwritten == 0, "%zu elements unwritten", unwritten);
  // About density of each expert survives.
  const double frac = static_cast<double>(s1[0].kept[0]) / static_cast<double>(d.rows * d.n);
  CHECK(frac > 0.35 && frac < 0.45, "kept fraction %f", frac);
}

// A RowSink in memory: each slab's room is a fresh poisoned buffer at an odd address,
// copied into `out` when handed back, so that rows written outside their slab, left
// unwritten or put out of order show.
class MemorySink : public della::RowSink {
 public:
  MemorySink(uint64_t slab_rows, uint64_t row_bytes, std::vector<uint8_t>& out)
      : rows_(slab_rows), row_bytes_(row_bytes), out_(out) {}
  uint64_t slab_rows() const override { return rows_; }
  uint8_t* room(uint64_t row0, uint64_t rows) override {
    CHECK(row0 == next_row_, "slab at row %llu, expected %llu", static_cast<unsigned long long>(row0),
          static_cast<unsigned long long>(next_row_));
    room_.assign(rows * row_bytes_ + 3, 0xa5);
    return room_.data() + 3;
  }
  void put(uint64_t row0, uint64_t rows, uint8_t* bytes) override {
    CHECK(bytes == room_.data() + 3, "put a slab from elsewhere");
    std::copy(bytes, bytes + rows * row_bytes_, out_.begin() + row0 * row_bytes_);
    next_row_ = row0 + rows;
    ++slabs;
  }
  void finish() override { finished = true; }
  unsigned slabs = 0;
  bool finished = false;

 private:
  uint64_t rows_, row_bytes_;
  std::vector<uint8_t>& out_;
  std::vector<uint8_t> room_;
  uint64_t next_row_ = 0;
};

// A task merged slab by slab into a sink equals the same task merged into one buffer:
// output bytes, statistics and digest, for every sparsifier and rescale (the TIES and
// breadcrumbs cuts and the norm scales are whole-tensor pre-passes).
static void slabbed_output_matches_whole() {
  const TwoExperts d(300, 1031, 4242);  // 63 rows a work item: several items a slab, several slabs
  const uint64_t per = della::detail::rows_per_item(d.n), rows = d.rows;
  using S = della::Sparsifier;
  using R = della::Rescale;
  const std::pair<S, R> cases[] = {{S::Magprune, R::Inverse}, {S::Magprune, R::L2},    {S::Random, R::Inverse},
                                   {S::Magnitude, R::None},    {S::Magnitude, R::L1},  {S::Breadcrumbs, R::Linf},
                                   {S::Breadcrumbs, R::None},  {S::None, R::None}};
  for (const auto& [sp, rs] : cases) {
    for (const bool linear : {false, true}) {
      if (linear && sp != S::None) continue;
      for (const uint64_t slab : {per, 2 * per + 5, 5 * per, rows * 2}) {
        for (const auto out_dtype : {della::DType::BF16, della::DType::F32}) {
          const uint64_t row_bytes = d.n * della::dtype_size(out_dtype);
          std::vector<uint8_t> whole(rows * row_bytes, 0xa5), slabbed(rows * row_bytes, 0xa5);
          della::MergeTask a = d.task();
          a.linear = linear;
          a.base = linear ? nullptr : d.base.data();
          a.out_dtype = out_dtype;
          a.sparsifier = sp;
          a.rescale = rs;
          a.consensus = linear ? della::Consensus::None : della::Consensus::Sum;
          a.digest = true;
          della::MergeTask b = a;
          a.out = whole.data();
          MemorySink sink(slab, row_bytes, slabbed);
          b.sink = &sink;
          std::vector<della::MergeStats> sa, sb;
          della::run_batch({a}, {}, 3, sa);
          della::run_batch({b}, {}, 2, sb);
          const int s = static_cast<int>(sp), r = static_cast<int>(rs);
          const unsigned long long sl = slab;
          CHECK(whole == slabbed, "sparsifier %d rescale %d slab %llu: slabbed output differs", s, r, sl);
          CHECK(sa[0].kept == sb[0].kept && sa[0].nonfinite == sb[0].nonfinite &&
                    sa[0].out_nonfinite == sb[0].out_nonfinite && sa[0].numel == sb[0].numel,
                "sparsifier %d rescale %d slab %llu: statistics differ", s, r, sl);
          CHECK(sb[0].has_digest && sa[0].digest == sb[0].digest && sb[0].digest == della::xxh64(whole.data(), whole.size()),
                "sparsifier %d rescale %d slab %llu: digests differ", s, r, sl);
          const uint64_t used = std::min(slab / per * per, rows);
          CHECK(sink.finished && sink.slabs == (rows + used - 1) / used, "slab %llu: %u slabs, finished %d", sl,
                sink.slabs, sink.finished);
        }
      }
    }
  }
  // A sink that cannot hold one work item is refused, not overrun.
  std::vector<uint8_t> out(rows * d.n * 2);
  MemorySink small(per - 1, d.n * 2, out);
  della::MergeTask t = d.task();
  t.sink = &small;
  std::vector<della::MergeStats> st;
  bool refused = false;
  try {
    della::run_batch({t}, {}, 2, st);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused && small.slabs == 0, "a sink smaller than a work item was not refused");
}

// XXH64 fed in pieces of every size (0, under a stripe, across stripes) equals the
// one-shot digest, which verify.test.ts checks against xxhsum's answers.
static void xxh64_pieces_match_whole() {
  std::mt19937_64 rng(777);
  std::vector<uint8_t> bytes(5000);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  for (size_t len : {0ul, 1ul, 31ul, 32ul, 33ul, 100ul, 4099ul, 5000ul}) {
    const uint64_t whole = della::xxh64(bytes.data(), len);
    for (int trial = 0; trial < 50; ++trial) {
      della::Xxh64Stream s;
      size_t at = 0;
      while (at < len) {
        const size_t piece = std::min<size_t>(len - at, rng() % (trial % 2 ? 70 : 3000));
        s.update(bytes.data() + at, piece);
        at += piece;
      }
      CHECK(s.digest() == whole, "length %zu trial %d: pieces give %016llx, whole %016llx", len, trial,
            static_cast<unsigned long long>(s.digest()), static_cast<unsigned long long>(whole));
    }
  }
}

// Magprune's arithmetic (q, 1/q) is used only where it equals the table at every rank:
// on an AVX-512 CD machine it is chosen for common rows, and one wrong table entry
// (any rank, q or 1/q) turns it off.
static bool avx512_cd_path() {
#if defined(DELLA_AVX512_PATHS)
  return della::detail::have_avx512_cd();
#else
  return false;
#endif
}

static void magprune_arith_checked() {
  if (!avx512_cd_path()) {
    std::printf("magprune arithmetic: no AVX-512 CD path here, table path only\n");
    return;
  }
  std::mt19937_64 rng(4242);
  int chosen = 0, rows = 0;
  for (uint64_t n : {2ul, 3ul, 17ul, 1031ul, 4096ul, 11008ul}) {
    for (double d : {0.2, 0.5, 0.8}) {
      della::detail::ExpertState es;
      es.coef = della::magprune_coef(d, 0.1);
      es.table.resize(n);
      for (uint64_t r = 0; r < n; ++r) {
        const float q = della::magprune_q(r, n, es.coef);
        es.table[r] = della::detail::KeepScale{q, della::inverse_scale(q)};
      }
      ++rows;
      if (!della::detail::magprune_arith_matches(es, n)) continue;
      ++chosen;
      for (int trial = 0; trial < 4; ++trial) {
        della::detail::ExpertState bad = es;
        float& f = trial % 2 ? bad.table[rng() % n].s : bad.table[rng() % n].q;
        f = std::nextafter(f, f * 2.0f);  // one unit in the last place up
        CHECK(!della::detail::magprune_arith_matches(bad, n), "n %llu density %g: a changed table entry still matches",
              static_cast<unsigned long long>(n), d);
      }
    }
  }
  CHECK(chosen == rows, "arithmetic chosen for %d of %d rows", chosen, rows);
}

// stable_ranks against std::stable_sort on key sets that take each of its paths: narrow
// ranges (counted), wide ranges with small buckets (insertion), crowded buckets (radix
// over the digits that differ), equal keys, and real fp32 magnitude keys.
static void stable_ranks_match_sort() {
  const uint32_t seed = static_cast<uint32_t>(std::random_device{}());
  std::mt19937 rng(seed);
  della::detail::Scratch s;
  std::vector<uint32_t> keys, ranks, order, want;
  int cases = 0;
  for (uint64_t n : {1ul, 2ul, 7ul, 33ul, 100ul, 1000ul, 4096ul, 11008ul, 70000ul}) {
    for (int kind = 0; kind < 7; ++kind) {
      keys.resize(n);
      for (uint64_t j = 0; j < n; ++j) {
        const uint32_t u = static_cast<uint32_t>(rng());
        switch (kind) {
          case 0: keys[j] = u & 0x7fffffffu; break;                             // spread over 31 bits
          case 1: keys[j] = 1000u + (u % 5000u); break;                         // narrow: counted
          case 2: keys[j] = j == 0 ? 0u : 0x40000000u + (u & 0xffffu); break;   // one outlier, a crowd
          case 3: keys[j] = (u & 1u) ? 0x7f000000u : 5u; break;                 // two values, far apart
          case 4: keys[j] = j % 3 == 0 ? u : 0x12345678u + (u & 0x3u); break;    // full 32 bits, ties
          case 5: {                                                              // |normal deltas| as fp32 keys
            const float x = std::normal_distribution<float>(0.0f, 0.02f)(rng) * ((u & 0xffu) == 0 ? 1e-20f : 1.0f);
            keys[j] = della::magnitude_key(x, della::KeyMode::F32);
            break;
          }
          default: keys[j] = (u % 40u) << 20; break;                            // few values, wide
        }
      }
      ranks.assign(n, 0xdeadbeefu);  // poison: an unwritten rank shows
      della::detail::stable_ranks(keys.data(), n, s, ranks.data());
      order.resize(n);
      for (uint64_t j = 0; j < n; ++j) order[j] = static_cast<uint32_t>(j);
      std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return keys[a] < keys[b]; });
      want.resize(n);
      for (uint64_t p = 0; p < n; ++p) want[order[p]] = static_cast<uint32_t>(p);
      ++cases;
      CHECK(ranks == want, "stable_ranks differs from a stable sort: n %llu, key kind %d (seed %u)",
            static_cast<unsigned long long>(n), kind, seed);
    }
  }
  std::printf("stable ranks: %d key sets match a stable sort (seed %u)\n", cases, seed);
}

// The GPU's shortcuts for two divisions (merge_math.h) against the IEEE division: the
// rank ratio of magprune for every row length the block ranking takes, and a zero
// dividend in the fuse on special and random operands.
static void division_shortcuts_match() {
  uint64_t pairs = 0, uncorrected_off = 0;
  for (uint32_t m = 1; m < della::kSmallRatioMax; ++m) {
    const float fm = static_cast<float>(m), inv = 1.0f / fm;
    for (uint32_t r = 0; r <= m; ++r) {
      const float want = static_cast<float>(r) / fm;
      const float got = della::small_ratio(r, fm, inv);
      ++pairs;
      uncorrected_off += della::f32_bits(static_cast<float>(r) * inv) != della::f32_bits(want);
      if (della::f32_bits(got) != della::f32_bits(want)) {
        CHECK(false, "small_ratio(%u, %u) = %a, division %a", r, m, got, want);
        if (failures > 10) return;
      }
    }
  }
  // Without its correction the product is often off: the check above can fail.
  CHECK(uncorrected_off > pairs / 100, "the uncorrected product was off for only %llu of %llu pairs",
        static_cast<unsigned long long>(uncorrected_off), static_cast<unsigned long long>(pairs));
  const della::MagpruneCoef coefs[] = {della::magprune_coef(0.4, 0.15), della::magprune_coef(0.9, 0.1),
                                       della::magprune_coef(0.05, 0.049)};
  for (uint32_t n : {1u, 2u, 3u, 8u, 4096u, 11008u, 14336u, 16384u})
    for (const della::MagpruneCoef& c : coefs) {
      const float fm = static_cast<float>(n - 1), inv = 1.0f / fm;
      for (uint32_t r = 0; r < n; ++r) {
        const float want = della::magprune_q_of<uint32_t>(r, n, c), got = della::magprune_q_small(r, n, fm, inv, c);
        if (della::f32_bits(got) != della::f32_bits(want)) {
          CHECK(false, "magprune_q_small(%u, %u) = %a, magprune_q_of %a", r, n, got, want);
          return;
        }
      }
    }
  const float inf = INFINITY, nan = NAN;
  std::vector<float> vals = {0.0f, -0.0f, 1.0f, -1.0f, 3.0f, -2.5f, 1e-8f, 9e-9f, 1e-45f, -1e-45f, 1e-40f, 3e38f,
                             -3e38f, inf, -inf, nan, -nan, 0.1f, 1.17549435e-38f};
  std::mt19937 rng(20261128);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000; ++i) vals.push_back(della::bits_f32(bits(rng)));
  uint64_t zeros = 0;
  for (float m : vals)
    for (float d : vals) {
      const float want = m / d, got = della::divide_zero_fast(m, d);
      const bool same = della::f32_bits(got) == della::f32_bits(want) || (want != want && got != got);
      zeros += m == 0.0f;
      if (!same) {
        CHECK(false, "divide_zero_fast(%a, %a) = %a, division %a", m, d, got, want);
        return;
      }
    }
  CHECK(zeros > 0, "no zero dividend tested");
  std::printf("division shortcuts: %llu rank ratios and %zu divisions match\n", static_cast<unsigned long long>(pairs),
              vals.size() * vals.size());
}

// fuse_element_fixed (the GPU's fuse for K <= 4) against fuse_element on random weighted
// deltas: zeros (dropped experts), both signs, a non-finite value now and then, weights
// of both signs, some summing to zero.
template <int K, della::Consensus C>
static void fixed_fuse_case(std::mt19937& rng, uint64_t& cases) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 99);
  for (int it = 0; it < 20000; ++it) {
    float p[K], w[K];
    for (int k = 0; k < K; ++k) {
      const int c = pick(rng);
      p[k] = c < 30 ? 0.0f : c < 32 ? -0.0f : c == 32 ? NAN : c == 33 ? -INFINITY : u(rng) * 1e-2f;
      w[k] = pick(rng) < 10 ? -0.5f : 0.25f + 0.25f * k;
    }
    if (K >= 2 && pick(rng) < 10) w[K - 1] = -w[0];  // weights that cancel
    const bool normalize = pick(rng) < 70, apply_lambda = pick(rng) < 30;
    const float lambda = 1.5f;
    const della::FuseConfig cfg{K, C, normalize, apply_lambda, lambda};
    const float want = della::fuse_element(p, w, cfg);
    const float got = della::fuse_element_fixed<K, C>(p, w, normalize, apply_lambda, lambda);
    ++cases;
    if (della::f32_bits(got) != della::f32_bits(want) && !(got != got && want != want)) {
      CHECK(false, "fuse_element_fixed<%d, %d> = %a, fuse_element %a (p[0] %a, w[0] %a)", K, static_cast<int>(C), got,
            want, p[0], w[0]);
      return;
    }
  }
}

// Merged values that overflow the output dtype are stored as infinities and counted in
// MergeStats::out_nonfinite, by the delta and the linear passes, whatever the threads.
static void output_overflow_counted() {
  // F16's largest finite value is 65504 (from 65520 up, values round to infinity); BF16
  // rounds FLT_MAX up to infinity; in F32 (and so F64) w * delta overflows. Inputs are
  // finite throughout.
  struct Case { della::DType out; std::vector<float> base, expert; float weight; uint64_t want; };
  const Case cases[] = {
      {della::DType::F16, {60000.0f, 64800.0f, 65520.0f, -65520.0f, 1e6f, 1.0f, 0.0f, -3.0f},
       {60000.0f, 64800.0f, 65520.0f, -65520.0f, 1e6f, 1.0f, 0.0f, -3.0f}, 1.0f, 3},
      {della::DType::BF16, {3.4028235e38f, -3.4028235e38f, 3.3e38f, 1.0f}, {3.4028235e38f, -3.4028235e38f, 3.3e38f, 1.0f},
       1.0f, 2},
      {della::DType::F32, {3e38f, -3e38f, 1.0f, 2.0f}, {3.4e38f, -3.4e38f, 1.0f, 2.0f}, 10.0f, 2},
      {della::DType::F64, {3e38f, 1.0f}, {3.4e38f, 1.0f}, 10.0f, 1},
  };
  for (const Case& c : cases) {
    for (bool linear : {false, true}) {
      const int64_t n = static_cast<int64_t>(c.base.size());
      std::vector<uint8_t> out(c.base.size() * della::dtype_size(c.out), 0xab);
      della::MergeTask t;
      t.linear = linear;
      t.base = linear ? nullptr : c.base.data();
      t.base_dtype = della::DType::F32;
      t.out = out.data();
      t.out_dtype = c.out;
      t.shape = {1, n};
      della::ExpertInput e;
      e.data = c.expert.data();
      e.dtype = della::DType::F32;
      e.shape = t.shape;
      e.weight = c.weight;
      t.experts.push_back(e);
      for (unsigned threads : {1u, 3u}) {
        std::vector<della::MergeStats> st;
        della::run_batch({t}, {}, threads, st);
        uint64_t stored = 0;
        for (int64_t i = 0; i < n; ++i) stored += della::stored_nonfinite(out.data(), c.out, static_cast<uint64_t>(i));
        CHECK(st[0].out_nonfinite == c.want && stored == c.want,
              "out dtype %d linear %d threads %u: out_nonfinite %llu, stored %llu, want %llu", static_cast<int>(c.out),
              linear, threads, static_cast<unsigned long long>(st[0].out_nonfinite),
              static_cast<unsigned long long>(stored), static_cast<unsigned long long>(c.want));
        CHECK(st[0].nonfinite == std::vector<uint64_t>(2, 0), "inputs counted as non-finite");
      }
    }
  }
  std::printf("output overflow: counted for every output dtype\n");
}

static void fixed_fuse_matches() {
  std::mt19937 rng(1128);
  uint64_t cases = 0;
  fixed_fuse_case<1, della::Consensus::Sum>(rng, cases);
  fixed_fuse_case<2, della::Consensus::Sum>(rng, cases);
  fixed_fuse_case<3, della::Consensus::Sum>(rng, cases);
  fixed_fuse_case<4, della::Consensus::Sum>(rng, cases);
  fixed_fuse_case<1, della::Consensus::None>(rng, cases);
  fixed_fuse_case<2, della::Consensus::None>(rng, cases);
  fixed_fuse_case<3, della::Consensus::None>(rng, cases);
  fixed_fuse_case<4, della::Consensus::None>(rng, cases);
  std::printf("fixed fuse: %llu elements match fuse_element\n", static_cast<unsigned long long>(cases));
}

int main() {
  philox_known_answers();
  philox_blocks_match_scalar();
  half_round_trips();
  bf16_rows_match();
  f16_select_matches();
  f16c_rows_match();
  threads_do_not_change_results();
  slabbed_output_matches_whole();
  xxh64_pieces_match_whole();
  magprune_arith_checked();
  stable_ranks_match_sort();
  division_shortcuts_match();
  fixed_fuse_matches();
  output_overflow_counted();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("kernel tests passed\n");
  return 0;
}
