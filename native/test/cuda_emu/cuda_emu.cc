// The emulated CUDA device (cuda_runtime.h here): fibers for a block's threads, the
// barriers between them, and the runtime calls the backend makes.
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace della_emu {
namespace {

// ---------------------------------------------------------------- errors

std::atomic<int> g_last{cudaSuccess};    // cleared by cudaGetLastError
std::atomic<int> g_sticky{cudaSuccess};  // a failed kernel: the context is unusable

cudaError_t fail(cudaError_t e) {
  g_last.store(e);
  return e;
}
cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky.load()); }

// ---------------------------------------------------------------- fibers

constexpr size_t kStackBytes = 128 << 10;
constexpr size_t kGuardBytes = 4096;

#if defined(__x86_64__)
// Saves the callee-saved registers, the x87 control word and MXCSR on the current stack,
// stores its pointer in *save and continues on the stack `to` (System V x86-64).
extern "C" void della_emu_switch(void** save, void* to);
extern "C" void della_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl della_emu_switch
  .hidden della_emu_switch
  .type della_emu_switch, @function
della_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  fnstcw (%rsp)
  stmxcsr 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size della_emu_switch, .-della_emu_switch
  .p2align 4
  .globl della_emu_fiber_start
  .hidden della_emu_fiber_start
  .type della_emu_fiber_start, @function
della_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size della_emu_fiber_start, .-della_emu_fiber_start
)");
#endif

enum State : uint8_t { kReady, kBlockWait, kWarpWait, kDone };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = kReady;
  uint32_t collectives = 0;  // block collectives entered
  ThreadPos pos;
};

struct Warp {
  unsigned waiting = 0, want = 0;
  uint64_t gen = 0;
  uint32_t slot[2][32];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Fiber* cur = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  unsigned char* smem = nullptr;
  const std::function<void()>* body = nullptr;
  uint32_t collectives = 0;  // the most any thread has entered
  std::string problem;  // a barrier no thread can pass
};

thread_local Block* tl_block = nullptr;

// Fiber stacks of this host thread, mapped once, with a guard page below each.
struct Stacks {
  std::vector<char*> s;
  char* get(size_t i) {
    while (s.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) {
        std::fprintf(stderr, "della cuda emulation: cannot map a fiber stack\n");
        std::abort();
      }
      mprotect(p, kGuardBytes, PROT_NONE);
      s.push_back(static_cast<char*>(p));
    }
    return s[i];
  }
  ~Stacks() {
    for (char* p : s) munmap(p, kStackBytes + kGuardBytes);
  }
};
thread_local Stacks tl_stacks;

void to_scheduler(Fiber& f) {
#if defined(__x86_64__)
  della_emu_switch(&f.sp, tl_block->sched_sp);
#else
  swapcontext(&f.ctx, &tl_block->sched);
#endif
}

extern "C" void fiber_main(void*) {
  Block* b = tl_block;
  (*b->body)();
  b->cur->state = kDone;
  to_scheduler(*b->cur);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_entry() { fiber_main(nullptr); }
#endif

void init_fiber(Fiber& f, char* stack) {
  f.state = kReady;
  f.collectives = 0;
#if defined(__x86_64__)
  char* top = stack + kGuardBytes + kStackBytes;  // 16-byte aligned (page)
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
  sp[0] = 0x037f;                                              // x87 control word
  sp[1] = 0x1f80;                                              // MXCSR: round to nearest, no flush to zero
  sp[2] = sp[3] = 0;                                           // r15, r14
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);             // r13: called by fiber_start
  sp[5] = 0;                                                   // r12: its argument
  sp[6] = sp[7] = 0;                                           // rbx, rbp
  sp[8] = reinterpret_cast<uint64_t>(&della_emu_fiber_start);  // returned to
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack + kGuardBytes;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry, 0);
#endif
}

void resume(Block& b, Fiber& f) {
  b.cur = &f;
#if defined(__x86_64__)
  della_emu_switch(&b.sched_sp, f.sp);
#else
  swapcontext(&b.sched, &f.ctx);
#endif
}

std::string where(const Fiber& f) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", f.pos.block.x, f.pos.block.y, f.pos.block.z,
                f.pos.thread.x, f.pos.thread.y, f.pos.thread.z);
  return buf;
}

// Runs one block to the end. Warps run one at a time, each as far as it can: its lanes
// until each waits or ends, again whenever all of them meet at a warp exchange, and only
// then the next warp; when every thread waits at __syncthreads(), all go on. So warps
// drift as far apart as the barriers allow, and the order (first warp first, or last
// first, alternating) changes at every barrier: a missing barrier shows whichever side
// of it the code gets wrong. False when no barrier can be passed.
bool run_block(Block& b, uint64_t block_index, uint64_t launch_index) {
  const size_t n = b.fibers.size();
  for (size_t i = 0; i < n; ++i) init_fiber(b.fibers[i], tl_stacks.get(i));
  for (Warp& w : b.warps) w = Warp{};
  b.collectives = 0;
  const size_t warps = b.warps.size();
  for (uint64_t round = 0;; ++round) {
    const bool backwards = ((round + block_index + launch_index) & 1) != 0;
    for (size_t j = 0; j < warps; ++j) {
      const size_t wi = backwards ? warps - 1 - j : j;
      Warp& w = b.warps[wi];
      const size_t lanes = std::min<size_t>(32, n - wi * 32);
      for (;;) {
        for (size_t l = 0; l < lanes; ++l) {
          Fiber& f = b.fibers[wi * 32 + (backwards ? lanes - 1 - l : l)];
          if (f.state == kReady) resume(b, f);
        }
        if (w.waiting == 0 || (w.waiting & w.want) != w.want) break;
        for (int lane = 0; lane < 32; ++lane)
          if ((w.want >> lane) & 1u) b.fibers[wi * 32 + lane].state = kReady;
        w.waiting = 0;
        ++w.gen;
      }
    }
    size_t done = 0, at_block = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == kDone;
      at_block += f.state == kBlockWait;
    }
    if (done == n) return true;
    if (at_block + done == n) {
      for (Fiber& f : b.fibers)
        if (f.state == kBlockWait) f.state = kReady;
      continue;
    }
    // Nobody can go on: some threads wait at a warp exchange whose lanes are not all
    // there (they ended, or wait at __syncthreads()).
    std::string waits;
    int shown = 0;
    for (const Fiber& f : b.fibers) {
      if (f.state == kDone || shown >= 4) continue;
      waits += "\n  " + where(f) + (f.state == kBlockWait ? " waits at __syncthreads()" : " waits at a warp exchange");
      ++shown;
    }
    b.problem = "no thread can go on (" + std::to_string(done) + " of " + std::to_string(n) + " ended, " +
                std::to_string(at_block) + " at __syncthreads())" + waits;
    return false;
  }
}

// ---------------------------------------------------------------- device memory

struct Memory {
  std::mutex mu;
  std::map<uintptr_t, size_t> device, registered;
  std::map<uintptr_t, size_t> pinned;
  size_t used = 0;
  size_t capacity = 0;
};
Memory& mem() {
  static Memory m;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* e = std::getenv("DELLA_CUDA_EMU_MEMORY");  // bytes of emulated device memory
    m.capacity = e && *e ? std::strtoull(e, nullptr, 10) : (4ull << 30);
  });
  return m;
}

bool within(const std::map<uintptr_t, size_t>& m, const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = m.upper_bound(a);
  if (it == m.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

bool on_device(const void* p, size_t bytes) {
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  return within(m.device, p, bytes);
}

struct Launch {
  std::mutex mu;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
};
Launch& launches() {
  static Launch l;
  return l;
}

constexpr int kOptinSmem = 227 * 1024;  // an H100's shared memory a block may opt into
constexpr int kDefaultSmem = 48 * 1024;

}  // namespace

const ThreadPos& pos() { return tl_block->cur->pos; }
unsigned char* dynamic_smem() { return tl_block->smem; }

void collective_enter(void* storage, size_t bytes) {
  Block& b = *tl_block;
  if (++b.cur->collectives > b.collectives) {
    b.collectives = b.cur->collectives;
    std::memset(storage, 0xA7, bytes);
  }
}

void kernel_fault(const char* what) {
  const Fiber& f = *tl_block->cur;
  std::fprintf(stderr, "della cuda emulation: kernel fault in %s: %s\n", where(f).c_str(), what);
  std::abort();
}

void syncthreads() {
  Fiber& f = *tl_block->cur;
  f.state = kBlockWait;
  to_scheduler(f);
}

uint32_t warp_exchange(unsigned mask, uint32_t v, int src) {
  Block& b = *tl_block;
  Fiber& f = *b.cur;
  const uint64_t linear = f.pos.thread.x + static_cast<uint64_t>(f.pos.block_dim.x) *
                                               (f.pos.thread.y + static_cast<uint64_t>(f.pos.block_dim.y) * f.pos.thread.z);
  const int lane = static_cast<int>(linear & 31);
  if (mask == (1u << lane)) return v;
  Warp& w = b.warps[linear / 32];
  const uint64_t g = w.gen;
  w.slot[g & 1][lane] = v;
  if (w.waiting == 0) w.want = mask;
  if (w.want != mask || !((mask >> lane) & 1u)) {
    std::fprintf(stderr, "della cuda emulation: lanes of one warp exchange name different masks (%08x, %08x)\n", w.want,
                 mask);
    std::abort();
  }
  w.waiting |= 1u << lane;
  f.state = kWarpWait;
  to_scheduler(f);
  return w.slot[g & 1][src];
}

namespace {

// Every thread of every block of the grid, now, on the calling host thread.
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (sticky() != cudaSuccess) return;
  if (tl_block != nullptr) {
    std::fprintf(stderr, "della cuda emulation: a kernel launched from a kernel\n");
    std::abort();
  }
  Block b;
  b.fibers.resize(static_cast<size_t>(block.x) * block.y * block.z);
  b.warps.resize((b.fibers.size() + 31) / 32);
  b.body = &body;
  // Alternates the threads' order between launches too, so that a one-block kernel sees
  // both orders at each of its barriers.
  static std::atomic<uint64_t> launches_run{0};
  const uint64_t launch_index = launches_run.fetch_add(1);
  constexpr size_t kGuard = 64;  // bytes past the block's shared memory, checked after each block
  std::vector<unsigned char> shared(smem + 16 + kGuard);
  unsigned char* aligned = shared.data() + (16 - reinterpret_cast<uintptr_t>(shared.data()) % 16) % 16;
  b.smem = aligned;
  tl_block = &b;
  uint64_t index = 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx, ++index) {
        // Shared memory starts as garbage on the device: a fixed pattern here, so that a
        // read before any write gives a wrong answer rather than a lucky zero.
        std::memset(aligned, 0xA7, smem + kGuard);
        size_t i = 0;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx, ++i)
              b.fibers[i].pos = ThreadPos{dim3(tx, ty, tz), dim3(bx, by, bz), block, grid};
        bool ok = run_block(b, index, launch_index);
        for (size_t g = 0; ok && g < kGuard; ++g)
          if (aligned[smem + g] != 0xA7) {
            b.problem = "a write past the block's " + std::to_string(smem) + " bytes of dynamic shared memory";
            ok = false;
          }
        if (!ok) {
          tl_block = nullptr;
          std::fprintf(stderr, "della cuda emulation: kernel failed: %s\n", b.problem.c_str());
          g_sticky.store(cudaErrorLaunchFailure);
          return;
        }
      }
  tl_block = nullptr;
}

}  // namespace

void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s, std::function<void()> body) {
  if (sticky() != cudaSuccess) return;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  int allowed = kDefaultSmem;
  {
    Launch& l = launches();
    std::lock_guard<std::mutex> lock(l.mu);
    auto it = l.max_dynamic_smem.find(kernel);
    if (it != l.max_dynamic_smem.end()) allowed = std::max(allowed, it->second);
  }
  if (smem > static_cast<size_t>(allowed)) {
    fail(cudaErrorInvalidValue);
    return;
  }
  enqueue(s, [grid, block, smem, body = std::move(body)] { run_grid(grid, block, smem, body); });
}

cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (sticky() != cudaSuccess) return sticky();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kOptinSmem)
    return fail(cudaErrorInvalidValue);
  Launch& l = launches();
  std::lock_guard<std::mutex> lock(l.mu);
  l.max_dynamic_smem[func] = value;
  return cudaSuccess;
}

}  // namespace della_emu

using namespace della_emu;

// ---------------------------------------------------------------- runtime API

namespace {
// DELLA_CUDA_EMU_DEVICES=0: the runtime reports no device, as on a machine without one.
bool no_device() {
  const char* e = std::getenv("DELLA_CUDA_EMU_DEVICES");
  return e && std::strcmp(e, "0") == 0;
}

// DELLA_CUDA_EMU_DRIVER: "none" as on a machine without the NVIDIA driver (no
// libcuda.so.1), or the CUDA version the driver supports, e.g. 12040 (a driver older
// than the runtime's 13000 fails as a real one does); unset, a 13.0 driver.
int driver_version() {
  const char* e = std::getenv("DELLA_CUDA_EMU_DRIVER");
  if (!e || !*e) return 13000;
  if (std::strcmp(e, "none") == 0) return 0;
  return static_cast<int>(std::strtol(e, nullptr, 10));
}
bool driver_too_old() { return driver_version() < 13000; }
}  // namespace

// A stream's work waits in its queue until the host waits for it (drain).
struct CUstream_st {
  unsigned flags = 0;
  std::deque<std::function<void()>> queue;
};
struct CUevent_st {
  bool timing = true, recorded = false, reached = false;
  uint64_t generation = 0;  // of the latest record: an earlier record's marker does not count
  cudaStream_t stream = nullptr;
  std::chrono::steady_clock::time_point at;
};

namespace {
std::recursive_mutex g_streams_mu;
std::set<cudaStream_t> g_streams;

bool immediate_streams() {
  static const bool immediate = [] {
    const char* e = std::getenv("DELLA_CUDA_EMU_STREAMS");
    return e && std::strcmp(e, "immediate") == 0;
  }();
  return immediate;
}

// Runs the stream's queued work in order, all of it or until event e is reached.
void drain(cudaStream_t s, const CUevent_st* e = nullptr) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  if (s == nullptr) return;
  while (!s->queue.empty() && !(e && e->reached)) {
    std::function<void()> f = std::move(s->queue.front());
    s->queue.pop_front();
    f();
  }
}

// What frees memory waits for the whole device, as cudaFree does.
void drain_all() {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  for (cudaStream_t s : g_streams) drain(s);
}
}  // namespace

// The null stream runs its work at once.
void della_emu::enqueue(cudaStream_t s, std::function<void()> f) {
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  if (s == nullptr || immediate_streams()) {
    f();
    return;
  }
  s->queue.push_back(std::move(f));
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (driver_too_old()) {
    *count = 0;
    return fail(cudaErrorInsufficientDriver);
  }
  if (no_device()) {
    *count = 0;
    return fail(cudaErrorNoDevice);
  }
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (no_device() || device != 0) return fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "della-merge emulated CUDA device (CPU)");
  prop->totalGlobalMem = mem().capacity;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 4;
  prop->sharedMemPerBlockOptin = kOptinSmem;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (no_device() || device != 0) return fail(cudaErrorInvalidDevice);
  // DELLA_CUDA_EMU_OPEN_MS: the first call takes that long, as a real context's creation
  // does (about 0.3 s on an H100), so that tests can see what waits for it.
  static std::once_flag context;
  std::call_once(context, [] {
    const char* e = std::getenv("DELLA_CUDA_EMU_OPEN_MS");
    if (e && *e) std::this_thread::sleep_for(std::chrono::milliseconds(std::strtoul(e, nullptr, 10)));
  });
  return sticky();
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  if (attr == cudaDevAttrMultiProcessorCount) *value = 4;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = kOptinSmem;
  else return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  *free_bytes = m.capacity - m.used;
  *total_bytes = m.capacity;
  return sticky();
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = driver_version();
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const int s = g_sticky.load();
  if (s != cudaSuccess) return static_cast<cudaError_t>(s);
  return static_cast<cudaError_t>(g_last.exchange(cudaSuccess));
}
cudaError_t cudaPeekAtLastError() {
  const int s = g_sticky.load();
  return static_cast<cudaError_t>(s != cudaSuccess ? s : g_last.load());
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorDevicesUnavailable: return "cudaErrorDevicesUnavailable";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorHostMemoryAlreadyRegistered: return "cudaErrorHostMemoryAlreadyRegistered";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorCompatNotSupportedOnDevice: return "cudaErrorCompatNotSupportedOnDevice";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (emulated: DELLA_CUDA_EMU_DEVICES=0)";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated kernel: see stderr)";
    default: return cudaGetErrorName(e);
  }
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = nullptr;
  if (sticky() != cudaSuccess) return sticky();
  Memory& m = mem();
  const size_t size = std::max<size_t>(256, (bytes + 255) / 256 * 256);
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (size > m.capacity - m.used) return fail(cudaErrorMemoryAllocation);
    m.used += size;
  }
  // Untouched pages cost nothing, as a budget of device memory that a small merge leaves
  // mostly unused should.
  void* q = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  std::lock_guard<std::mutex> lock(m.mu);
  if (q == MAP_FAILED) {
    m.used -= size;
    return fail(cudaErrorMemoryAllocation);
  }
  m.device[reinterpret_cast<uintptr_t>(q)] = size;
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  drain_all();
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = m.device.find(reinterpret_cast<uintptr_t>(p));
  if (it == m.device.end()) return fail(cudaErrorInvalidValue);
  munmap(p, it->second);
  m.used -= it->second;
  m.device.erase(it);
  return cudaSuccess;
}

// DELLA_CUDA_EMU_CUT=PATH:BYTES truncates PATH to BYTES at the first cudaMallocHost, which
// the backend calls as its first slab is staged: an input cut short while the plugin's
// host threads are about to read its map, at a point a test can rely on.
void cut_file_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* e = std::getenv("DELLA_CUDA_EMU_CUT");
    if (e == nullptr) return;
    const std::string spec(e);
    const size_t colon = spec.rfind(':');
    if (colon == std::string::npos || truncate(spec.substr(0, colon).c_str(), std::strtoll(spec.c_str() + colon + 1, nullptr, 10)) != 0)
      std::fprintf(stderr, "emulated CUDA device: DELLA_CUDA_EMU_CUT=%s: cannot truncate\n", e);
  });
}

cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = nullptr;
  if (sticky() != cudaSuccess) return sticky();
  cut_file_once();
  void* q = std::aligned_alloc(4096, std::max<size_t>(4096, (bytes + 4095) / 4096 * 4096));
  if (!q) return fail(cudaErrorMemoryAllocation);
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  m.pinned[reinterpret_cast<uintptr_t>(q)] = bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* p) {
  if (p == nullptr) return cudaSuccess;
  drain_all();
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = m.pinned.find(reinterpret_cast<uintptr_t>(p));
  if (it == m.pinned.end()) return fail(cudaErrorInvalidValue);
  m.pinned.erase(it);
  std::free(p);
  return cudaSuccess;
}

// As CUDA: a page registered twice is refused. DELLA_CUDA_EMU_REGISTER=refuse refuses
// read-only registration, as a device or driver without it does.
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned flags) {
  if (sticky() != cudaSuccess) return sticky();
  if (p == nullptr || bytes == 0) return fail(cudaErrorInvalidValue);
  const char* refuse = std::getenv("DELLA_CUDA_EMU_REGISTER");
  if ((flags & cudaHostRegisterReadOnly) && refuse && std::strcmp(refuse, "refuse") == 0) return fail(cudaErrorNotSupported);
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  const uintptr_t page = 4096, a = reinterpret_cast<uintptr_t>(p) / page * page;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + bytes + page - 1) / page * page;
  for (const auto& [q, len] : m.registered) {
    const uintptr_t qa = q / page * page, qb = (q + len + page - 1) / page * page;
    if (qa < b && a < qb) return fail(cudaErrorHostMemoryAlreadyRegistered);
  }
  m.registered[reinterpret_cast<uintptr_t>(p)] = bytes;
  return cudaSuccess;
}

cudaError_t cudaHostUnregister(void* p) {
  drain_all();
  Memory& m = mem();
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.registered.erase(reinterpret_cast<uintptr_t>(p)) == 0) return fail(cudaErrorInvalidValue);
  return cudaSuccess;
}

// Copies check that each side is where the kind says: a host pointer handed to the
// device as device memory (or the reverse) is a bug the GPU would fault on.
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  if (sticky() != cudaSuccess) return sticky();
  if (bytes == 0) return cudaSuccess;
  const bool dst_dev = on_device(dst, bytes), src_dev = on_device(src, bytes);
  bool ok = true;
  switch (kind) {
    case cudaMemcpyHostToDevice: ok = dst_dev && !on_device(src, 1); break;
    case cudaMemcpyDeviceToHost: ok = src_dev && !on_device(dst, 1); break;
    case cudaMemcpyDeviceToDevice: ok = dst_dev && src_dev; break;
    case cudaMemcpyHostToHost: ok = !on_device(dst, 1) && !on_device(src, 1); break;
    default: break;
  }
  if (!ok) {
    std::fprintf(stderr, "della cuda emulation: cudaMemcpy kind %d with %s destination and %s source (%zu bytes)\n", kind,
                 dst_dev ? "a device" : "a host (or out of bounds)", src_dev ? "a device" : "a host (or out of bounds)",
                 bytes);
    return fail(cudaErrorInvalidValue);
  }
  enqueue(s, [dst, src, bytes] { std::memmove(dst, src, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  if (sticky() != cudaSuccess) return sticky();
  if (bytes == 0) return cudaSuccess;
  if (!on_device(p, bytes)) {
    std::fprintf(stderr, "della cuda emulation: cudaMemset of %zu bytes outside device memory\n", bytes);
    return fail(cudaErrorInvalidValue);
  }
  enqueue(s, [p, value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) { return cudaMemsetAsync(p, value, bytes, nullptr); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  if (sticky() != cudaSuccess) return sticky();
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  *s = new CUstream_st{flags, {}};
  g_streams.insert(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  drain(s);  // its work finishes first, as on the device
  g_streams.erase(s);
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  drain(s);
  return sticky();
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  if (sticky() != cudaSuccess) return sticky();
  *e = new CUevent_st;
  (*e)->timing = (flags & cudaEventDisableTiming) == 0;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  if (e->recorded && !e->reached) drain(e->stream, e);  // its marker must not outlive it
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (sticky() != cudaSuccess) return sticky();
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::recursive_mutex> lock(g_streams_mu);
  e->recorded = true;
  e->reached = false;
  e->stream = s;
  const uint64_t g = ++e->generation;
  enqueue(s, [e, g] {
    if (e->generation != g) return;
    e->reached = true;
    e->at = std::chrono::steady_clock::now();
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  if (e->recorded) drain(e->stream, e);
  return sticky();
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  if (!a || !b || !a->timing || !b->timing || !a->recorded || !b->recorded)
    return fail(cudaErrorInvalidResourceHandle);
  if (!a->reached || !b->reached) return fail(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}
