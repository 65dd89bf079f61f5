#include "map_guard.h"

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

Slot slots[kMapGuardSlots];
struct sigaction previous;
uintptr_t page_size = 4096;
bool installed = false;
std::once_flag install_once;

void pass_on(int sig, siginfo_t* info, void* context) {
  if ((previous.sa_flags & SA_SIGINFO) != 0 && previous.sa_sigaction != nullptr) {
    previous.sa_sigaction(sig, info, context);
    return;
  }
  if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN && previous.sa_handler != nullptr) {
    previous.sa_handler(sig);
    return;
  }
  // The default action: restore it and let the fault happen again (a fault re-runs
  // its instruction on return); a SIGBUS sent by kill() is raised again instead.
  signal(SIGBUS, SIG_DFL);
  if (info == nullptr || info->si_code <= 0) raise(SIGBUS);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t a = info != nullptr && info->si_code > 0 ? reinterpret_cast<uintptr_t>(info->si_addr) : 0;
  if (a != 0) {
    for (Slot& s : slots) {
      const uintptr_t b = s.begin.load(std::memory_order_acquire);
      const uintptr_t e = s.end.load(std::memory_order_acquire);
      if (b == 0 || a < b || a >= e) continue;
      // Zeros from the faulting page to the map's end: the file was cut short at or
      // before this page, so every later page would fault too (one signal instead of
      // one per page). mmap is a plain system call on Linux, safe here in practice.
      const uintptr_t page = a & ~(page_size - 1);
      void* p = mmap(reinterpret_cast<void*>(page), e - page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
      if (p == MAP_FAILED) break;
      s.faulted.store(true, std::memory_order_release);
      return;
    }
  }
  pass_on(sig, info, context);
}

void install() {
  const long p = sysconf(_SC_PAGESIZE);
  if (p > 0) page_size = static_cast<uintptr_t>(p);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  installed = sigaction(SIGBUS, &sa, &previous) == 0;
}

}  // namespace

int guard_map(void* addr, size_t size) {
  if (addr == nullptr || size == 0) return -1;
  std::call_once(install_once, install);
  if (!installed) return -1;
  const uintptr_t b = reinterpret_cast<uintptr_t>(addr);
  const uintptr_t e = b + (size + page_size - 1) / page_size * page_size;
  for (int i = 0; i < kMapGuardSlots; i++) {
    bool idle = false;
    if (!slots[i].used.compare_exchange_strong(idle, true, std::memory_order_acq_rel)) continue;
    slots[i].faulted.store(false, std::memory_order_relaxed);
    slots[i].begin.store(b, std::memory_order_release);
    slots[i].end.store(e, std::memory_order_release);
    return i;
  }
  return -1;
}

bool map_faulted(int slot) {
  return slot >= 0 && slot < kMapGuardSlots && slots[slot].faulted.load(std::memory_order_acquire);
}

void unguard_map(int slot) {
  if (slot < 0 || slot >= kMapGuardSlots) return;
  slots[slot].end.store(0, std::memory_order_release);
  slots[slot].begin.store(0, std::memory_order_release);
  slots[slot].used.store(false, std::memory_order_release);
}

}  // namespace della_io
