// The CUDA pipeline: tensors are cut into slabs of whole rows; each slab is staged from
// the input maps into a pinned buffer (host threads), copied to the device, merged and
// copied back on one of several streams, so that the staging of one slab overlaps the
// transfers and kernels of the others. Device memory stays inside the budget: each
// stream owns budget / streams bytes, allocated once when the context opens.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "../kernels/thread_pool.h"
#include "cuda_merge.h"
#include "cuda_slab.h"
#include "ordered_digests.h"
#include "della/tensor_rules.h"

namespace della {
namespace cuda {

using namespace detail;

namespace {

constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kMaxSlabElements = 1ull << 30;  // cub's int item counts, with room

std::string human(uint64_t b) {
  char buf[64];
  if (b >= kGiB) std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / kGiB);
  else std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / (1 << 20));
  return buf;
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}


struct Piece {
  const char* src;
  char* dst;
  uint64_t bytes;
};

// memcpy of every piece, in chunks spread over the host threads: about four chunks a
// thread (a 64 MiB slab in fixed 8 MiB chunks had kept only 8 of 16 threads busy), of
// 256 KiB to 8 MiB.
void parallel_copy(const std::vector<Piece>& pieces, unsigned threads) {
  uint64_t total = 0;
  for (const Piece& p : pieces) total += p.bytes;
  const uint64_t chunk =
      std::min<uint64_t>(8ull << 20, std::max<uint64_t>(256ull << 10, (total / (4ull * std::max(1u, threads)) + 0xffff) & ~0xffffull));
  std::vector<Piece> chunks;
  for (const Piece& p : pieces)
    for (uint64_t off = 0; off < p.bytes; off += chunk)
      chunks.push_back({p.src + off, p.dst + off, std::min(chunk, p.bytes - off)});
  if (chunks.size() <= 1 || threads <= 1) {
    for (const Piece& c : chunks) std::memcpy(c.dst, c.src, c.bytes);
    return;
  }
  global_pool().run(chunks.size(), threads, [&](size_t i, unsigned) { std::memcpy(chunks[i].dst, chunks[i].src, chunks[i].bytes); });
}

unsigned single_slab_passes(const TaskInfo& ti) {
  unsigned p = kPassFinal | kResetCarryFinal;
  if (ti.need_cuts) p |= kInitState | kPassHist1 | kSelect1 | (ti.f32_keys ? (kPassHist2 | kSelect2) : 0u);
  if (ti.need_norm) p |= kPassNorm | kNormFinish | kResetCarryNorm;
  return p;
}

// Where a slab's pieces sit: inputs (base, experts) in the same order and sizes on the
// device and in pinned memory, so one copy moves them all.
struct SlabLayout {
  uint64_t stats = 0, state = 0, in = 0, in_bytes = 0, out_dev = 0, scratch = 0, work = 0, dev_total = 0;
  uint64_t base_rel = 0;
  std::vector<uint64_t> ex_rel;  // relative to `in`
  uint64_t out_bytes = 0, pin_out = 0, pin_stats = 0, pin_total = 0;
  uint64_t scratch_bytes = 0, work_bytes = 0;
};

SlabLayout slab_layout(const MergeTask& t, const TaskInfo& ti, uint64_t rows, bool with_work = true) {
  SlabLayout L;
  const uint64_t E = rows * ti.n;
  const uint64_t stats_bytes = stats_words(ti.k) * 8;
  uint64_t off = 0;
  L.stats = off;
  off += align_up(stats_bytes);
  L.state = off;
  if (ti.need_cuts || ti.need_norm) off += align_up(state_bytes(ti));
  L.in = off;
  uint64_t rel = 0;
  if (!t.linear) {
    L.base_rel = rel;
    rel += align_up(E * dtype_size(t.base_dtype));
  }
  for (const ExpertInput& e : t.experts) {
    L.ex_rel.push_back(rel);
    rel += align_up(E * dtype_size(e.dtype));
  }
  L.in_bytes = rel;
  off += rel;
  L.out_dev = off;
  L.out_bytes = E * dtype_size(t.out_dtype);
  off += align_up(L.out_bytes);
  L.scratch = off;
  if (with_work) {
    L.scratch_bytes = slab_scratch_bytes(ti, rows);
    const uint64_t total_work = slab_work_bytes(ti, rows);
    L.work_bytes = total_work - L.scratch_bytes;
    off += total_work;
  }
  L.work = L.scratch + L.scratch_bytes;
  L.dev_total = off;
  L.pin_out = align_up(L.in_bytes);
  L.pin_stats = L.pin_out + align_up(L.out_bytes);
  L.pin_total = L.pin_stats + align_up(stats_bytes);
  return L;
}

// The copies that stage rows [row0, row0 + rows) of the base and of each expert into
// `dst` laid out as L (a slab or a chunk of `rows` rows); an expert larger than the base
// (embedding sub-block) is gathered row by row.
std::vector<Piece> stage_pieces(const MergeTask& t, const TaskInfo& ti, uint64_t row0, uint64_t rows,
                                const SlabLayout& L, char* dst) {
  const uint64_t n = ti.n;
  std::vector<Piece> pieces;
  if (!t.linear) {
    const uint64_t bs = dtype_size(t.base_dtype);
    pieces.push_back({static_cast<const char*>(t.base) + row0 * n * bs, dst + L.base_rel, rows * n * bs});
  }
  for (unsigned k = 0; k < ti.k; ++k) {
    const ExpertInput& e = t.experts[k];
    const uint64_t es = dtype_size(e.dtype);
    char* to = dst + L.ex_rel[k];
    if (e.shape == t.shape) {
      pieces.push_back({static_cast<const char*>(e.data) + row0 * n * es, to, rows * n * es});
    } else {
      for (uint64_t r = 0; r < rows; ++r)
        pieces.push_back({static_cast<const char*>(e.data) + expert_row_offset(t.shape, e.shape, row0 + r, n) * es,
                          to + r * n * es, n * es});
    }
  }
  return pieces;
}

// 12040 -> "12.4"
std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

// The oldest Linux driver that runs a CUDA runtime of this major version (NVIDIA's CUDA
// release notes: 12.x from 525.60.13 by minor version compatibility, 13.x from 580.65.06).
std::string minimum_driver_text(int major) {
  if (major == 12) return " (Linux driver 525.60.13 or newer)";
  if (major == 13) return " (Linux driver 580.65.06 or newer)";
  return std::string();
}

// The runtime's own words for a missing or old driver ("CUDA driver version is
// insufficient for CUDA runtime version") say neither which, nor what to do.
std::string no_device_reason(cudaError_t e, int driver_version, int runtime_version) {
  const std::string runtime_words = std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
  if (e == cudaErrorInsufficientDriver && driver_version == 0)
    return "no NVIDIA driver found (the CUDA runtime could not load libcuda.so.1): " + runtime_words;
  // Within a major version a newer runtime runs on an older driver (minor version
  // compatibility), so only an older major version is the driver's age.
  if (e == cudaErrorInsufficientDriver && driver_version > 0 && driver_version / 1000 < runtime_version / 1000)
    return "the NVIDIA driver supports CUDA " + cuda_version_text(driver_version) + " and this plugin needs CUDA " +
           std::to_string(runtime_version / 1000) + ".0 or newer" + minimum_driver_text(runtime_version / 1000) +
           ": update the driver, or build the plugin with a CUDA toolkit the driver supports: " + runtime_words;
  // The driver's library loads but the kernel's device nodes are missing: a module not
  // loaded (a new kernel before a reboot), or a container started without the GPUs.
  // (WSL 2 has /dev/dxg instead.)
  if (e == cudaErrorNoDevice && driver_version > 0 && access("/dev/nvidiactl", F_OK) != 0 &&
      access("/dev/dxg", F_OK) != 0)
    return "the NVIDIA driver's library is installed but this process sees no GPU device (no /dev/nvidiactl: the "
           "NVIDIA kernel module is not loaded, or a container was started without its GPUs, e.g. docker run "
           "--gpus all): " + runtime_words;
  return "no usable CUDA driver or GPU: " + runtime_words;
}

}  // namespace

DellaCudaDeviceInfo probe(int device) {
  DellaCudaDeviceInfo info;
  std::memset(&info, 0, sizeof info);
  info.index = device;
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw Error(DELLA_CUDA_NO_DEVICE, no_device_reason(e, info.driver_version, info.runtime_version));
  }
  info.count = count;
  if (count == 0) throw Error(DELLA_CUDA_NO_DEVICE, "the CUDA driver reports no GPU");
  if (device < 0 || device >= count)
    throw Error(DELLA_CUDA_NO_DEVICE, "there is no CUDA device " + std::to_string(device) + ": this machine has " +
                                          std::to_string(count) + " (cuda:0" +
                                          (count > 1 ? " to cuda:" + std::to_string(count - 1) : std::string()) + ")");
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  std::snprintf(info.name, sizeof info.name, "%s", prop.name);
  info.major = prop.major;
  info.minor = prop.minor;
  info.total_memory = prop.totalGlobalMem;
  info.multiprocessors = prop.multiProcessorCount;
  check(cudaSetDevice(device), "cudaSetDevice");
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  info.free_memory = free_b;
  if (prop.major < 8)
    throw Error(DELLA_CUDA_NO_DEVICE, std::string(prop.name) + " has compute capability " + std::to_string(prop.major) +
                                          "." + std::to_string(prop.minor) +
                                          "; the CUDA plugin is built for 8.0 (Ampere) and newer");
  return info;
}

struct Slot {
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  char* dev = nullptr;
  uint64_t dev_bytes = 0;
  char* pinned = nullptr;
  uint64_t pinned_bytes = 0;
  void* pinned_map = nullptr;  // Options::pinned_huge: the mapping registered (else cudaMallocHost's)
  uint64_t pinned_map_bytes = 0;
  // the job in flight
  bool busy = false;
  size_t task = 0;
  uint64_t row0 = 0, rows = 0;
  uint64_t chunk = 0;  // rows staged through the pinned buffer at a time (0: the whole slab)
  bool final_pass = false;
  SlabLayout layout;
  // DELLA_CUDA_PROFILE: the stream's progress through the slab (before the upload, after
  // it, after the kernels, after the download).
  cudaEvent_t marks[4] = {nullptr, nullptr, nullptr, nullptr};
  // Chunked staging: the last copy to the device from each half of the pinned buffer;
  // copying a chunked slab out: the last copy from the device into each of its two buffers.
  cudaEvent_t half_copied[2] = {nullptr, nullptr};
};

// Where the host's time goes in one run(), printed to stderr when the environment has
// DELLA_CUDA_PROFILE=1: what a GPU run's end-to-end numbers need to be understood.
struct Profile {
  using Clock = std::chrono::steady_clock;
  double pinned_alloc = 0, stage = 0, wait = 0, copy_out = 0, enqueue = 0, hash = 0, hash_wait = 0;
  double gpu_up = 0, gpu_kernels = 0, gpu_down = 0;  // stream time of the slabs' stages, summed
  double register_s = 0, unregister_s = 0;           // Options::register_inputs
  uint64_t staged_bytes = 0, direct_bytes = 0, registered_bytes = 0, out_bytes = 0, slabs = 0;
  static double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
};

// Threads that hash the outputs (MergeTask::digest) as their slabs come back, in row
// order (OrderedDigests), while this thread stages the next slabs: two, or one a task.
constexpr unsigned kHashThreads = 2;

struct Context::Impl {
  Options opt;
  DellaCudaDeviceInfo info{};
  std::vector<Slot> slots;
  bool healthy = true;
  bool profiling = false;  // DELLA_CUDA_PROFILE=1
  Profile prof;            // of the run() in progress
  std::unique_ptr<OrderedDigests> digests;  // of the run() in progress, where a task asks for one
  // Options::register_inputs: the page ranges of the run()'s inputs registered with CUDA;
  // while direct_inputs, slabs copy their inputs from them without staging.
  std::vector<std::pair<void*, uint64_t>> registered;
  bool direct_inputs = false;

  ~Impl() {
    cudaSetDevice(opt.device);
    for (Slot& s : slots) {
      if (s.stream) cudaStreamSynchronize(s.stream);
      if (s.done) cudaEventDestroy(s.done);
      for (cudaEvent_t e : s.marks)
        if (e) cudaEventDestroy(e);
      for (cudaEvent_t e : s.half_copied)
        if (e) cudaEventDestroy(e);
      if (s.stream) cudaStreamDestroy(s.stream);
      if (s.dev) cudaFree(s.dev);
      unpin(s);
    }
    unregister_inputs();  // only left registered if run() was cut short before its try
  }

  // Pinned staging memory of `bytes` for slot s, its old buffer freed first.
  void pin(Slot& s, uint64_t bytes) {
    if (s.pinned) check(unpin(s), "freeing pinned staging memory");
    void* p = nullptr;
    if (opt.pinned_huge) {
      // 2 MiB-aligned, so that the transparent huge pages the kernel gives cover it whole.
      constexpr uint64_t kHuge = 2ull << 20;
      const uint64_t size = (bytes + kHuge - 1) / kHuge * kHuge, map_bytes = size + kHuge;
      void* map = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (map != MAP_FAILED) {
        char* h = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(map) + kHuge - 1) & ~(kHuge - 1));
        (void)madvise(h, size, MADV_HUGEPAGE);  // a hint: without it the pages are 4 KiB
        (void)madvise(h, size, MADV_DONTFORK);  // a child process must not share pinned pages
        if (cudaHostRegister(h, size, cudaHostRegisterDefault) == cudaSuccess) {
          s.pinned = h;
          s.pinned_bytes = size;
          s.pinned_map = map;
          s.pinned_map_bytes = map_bytes;
          return;
        }
        (void)cudaGetLastError();
        munmap(map, map_bytes);
      }
    }
    check(cudaMallocHost(&p, bytes), "cudaMallocHost (pinned staging memory)");
    s.pinned = static_cast<char*>(p);
    s.pinned_bytes = bytes;
  }

  static cudaError_t unpin(Slot& s) {
    cudaError_t e = cudaSuccess;
    if (s.pinned_map) {
      e = cudaHostUnregister(s.pinned);
      munmap(s.pinned_map, s.pinned_map_bytes);
    } else if (s.pinned) {
      e = cudaFreeHost(s.pinned);
    }
    s.pinned = nullptr;
    s.pinned_bytes = 0;
    s.pinned_map = nullptr;
    s.pinned_map_bytes = 0;
    return e;
  }

  struct Job {
    size_t task;
    uint64_t row0, rows;
    unsigned passes;
    bool bound;        // one of several slabs of a task whose state spans them: one stream
    bool first_bound;  // the first such job of its task
    uint64_t chunk = 0;  // rows staged at a time when the slab is larger than the pinned buffer
  };

  uint64_t plan_rows(const MergeTask& t, const TaskInfo& ti, bool by_pinned = true) const;
  uint64_t chunk_rows(const MergeTask& t, const TaskInfo& ti) const;
  void stage_chunks(Slot& s, const Job& j, const MergeTask& t, const TaskInfo& ti, const SlabLayout& L, unsigned threads);
  void copy_out_chunks(Slot& s, const MergeTask& t, uint64_t n, unsigned threads);
  void finish(Slot& s, const std::vector<MergeTask>& tasks, std::vector<MergeStats>& stats, unsigned threads);
  void start(Slot& s, const Job& j, const MergeTask& t, const TaskInfo& ti, unsigned threads);
  void register_inputs(const std::vector<MergeTask>& tasks);
  void unregister_inputs();
};

// The pages of every input of the batch, overlapping and touching ranges merged (tensors
// of one file share pages at their ends, and CUDA refuses to register a page twice),
// registered read-only, as a merge maps its inputs. Any refusal (a driver or device
// without read-only registration, memory that cannot be pinned) undoes the others: the
// run then stages its inputs as usual.
void Context::Impl::register_inputs(const std::vector<MergeTask>& tasks) {
  const auto t0 = Profile::Clock::now();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  auto add = [&](const void* p, const std::vector<int64_t>& shape, DType dt) {
    const uint64_t bytes = geometry(shape).numel * dtype_size(dt);
    if (p == nullptr || bytes == 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    ranges.emplace_back(a / page * page, (a + bytes + page - 1) / page * page);
  };
  for (const MergeTask& t : tasks) {
    if (!t.linear) add(t.base, t.shape, t.base_dtype);
    for (const ExpertInput& e : t.experts) add(e.data, e.shape, e.dtype);
  }
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;
  for (const auto& r : ranges) {
    if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
    else merged.push_back(r);
  }
  for (const auto& r : merged) {
    void* p = reinterpret_cast<void*>(r.first);
    const cudaError_t e = cudaHostRegister(p, r.second - r.first, cudaHostRegisterReadOnly);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      if (profiling)
        std::fprintf(stderr, "della cuda profile: registering the inputs was refused (%s): they are staged\n",
                     cudaGetErrorName(e));
      unregister_inputs();  // empties `registered`
      break;
    }
    registered.emplace_back(p, r.second - r.first);
    prof.registered_bytes += r.second - r.first;
  }
  direct_inputs = !registered.empty();
  prof.register_s += Profile::since(t0);
}

// Only once no copy from the inputs can be pending (every stream waited for).
void Context::Impl::unregister_inputs() {
  const auto t0 = Profile::Clock::now();
  for (const auto& r : registered) (void)cudaHostUnregister(r.first);
  (void)cudaGetLastError();
  registered.clear();
  direct_inputs = false;
  prof.unregister_s += Profile::since(t0);
}

// Rows of a slab: as many as the pinned staging buffer holds (by_pinned), or, for a task
// whose passes span its slabs, as many as the stream's device memory holds: its inputs
// then stay on the device for every pass and are staged once, in chunks (stage_chunks).
uint64_t Context::Impl::plan_rows(const MergeTask& t, const TaskInfo& ti, bool by_pinned) const {
  if (ti.n > kMaxSlabElements)
    throw Error(DELLA_CUDA_ERROR, "a tensor of shape " + shape_text(t.shape) + " has rows of " + std::to_string(ti.n) +
                                      " elements; the CUDA backend takes rows of at most 2^30 (use --device cpu)");
  const SlabLayout one = slab_layout(t, ti, 1, false);
  const uint64_t per_row_pinned = std::max<uint64_t>(1, one.in_bytes + one.out_bytes);
  uint64_t rows = by_pinned ? std::min<uint64_t>(ti.rows, std::max<uint64_t>(1, opt.pinned_bytes / per_row_pinned)) : ti.rows;
  rows = std::min<uint64_t>(rows, std::max<uint64_t>(1, std::min(opt.max_slab_elements, kMaxSlabElements) / ti.n));
  const uint64_t cap = slots.front().dev_bytes;
  while (true) {
    const uint64_t need = slab_layout(t, ti, rows).dev_total;
    if (need <= cap) return rows;
    if (rows == 1)
      throw Error(DELLA_CUDA_OUT_OF_MEMORY,
                  "a tensor of shape " + shape_text(t.shape) + " needs " + human(need) +
                      " of device memory for one row, more than the " + human(cap) +
                      " per stream that the device memory budget allows: raise --gpu-memory");
    rows = std::max<uint64_t>(1, rows / 2);
  }
}

// Rows of a staging chunk: two chunks of inputs (one filled while the other is copied to
// the device) and one of output in the pinned buffer.
uint64_t Context::Impl::chunk_rows(const MergeTask& t, const TaskInfo& ti) const {
  const SlabLayout one = slab_layout(t, ti, 1, false);
  return std::max<uint64_t>(1, opt.pinned_bytes / std::max<uint64_t>(1, 2 * one.in_bytes + one.out_bytes));
}

// Where a chunk's pieces sit in the pinned buffer: inputs in two alternating halves,
// then the output, then the statistics.
struct ChunkLayout {
  SlabLayout c;  // of one chunk (relative offsets of the inputs)
  uint64_t half = 0, out = 0, stats = 0, total = 0;
};
ChunkLayout chunk_layout(const MergeTask& t, const TaskInfo& ti, uint64_t chunk) {
  ChunkLayout C;
  C.c = slab_layout(t, ti, chunk, false);
  C.half = align_up(C.c.in_bytes);
  C.out = 2 * C.half;
  C.stats = C.out + align_up(C.c.out_bytes);
  C.total = C.stats + align_up(stats_words(ti.k) * 8);
  return C;
}

// Stages the slab's inputs chunk by chunk: rows into one half of the pinned buffer while
// the other half's copy to the device runs, each input to its place in the slab.
void Context::Impl::stage_chunks(Slot& s, const Job& j, const MergeTask& t, const TaskInfo& ti, const SlabLayout& L,
                                 unsigned threads) {
  const ChunkLayout C = chunk_layout(t, ti, j.chunk);
  const uint64_t n = ti.n;
  for (uint64_t c = 0, i = 0; c < j.rows; c += j.chunk, ++i) {
    const uint64_t rows = std::min(j.chunk, j.rows - c), r0 = j.row0 + c;
    cudaEvent_t& copied = s.half_copied[i % 2];
    if (i >= 2) check(cudaEventSynchronize(copied), "the GPU merge (staging)");  // this half's last copy is done
    char* half = s.pinned + (i % 2) * C.half;
    const auto t0 = Profile::Clock::now();
    parallel_copy(stage_pieces(t, ti, r0, rows, C.c, half), threads);
    prof.stage += Profile::since(t0);
    // Each input's rows to their place in the device slab (laid out for j.rows rows).
    char* dev = s.dev + L.in;
    if (!t.linear) {
      const uint64_t bs = dtype_size(t.base_dtype);
      check(cudaMemcpyAsync(dev + L.base_rel + c * n * bs, half + C.c.base_rel, rows * n * bs, cudaMemcpyHostToDevice,
                            s.stream),
            "cudaMemcpyAsync (to the GPU)");
    }
    for (unsigned k = 0; k < ti.k; ++k) {
      const uint64_t es = dtype_size(t.experts[k].dtype);
      check(cudaMemcpyAsync(dev + L.ex_rel[k] + c * n * es, half + C.c.ex_rel[k], rows * n * es, cudaMemcpyHostToDevice,
                            s.stream),
            "cudaMemcpyAsync (to the GPU)");
    }
    check(cudaEventRecord(copied, s.stream), "cudaEventRecord");
  }
}

// The slab's output back chunk by chunk through the pinned buffer, in row order (the
// digest threads take them in that order). Two pinned buffers take turns, the output's
// own space and the first input half (free once the slab is done) when a chunk fits it:
// the next chunk's copy from the device runs while this thread copies the last one out.
void Context::Impl::copy_out_chunks(Slot& s, const MergeTask& t, uint64_t n, unsigned threads) {
  const uint64_t row_bytes = n * dtype_size(t.out_dtype);
  const uint64_t half = s.layout.pin_out / 2;  // chunk_layout: the output follows two input halves
  char* const bufs[2] = {s.pinned + s.layout.pin_out, s.chunk * row_bytes <= half ? s.pinned : nullptr};
  const unsigned nbuf = bufs[1] ? 2 : 1;
  auto fetch = [&](uint64_t c, unsigned b) {
    const uint64_t rows = std::min(s.chunk, s.rows - c);
    check(cudaMemcpyAsync(bufs[b], s.dev + s.layout.out_dev + c * row_bytes, rows * row_bytes, cudaMemcpyDeviceToHost,
                          s.stream),
          "cudaMemcpyAsync (from the GPU)");
    check(cudaEventRecord(s.half_copied[b], s.stream), "cudaEventRecord");
  };
  fetch(0, 0);
  for (uint64_t c = 0, i = 0; c < s.rows; c += s.chunk, ++i) {
    const uint64_t rows = std::min(s.chunk, s.rows - c), next = c + s.chunk;
    const unsigned b = static_cast<unsigned>(i % nbuf);
    if (nbuf == 2 && next < s.rows) fetch(next, 1 - b);  // into the buffer copied out last round
    check(cudaEventSynchronize(s.half_copied[b]), "the GPU merge (copy out)");
    const auto t1 = Profile::Clock::now();
    parallel_copy({{bufs[b], static_cast<char*>(t.out) + (s.row0 + c) * row_bytes, rows * row_bytes}}, threads);
    prof.copy_out += Profile::since(t1);
    prof.out_bytes += rows * row_bytes;
    if (t.digest) {
      const auto t2 = Profile::Clock::now();
      digests->add(s.task, s.row0 + c, rows, static_cast<const char*>(t.out), row_bytes);
      prof.hash += Profile::since(t2);
    }
    if (nbuf == 1 && next < s.rows) fetch(next, 0);
  }
}

void Context::Impl::start(Slot& s, const Job& j, const MergeTask& t, const TaskInfo& ti, unsigned threads) {
  const SlabLayout L = slab_layout(t, ti, j.rows);
  if (L.dev_total > s.dev_bytes) throw Error(DELLA_CUDA_ERROR, "internal: slab larger than the stream's device memory");
  // A slab larger than the pinned buffer (a multi-pass task kept on the device) is staged
  // in chunks; else in one piece.
  const bool chunked = j.chunk != 0 && j.chunk < j.rows;
  const ChunkLayout C = chunked ? chunk_layout(t, ti, j.chunk) : ChunkLayout{};
  const uint64_t pin_need = chunked ? C.total : L.pin_total;
  const uint64_t pin_out = chunked ? C.out : L.pin_out, pin_stats = chunked ? C.stats : L.pin_stats;
  if (s.pinned_bytes < pin_need) {
    const auto t0 = Profile::Clock::now();
    pin(s, std::max(pin_need, std::min<uint64_t>(opt.pinned_bytes, 2 * pin_need)));
    prof.pinned_alloc += Profile::since(t0);
  }
  // Inputs straight from the registered maps (Options::register_inputs), where every
  // expert has the base's shape (a larger one is gathered row by row: staged).
  bool direct = direct_inputs && !chunked;
  for (const ExpertInput& e : t.experts) direct = direct && e.shape == t.shape;
  // Else stage the inputs in one piece (a chunked slab: below, as its chunks' copies go).
  if (!chunked && !direct) {
    const auto t0 = Profile::Clock::now();
    parallel_copy(stage_pieces(t, ti, j.row0, j.rows, L, s.pinned), threads);
    prof.stage += Profile::since(t0);
  }
  (direct ? prof.direct_bytes : prof.staged_bytes) += L.in_bytes;
  ++prof.slabs;
  const auto t1 = Profile::Clock::now();
  const double staged_before = prof.stage;

  char* dev = s.dev;
  unsigned long long* d_stats = reinterpret_cast<unsigned long long*>(dev + L.stats);
  if (s.marks[0]) check(cudaEventRecord(s.marks[0], s.stream), "cudaEventRecord");
  check(cudaMemsetAsync(d_stats, 0, stats_words(ti.k) * 8, s.stream), "cudaMemsetAsync");
  if (chunked) {
    stage_chunks(s, j, t, ti, L, threads);
  } else if (direct) {
    for (const Piece& c : stage_pieces(t, ti, j.row0, j.rows, L, dev + L.in))
      check(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyHostToDevice, s.stream), "cudaMemcpyAsync (to the GPU)");
  } else {
    check(cudaMemcpyAsync(dev + L.in, s.pinned, L.in_bytes, cudaMemcpyHostToDevice, s.stream), "cudaMemcpyAsync (to the GPU)");
  }
  if (s.marks[1]) check(cudaEventRecord(s.marks[1], s.stream), "cudaEventRecord");
  SlabParams p;
  fill_params(t, ti, p);
  p.base = t.linear ? nullptr : dev + L.in + L.base_rel;
  for (unsigned k = 0; k < ti.k; ++k) p.ex[k].data = dev + L.in + L.ex_rel[k];
  p.out = dev + L.out_dev;
  p.stats = d_stats;
  p.rows = j.rows;
  p.row0 = j.row0;
  if (ti.need_cuts || ti.need_norm) p.state = state_layout(ti, dev + L.state);
  enqueue_slab(t, ti, p, j.passes, dev + L.scratch, dev + L.work, L.work_bytes, s.stream);
  const bool final_pass = (j.passes & kPassFinal) != 0;
  if (final_pass) enqueue_out_check(ti, p, s.stream);
  if (s.marks[2]) check(cudaEventRecord(s.marks[2], s.stream), "cudaEventRecord");
  if (final_pass && !chunked)  // chunked: copy_out_chunks, once the slab is done
    check(cudaMemcpyAsync(s.pinned + pin_out, dev + L.out_dev, L.out_bytes, cudaMemcpyDeviceToHost, s.stream),
          "cudaMemcpyAsync (from the GPU)");
  check(cudaMemcpyAsync(s.pinned + pin_stats, d_stats, stats_words(ti.k) * 8, cudaMemcpyDeviceToHost, s.stream),
        "cudaMemcpyAsync (from the GPU)");
  if (s.marks[3]) check(cudaEventRecord(s.marks[3], s.stream), "cudaEventRecord");
  check(cudaEventRecord(s.done, s.stream), "cudaEventRecord");
  prof.enqueue += Profile::since(t1) - (prof.stage - staged_before);
  s.busy = true;
  s.task = j.task;
  s.row0 = j.row0;
  s.rows = j.rows;
  s.chunk = chunked ? j.chunk : 0;
  s.final_pass = final_pass;
  s.layout = L;
  s.layout.pin_out = pin_out;
  s.layout.pin_stats = pin_stats;
}

void Context::Impl::finish(Slot& s, const std::vector<MergeTask>& tasks, std::vector<MergeStats>& stats,
                           unsigned threads) {
  if (!s.busy) return;
  const auto t0 = Profile::Clock::now();
  check(cudaEventSynchronize(s.done), "the GPU merge");
  prof.wait += Profile::since(t0);
  s.busy = false;
  if (s.marks[0]) {
    float up = 0, kernels = 0, down = 0;
    check(cudaEventElapsedTime(&up, s.marks[0], s.marks[1]), "cudaEventElapsedTime");
    check(cudaEventElapsedTime(&kernels, s.marks[1], s.marks[2]), "cudaEventElapsedTime");
    check(cudaEventElapsedTime(&down, s.marks[2], s.marks[3]), "cudaEventElapsedTime");
    prof.gpu_up += up / 1e3;
    prof.gpu_kernels += kernels / 1e3;
    prof.gpu_down += down / 1e3;
  }
  const MergeTask& t = tasks[s.task];
  const unsigned K = static_cast<unsigned>(t.experts.size());
  const uint64_t n = t.shape.size() >= 2 ? static_cast<uint64_t>(t.shape.back()) : stats[s.task].numel;
  if (s.final_pass && s.chunk) {
    copy_out_chunks(s, t, n, threads);
  } else if (s.final_pass) {
    const uint64_t os = dtype_size(t.out_dtype);
    const auto t1 = Profile::Clock::now();
    parallel_copy({{s.pinned + s.layout.pin_out, static_cast<char*>(t.out) + s.row0 * n * os, s.layout.out_bytes}}, threads);
    prof.copy_out += Profile::since(t1);
    prof.out_bytes += s.layout.out_bytes;
    if (t.digest) {
      const auto t2 = Profile::Clock::now();
      digests->add(s.task, s.row0, s.rows, static_cast<const char*>(t.out), n * os);
      prof.hash += Profile::since(t2);
    }
  }
  uint64_t counts[2 * kMaxExperts + 2];
  std::memcpy(counts, s.pinned + s.layout.pin_stats, stats_words(K) * 8);
  MergeStats& st = stats[s.task];
  for (unsigned i = 0; i <= K; ++i) st.nonfinite[i] += counts[i];
  for (unsigned k = 0; k < K; ++k) st.kept[k] += counts[1 + K + k];
  st.out_nonfinite += counts[1 + 2 * K];
}

Context::Context(const Options& options) : impl_(new Impl) {
  Impl& m = *impl_;
  m.opt = options;
  m.opt.streams = std::max(1u, options.streams);
  const char* profile = std::getenv("DELLA_CUDA_PROFILE");
  m.profiling = profile && profile[0] == '1';
  if (const char* pinned = std::getenv("DELLA_CUDA_PINNED"); pinned && std::strcmp(pinned, "huge") == 0)
    m.opt.pinned_huge = true;
  if (const char* inputs = std::getenv("DELLA_CUDA_INPUTS"); inputs && std::strcmp(inputs, "register") == 0)
    m.opt.register_inputs = true;
  const auto opened = Profile::Clock::now();
  m.info = probe(options.device);
  const double probe_s = Profile::since(opened);
  const uint64_t free_b = m.info.free_memory;
  uint64_t budget = options.memory_budget;
  if (budget == 0) budget = std::min<uint64_t>(16 * kGiB, free_b / 100 * 85);
  if (budget > free_b)
    throw Error(DELLA_CUDA_OUT_OF_MEMORY, "the GPU memory budget (--gpu-memory) of " + human(budget) + " is more than the " +
                                              human(free_b) + " free on cuda:" + std::to_string(options.device) + " (" +
                                              m.info.name + ", " + human(m.info.total_memory) + ")");
  const uint64_t per = budget / m.opt.streams / 256 * 256;
  if (per < (16ull << 20))
    throw Error(DELLA_CUDA_OUT_OF_MEMORY, "the GPU memory budget (--gpu-memory) of " + human(budget) +
                                              " is too small: give at least " + human(16ull << 20) + " per stream (" +
                                              std::to_string(m.opt.streams) + " streams)");
  m.slots.resize(m.opt.streams);
  for (Slot& s : m.slots) {
    check(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
    for (cudaEvent_t& e : s.half_copied) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    if (m.profiling)
      for (cudaEvent_t& e : s.marks) check(cudaEventCreate(&e), "cudaEventCreate");
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, per);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw Error(DELLA_CUDA_OUT_OF_MEMORY, "cannot allocate " + human(budget) + " of GPU memory on cuda:" +
                                                std::to_string(options.device) + " (" + m.info.name + "): " +
                                                cudaGetErrorString(e) + "; lower --gpu-memory");
    }
    s.dev = static_cast<char*>(p);
    s.dev_bytes = per;
  }
  if (m.profiling)
    std::fprintf(stderr, "della cuda profile: device open %.3f s (probe and context %.3f s, %u streams of %s)\n",
                 Profile::since(opened), probe_s, m.opt.streams, human(per).c_str());
}

Context::~Context() = default;

const DellaCudaDeviceInfo& Context::info() const { return impl_->info; }
bool Context::healthy() const { return impl_->healthy; }

void Context::run(const std::vector<MergeTask>& tasks, std::vector<MergeStats>& stats, unsigned host_threads) {
  Impl& m = *impl_;
  if (!m.healthy) throw Error(DELLA_CUDA_ERROR, "the GPU context failed earlier and cannot be used");
  host_threads = std::max(1u, host_threads);
  check(cudaSetDevice(m.opt.device), "cudaSetDevice");
  const auto run_start = Profile::Clock::now();
  m.prof = Profile{};
  size_t digest_tasks = 0;
  for (const MergeTask& t : tasks) digest_tasks += t.digest ? 1 : 0;
  m.digests.reset(digest_tasks == 0 ? nullptr
                                    : new OrderedDigests(tasks.size(), static_cast<unsigned>(std::min<size_t>(kHashThreads, digest_tasks))));
  stats.assign(tasks.size(), MergeStats{});
  std::vector<TaskInfo> infos;
  infos.reserve(tasks.size());
  std::vector<Impl::Job> jobs;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const MergeTask& t = tasks[i];
    validate_task(t);
    infos.push_back(task_info(t, m.opt));
    const TaskInfo& ti = infos.back();
    stats[i].nonfinite.assign(ti.k + 1, 0);
    stats[i].kept.assign(ti.k, 0);
    stats[i].numel = ti.numel;
    if (ti.numel == 0 || ti.rows == 0) continue;
    uint64_t per = m.plan_rows(t, ti);
    uint64_t slabs = (ti.rows + per - 1) / per;
    // A task whose passes span its slabs (cuts, norms) would stage every slab once per
    // pass: instead its slabs are as large as device memory allows, so its inputs stay on
    // the device for all passes (usually one slab for the whole tensor), staged once, in
    // chunks through the pinned buffer (Options::resident_passes).
    uint64_t chunk = 0;
    if (slabs > 1 && (ti.need_cuts || ti.need_norm) && m.opt.resident_passes) {
      chunk = std::min(per, m.chunk_rows(t, ti));
      per = m.plan_rows(t, ti, false);
      slabs = (ti.rows + per - 1) / per;
      if (chunk >= per) chunk = 0;
    }
    auto slab = [&](uint64_t s) { return std::make_pair(s * per, std::min(per, ti.rows - s * per)); };
    if (slabs == 1) {
      jobs.push_back({i, 0, ti.rows, single_slab_passes(ti), false, false, chunk});
    } else if (ti.need_cuts || ti.need_norm) {
      bool first = true;
      auto pass = [&](unsigned main, unsigned at_first, unsigned at_last) {
        for (uint64_t s = 0; s < slabs; ++s) {
          const auto [r0, rows] = slab(s);
          unsigned p = main;
          if (s == 0) p |= at_first;
          if (s + 1 == slabs) p |= at_last;
          jobs.push_back({i, r0, rows, p, true, first, chunk});
          first = false;
        }
      };
      if (ti.need_cuts) {
        pass(kPassHist1, kInitState, kSelect1);
        if (ti.f32_keys) pass(kPassHist2, 0, kSelect2);
      }
      if (ti.need_norm) pass(kPassNorm, kResetCarryNorm, kNormFinish);
      pass(kPassFinal, kResetCarryFinal, 0);
    } else {
      for (uint64_t s = 0; s < slabs; ++s) {
        const auto [r0, rows] = slab(s);
        jobs.push_back({i, r0, rows, kPassFinal, false, false});
      }
    }
  }
  if (m.opt.register_inputs && !jobs.empty()) m.register_inputs(tasks);
  try {
    size_t next = 0, bound_slot = 0;
    for (const Impl::Job& j : jobs) {
      size_t si;
      if (j.bound) {
        if (j.first_bound) bound_slot = next++ % m.slots.size();
        si = bound_slot;
      } else {
        si = next++ % m.slots.size();
      }
      Slot& s = m.slots[si];
      m.finish(s, tasks, stats, host_threads);
      m.start(s, j, tasks[j.task], infos[j.task], host_threads);
    }
    for (Slot& s : m.slots) m.finish(s, tasks, stats, host_threads);
    m.unregister_inputs();  // every stream's last slab waited for: no copy reads them
    if (m.digests) {
      const auto t0 = Profile::Clock::now();
      m.digests->wait();
      m.prof.hash_wait += Profile::since(t0);
    }
  } catch (...) {
    m.digests.reset();  // joins its threads, which may still read the caller's outputs
    for (Slot& s : m.slots) {
      const cudaError_t e = cudaStreamSynchronize(s.stream);
      if (e != cudaSuccess) m.healthy = false;  // a failed kernel leaves the context unusable
      s.busy = false;
    }
    m.unregister_inputs();
    (void)cudaGetLastError();
    throw;
  }
  for (size_t i = 0; i < tasks.size(); ++i) {
    const MergeTask& t = tasks[i];
    for (unsigned k = 0; k < infos[i].k; ++k)
      if (!infos[i].sparse[k]) stats[i].kept[k] = infos[i].numel;  // as the CPU: unsparsified deltas are kept whole
    if (t.digest) {
      if (m.digests->rows_in(i) != infos[i].rows)
        throw Error(DELLA_CUDA_ERROR, "internal: output rows missing from the digest of a tensor of shape " +
                                          shape_text(t.shape));
      stats[i].has_digest = true;
      stats[i].digest = m.digests->digest(i);
    }
  }
  if (m.profiling) {
    const Profile& a = m.prof;
    const double total = Profile::since(run_start);
    const double gb_in = a.staged_bytes / 1e9, gb_out = a.out_bytes / 1e9;
    std::fprintf(stderr,
                 "della cuda profile: %zu tasks, %llu slabs, %.3f s: pinned alloc %.3f s, staging %.3f s (%.2f GB, "
                 "%.1f GB/s), inputs registered %.3f s (%.1f MB; unregistered %.3f s) and copied from there %.1f MB, "
                 "enqueue %.3f s, waiting for the GPU %.3f s, copy out %.3f s (%.2f GB, %.1f GB/s), "
                 "handing outputs to the hash threads %.3f s, waiting for them at the end %.3f s, other %.3f s; "
                 "on the streams, summed over slabs: upload %.3f s, kernels %.3f s, download %.3f s\n",
                 tasks.size(), static_cast<unsigned long long>(a.slabs), total, a.pinned_alloc, a.stage, gb_in,
                 a.stage > 0 ? gb_in / a.stage : 0.0, a.register_s, a.registered_bytes / 1e6, a.unregister_s,
                 a.direct_bytes / 1e6, a.enqueue, a.wait, a.copy_out, gb_out,
                 a.copy_out > 0 ? gb_out / a.copy_out : 0.0, a.hash, a.hash_wait,
                 total - a.pinned_alloc - a.stage - a.register_s - a.unregister_s - a.enqueue - a.wait - a.copy_out -
                     a.hash - a.hash_wait,
                 a.gpu_up,
                 a.gpu_kernels, a.gpu_down);
  }
}

uint64_t device_workspace_bytes(const MergeTask& t, const Options& options) {
  const TaskInfo ti = task_info(t, options);
  const uint64_t stats = align_up(stats_words(ti.k) * 8);
  return stats + align_up(state_bytes(ti)) + slab_work_bytes(ti, ti.rows);
}

void run_device_task(const MergeTask& t, void* workspace, uint64_t workspace_bytes, const Options& options,
                     cudaStream_t stream) {
  validate_task(t);
  const TaskInfo ti = task_info(t, options);
  for (const ExpertInput& e : t.experts)
    if (e.shape != t.shape) throw std::invalid_argument("run_device_task: experts must have the base's shape");
  if (workspace_bytes < device_workspace_bytes(t, options)) throw std::invalid_argument("run_device_task: workspace too small");
  if (ti.numel == 0) return;
  char* w = static_cast<char*>(workspace);
  const uint64_t stats = align_up(stats_words(ti.k) * 8);
  SlabParams p;
  fill_params(t, ti, p);
  p.base = t.linear ? nullptr : t.base;
  for (unsigned k = 0; k < ti.k; ++k) p.ex[k].data = t.experts[k].data;
  p.out = t.out;
  p.stats = reinterpret_cast<unsigned long long*>(w);
  p.rows = ti.rows;
  p.row0 = 0;
  p.state = state_layout(ti, w + stats);
  char* scratch = w + stats + align_up(state_bytes(ti));
  const uint64_t scratch_bytes = slab_scratch_bytes(ti, ti.rows);
  check(cudaMemsetAsync(w, 0, stats_words(ti.k) * 8, stream), "cudaMemsetAsync");
  enqueue_slab(t, ti, p, single_slab_passes(ti), scratch, scratch + scratch_bytes,
               slab_work_bytes(ti, ti.rows) - scratch_bytes, stream);
}

}  // namespace cuda
}  // namespace della
