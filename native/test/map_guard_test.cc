// MapGuard: a guarded map whose file is cut short reads zeros past the new end and is
// marked; the bytes before the cut are the file's; maps not guarded (never, or no
// longer) still fault as before, to the handler that was there before or to the
// default action (a child killed by SIGBUS). Runs in the current directory.
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../src/io/map_guard.h"

namespace {

int failures = 0;
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

uint8_t pattern(size_t i) { return static_cast<uint8_t>(i * 7 + 1); }  // never 0

// A file of `size` bytes of pattern(), mapped read-only and shared, as MappedFile maps.
struct TestMap {
  std::string path;
  int fd = -1;
  uint8_t* p = nullptr;
  size_t size = 0;
  TestMap(const std::string& name, size_t n) : path(name), size(n) {
    fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    std::vector<uint8_t> bytes(n);
    for (size_t i = 0; i < n; i++) bytes[i] = pattern(i);
    if (fd < 0 || write(fd, bytes.data(), n) != static_cast<ssize_t>(n)) {
      std::perror(path.c_str());
      std::exit(1);
    }
    p = static_cast<uint8_t*>(mmap(nullptr, n, PROT_READ, MAP_SHARED, fd, 0));
    if (p == MAP_FAILED) {
      std::perror("mmap");
      std::exit(1);
    }
  }
  void cut(size_t n) { check(ftruncate(fd, static_cast<off_t>(n)) == 0, path + ": ftruncate"); }
  ~TestMap() {
    munmap(p, size);
    close(fd);
    unlink(path.c_str());
  }
};

// Sums every byte, the way a kernel reads a tensor.
uint64_t read_all(const uint8_t* p, size_t n) {
  uint64_t s = 0;
  for (size_t i = 0; i < n; i++) s += static_cast<const volatile uint8_t*>(p)[i];
  return s;
}

// Runs `body` in a child process (its return value the exit code) and gives its wait
// status. The child's files are removed here: one killed by a signal cannot.
template <typename Body>
int in_child(Body body, const std::vector<std::string>& files) {
  const pid_t pid = fork();
  if (pid == 0) _exit(body());
  int status = 0;
  waitpid(pid, &status, 0);
  for (const std::string& f : files) unlink(f.c_str());
  return status;
}

// In a child: maps are guarded (the handler replaces SIG_DFL), then an unguarded map cut
// short is read. The child must die of SIGBUS, as without the guard.
void unguarded_fault_still_kills(bool guard_then_unguard) {
  const std::string name = guard_then_unguard ? "map_guard_unguarded_b" : "map_guard_unguarded_a";
  const int status = in_child(
      [&] {
        signal(SIGBUS, SIG_DFL);  // the default action (a sanitizer's runtime has its own handler)
        TestMap other(name + ".other", 3 * kPage);
        della_io::guard_map(other.p, other.size);  // installs the handler
        TestMap m(name, 3 * kPage);
        if (guard_then_unguard) della_io::unguard_map(della_io::guard_map(m.p, m.size));
        m.cut(kPage);
        read_all(m.p, m.size);
        return 0;  // not reached when SIGBUS kills
      },
      {name, name + ".other"});
  check(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS,
        std::string("an ") + (guard_then_unguard ? "unguarded" : "never guarded") +
            " map cut short kills with SIGBUS (status " + std::to_string(status) + ")");
}

sigjmp_buf escape;
volatile sig_atomic_t earlier_handler_ran = 0;
volatile sig_atomic_t later_handler_ran = 0;

void earlier_handler(int, siginfo_t*, void*) {
  earlier_handler_ran = 1;
  siglongjmp(escape, 1);
}

void later_handler(int) {
  later_handler_ran = 1;
  siglongjmp(escape, 1);
}

// Reads a map (never guarded) of a file cut short; whether the fault reached a test
// handler, which jumps back here.
bool unguarded_read_faults(const std::string& name) {
  TestMap m(name, 4 * kPage);
  m.cut(kPage);
  if (sigsetjmp(escape, 1) != 0) return true;
  read_all(m.p, m.size);
  return false;
}

// In a child: with SIGBUS ignored before the guard, a SIGBUS sent by kill() is still
// ignored (as SA_SIGINFO with SIG_IGN too), and the guard still works after it.
void sent_sigbus_still_ignored(bool siginfo) {
  const std::string name = siginfo ? "map_guard_ignored_b" : "map_guard_ignored_a";
  const int status = in_child(
      [&] {
        struct sigaction ign {};
        ign.sa_handler = SIG_IGN;
        ign.sa_flags = siginfo ? SA_SIGINFO : 0;
        sigemptyset(&ign.sa_mask);
        sigaction(SIGBUS, &ign, nullptr);
        TestMap m(name, 3 * kPage);
        della_io::guard_map(m.p, m.size);
        kill(getpid(), SIGBUS);
        m.cut(kPage);
        return read_all(m.p, m.size) == read_all(m.p, kPage) ? 0 : 3;
      },
      {name});
  check(WIFEXITED(status) && WEXITSTATUS(status) == 0,
        std::string("a SIGBUS from kill() stays ignored") + (siginfo ? " (SA_SIGINFO)" : "") + " and the guard works after it (status " +
            std::to_string(status) + ")");
}

}  // namespace

int main() {
  // Before this process installs the guard: the default action is kept for others.
  unguarded_fault_still_kills(false);
  unguarded_fault_still_kills(true);

  sent_sigbus_still_ignored(false);
  sent_sigbus_still_ignored(true);

  // A handler installed before the guard still gets the faults that are not the guard's.
  struct sigaction sa {};
  sa.sa_sigaction = earlier_handler;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, nullptr);

  {
    // Cut short mid-page: that page reads zeros past the end without a fault (the
    // kernel's doing); the pages after it fault and read zeros (the guard's).
    const size_t n = 8 * kPage + 123, cut = 2 * kPage + 100;
    TestMap m("map_guard_cut", n);
    TestMap steady("map_guard_steady", 2 * kPage);
    const int slot = della_io::guard_map(m.p, m.size);
    const int steady_slot = della_io::guard_map(steady.p, steady.size);
    check(slot >= 0 && steady_slot >= 0, "guard_map gives slots");
    check(!della_io::map_faulted(slot), "a new map has not faulted");
    check(read_all(m.p, m.size) > 0 && !della_io::map_faulted(slot), "reading a whole file does not fault");
    m.cut(cut);
    madvise(m.p, m.size, MADV_DONTNEED);  // drop cached pages, so reads go to the file
    // Two threads read it at once: both may fault on the same page.
    std::vector<std::thread> readers;
    std::vector<uint64_t> sums(2);
    for (int t = 0; t < 2; t++) readers.emplace_back([&, t] { sums[t] = read_all(m.p, m.size); });
    for (std::thread& t : readers) t.join();
    uint64_t want = 0;
    for (size_t i = 0; i < cut; i++) want += pattern(i);
    check(sums[0] == want && sums[1] == want, "bytes before the cut are the file's, after it zeros");
    bool zeros = true, kept = true;
    for (size_t i = 0; i < cut; i++) kept = kept && m.p[i] == pattern(i);
    for (size_t i = cut; i < m.size; i++) zeros = zeros && m.p[i] == 0;
    check(kept && zeros, "byte by byte: the file's up to the cut, zeros after");
    check(della_io::map_faulted(slot), "the cut map is marked faulted");
    check(!della_io::map_faulted(steady_slot) && read_all(steady.p, steady.size) > 0 && !della_io::map_faulted(steady_slot),
          "another guarded map is not marked");
    check(earlier_handler_ran == 0, "the guard's faults do not reach the earlier handler");
    della_io::unguard_map(slot);
    della_io::unguard_map(steady_slot);
    check(!della_io::map_faulted(-1), "slot -1 never faulted");
  }

  {
    // An unguarded map cut short goes to the earlier handler.
    check(unguarded_read_faults("map_guard_chain"), "reading an unguarded map past its file's end faults");
    check(earlier_handler_ran == 1, "a fault outside guarded maps reaches the earlier handler");
  }

  {
    // A handler installed after the guard (as Node's process.on('SIGBUS') does) takes
    // its faults until the next registration puts the guard back in front of it, with
    // the later handler as the one that gets faults outside the guarded maps.
    signal(SIGBUS, later_handler);
    TestMap m("map_guard_later", 4 * kPage);
    const int slot = della_io::guard_map(m.p, m.size);
    m.cut(kPage);
    if (sigsetjmp(escape, 1) == 0) read_all(m.p, m.size);
    check(later_handler_ran == 0 && della_io::map_faulted(slot), "a registration puts the guard in front of a later handler");
    della_io::unguard_map(slot);
    check(unguarded_read_faults("map_guard_later_other"), "reading an unguarded map past its file's end faults");
    check(later_handler_ran == 1, "faults outside guarded maps then go to the later handler");
  }

  {
    // A handler installed after a map was registered: guard_in_front alone (what the
    // addon calls before each batch reads its maps) puts the guard back in front.
    TestMap m("map_guard_front", 4 * kPage);
    const int slot = della_io::guard_map(m.p, m.size);
    later_handler_ran = 0;
    signal(SIGBUS, later_handler);
    m.cut(kPage);
    check(della_io::guard_in_front(), "guard_in_front succeeds");
    if (sigsetjmp(escape, 1) == 0) read_all(m.p, m.size);
    check(later_handler_ran == 0 && della_io::map_faulted(slot),
          "guard_in_front puts the guard in front of a handler installed after the map was registered");
    della_io::unguard_map(slot);
  }

  {
    // A full table leaves further maps unguarded (-1) until a slot is free again.
    std::vector<int> taken;
    for (int i = 0; i < della_io::kMapGuardSlots; i++) {
      const int s = della_io::guard_map(reinterpret_cast<void*>(uintptr_t{1} << 40), kPage);
      if (s < 0) break;
      taken.push_back(s);
    }
    check(taken.size() == static_cast<size_t>(della_io::kMapGuardSlots), "every slot can be taken");
    check(della_io::guard_map(reinterpret_cast<void*>(uintptr_t{1} << 40), kPage) == -1, "a full table gives -1");
    della_io::unguard_map(taken.back());
    check(della_io::guard_map(reinterpret_cast<void*>(uintptr_t{1} << 40), kPage) == taken.back(), "a freed slot is reused");
    for (int s : taken) della_io::unguard_map(s);
    check(della_io::guard_map(nullptr, kPage) == -1 && della_io::guard_map(reinterpret_cast<void*>(kPage), 0) == -1,
          "no map, or an empty one, is not guarded");
  }

  if (failures == 0) std::printf("map guard: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
