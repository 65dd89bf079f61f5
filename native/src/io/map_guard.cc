#include "map_guard.h"

#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <mutex>

namespace della_io {

namespace {

// A slot is taken by CAS on `used`; the handler reads begin and end, which are zero
// while a slot is being filled or emptied (end is written last and cleared first).
struct Slot {
  std::atomic<bool> used{false};
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<bool> faulted{false};
};

// Slots come in chunks allocated as needed (never freed), so that the handler can read
// them without locks and a process holds one chunk unless it maps thousands of files.
// A map lives until its last view is collected, so a process may hold many; the
// kernel's default limit on a process's mappings (vm.max_map_count, 65530) is below the
// table's size.
constexpr int kChunk = 4096;
constexpr int kChunks = kMapGuardSlots / kChunk;
std::atomic<Slot*> chunks[kChunks];
std::mutex chunks_mutex;
// Where guard_map starts looking for a free slot: after the last one taken, or at the
// lowest one freed since (only a hint: a stale one costs a longer search).
std::atomic<int> free_hint{0};

// The action the guard replaced, for faults that are not its own. Two copies and an
// index, so that re-installing (see guard_map) never changes one the handler may read.
struct sigaction previous[2];
std::atomic<int> current_previous{0};
uintptr_t page_size = 4096;
std::once_flag page_size_once;

void pass_on(int sig, siginfo_t* info, void* context) {
  const struct sigaction& p = previous[current_previous.load(std::memory_order_acquire)];
  // sa_handler and sa_sigaction share their storage: SIG_DFL and SIG_IGN read the same
  // through either, with SA_SIGINFO or without.
  const bool is_default = p.sa_handler == SIG_DFL, ignored = p.sa_handler == SIG_IGN;
  if (!is_default && !ignored) {
    if ((p.sa_flags & SA_SIGINFO) != 0) {
      p.sa_sigaction(sig, info, context);
    } else {
      p.sa_handler(sig);
    }
    return;
  }
  const bool sent = info == nullptr || info->si_code <= 0;  // by kill() or raise(), not a fault
  if (sent && ignored) return;
  // The default action: a fault that is not the guard's ends the process as it would
  // have without it. Raised, not left to happen again: some faults do not repeat.
  signal(SIGBUS, SIG_DFL);
  raise(SIGBUS);  // pending while this handler runs; delivered on return
}

// The handler: zeros over the rest of a registered map read past its file's end.
void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const uintptr_t a = info != nullptr && info->si_code > 0 ? reinterpret_cast<uintptr_t>(info->si_addr) : 0;
  for (int c = 0; a != 0 && c < kChunks; c++) {
    Slot* chunk = chunks[c].load(std::memory_order_acquire);
    if (chunk == nullptr) continue;
    for (int i = 0; i < kChunk; i++) {
      Slot& s = chunk[i];
      const uintptr_t b = s.begin.load(std::memory_order_acquire);
      const uintptr_t e = s.end.load(std::memory_order_acquire);
      // begin again: a slot emptied and refilled between the two loads is skipped, never
      // read as one map's begin with another's end.
      if (b == 0 || a < b || a >= e || s.begin.load(std::memory_order_acquire) != b) continue;
      // Zeros from the faulting page to the map's end: the file was cut short at or
      // before this page, so every later page would fault too (one signal instead of
      // one per page). mmap is a plain system call on Linux, safe here in practice.
      const uintptr_t page = a & ~(page_size - 1);
      void* p = mmap(reinterpret_cast<void*>(page), e - page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
      if (p == MAP_FAILED) break;
      s.faulted.store(true, std::memory_order_release);
      errno = saved_errno;
      return;
    }
  }
  errno = saved_errno;
  pass_on(sig, info, context);
}

bool is_ours(const struct sigaction& a) {
  return (a.sa_flags & SA_SIGINFO) != 0 && a.sa_sigaction == on_sigbus;
}

}  // namespace

// Installs the handler unless it is the one in place. A handler installed after it
// (Node's process.on('SIGBUS') does, through libuv) would have taken the guard's faults
// and never passed them on; it is kept as the one to pass other faults to.
bool guard_in_front() {
  static std::mutex install_mutex;
  std::lock_guard<std::mutex> lock(install_mutex);
  struct sigaction now {};
  if (sigaction(SIGBUS, nullptr, &now) != 0) return false;
  if (is_ours(now)) return true;
  const int next = 1 - current_previous.load(std::memory_order_relaxed);
  previous[next] = now;
  current_previous.store(next, std::memory_order_release);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  return sigaction(SIGBUS, &sa, nullptr) == 0;
}

namespace {

Slot* chunk_at(int c) {
  Slot* chunk = chunks[c].load(std::memory_order_acquire);
  if (chunk != nullptr) return chunk;
  std::lock_guard<std::mutex> lock(chunks_mutex);
  chunk = chunks[c].load(std::memory_order_acquire);
  if (chunk == nullptr) {
    chunk = new Slot[kChunk];
    chunks[c].store(chunk, std::memory_order_release);
  }
  return chunk;
}

}  // namespace

int guard_map(void* addr, size_t size) {
  if (addr == nullptr || size == 0) return -1;
  std::call_once(page_size_once, [] {
    const long p = sysconf(_SC_PAGESIZE);
    if (p > 0) page_size = static_cast<uintptr_t>(p);
  });
  if (!guard_in_front()) return -1;
  const uintptr_t b = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t e = b + (size + page_size - 1) / page_size * page_size;
  const int start = free_hint.load(std::memory_order_relaxed);
  for (int k = 0; k < kMapGuardSlots; k++) {
    const int slot = (start + k) % kMapGuardSlots;
    Slot& s = chunk_at(slot / kChunk)[slot % kChunk];
    bool idle = false;
    if (!s.used.compare_exchange_strong(idle, true, std::memory_order_acq_rel)) continue;
    s.faulted.store(false, std::memory_order_relaxed);
    s.begin.store(b, std::memory_order_release);
    s.end.store(e, std::memory_order_release);
    free_hint.store((slot + 1) % kMapGuardSlots, std::memory_order_relaxed);
    return slot;
  }
  return -1;
}

namespace {

Slot* slot_at(int slot) {
  if (slot < 0 || slot >= kMapGuardSlots) return nullptr;
  Slot* chunk = chunks[slot / kChunk].load(std::memory_order_acquire);
  return chunk == nullptr ? nullptr : &chunk[slot % kChunk];
}

}  // namespace

bool map_faulted(int slot) {
  Slot* s = slot_at(slot);
  return s != nullptr && s->faulted.load(std::memory_order_acquire);
}

void unguard_map(int slot) {
  Slot* s = slot_at(slot);
  if (s == nullptr) return;
  s->end.store(0, std::memory_order_release);
  s->begin.store(0, std::memory_order_release);
  s->used.store(false, std::memory_order_release);
  int hint = free_hint.load(std::memory_order_relaxed);
  while (slot < hint && !free_hint.compare_exchange_weak(hint, slot, std::memory_order_relaxed)) {
  }
}

}  // namespace della_io
