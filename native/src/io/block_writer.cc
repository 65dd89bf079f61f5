#include "block_writer.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <system_error>

namespace della_io {
namespace {

constexpr size_t kMaxSyscall = size_t{1} << 30;  // Linux writes at most ~2 GiB per call
constexpr size_t kBounce = size_t{1} << 20;

uint8_t* aligned_block(size_t bytes) {
  void* p = std::aligned_alloc(BlockWriter::kBlock, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<uint8_t*>(p);
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % BlockWriter::kBlock == 0; }

// O_DIRECT only where it is a plain path to a local block device: ext2/3/4, XFS, Btrfs,
// F2FS. Elsewhere it can be slower than the page cache (each write a synchronous round
// trip on NFS and other network file systems) or mean nothing (tmpfs).
bool local_block_fs(int fd) {
#ifdef __linux__
  struct statfs sf;
  if (fstatfs(fd, &sf) != 0) return false;
  switch (static_cast<unsigned long>(sf.f_type)) {
    case 0xEF53UL:      // ext2, ext3, ext4
    case 0x58465342UL:  // XFS
    case 0x9123683EUL:  // Btrfs
    case 0xF2F52010UL:  // F2FS
      return true;
    default:
      return false;
  }
#else
  (void)fd;
  return false;
#endif
}

}  // namespace

BlockWriter::BlockWriter(int fd, int direct_fd, uint64_t file_size, std::string path)
    : fd_(fd), direct_fd_(direct_fd), size_(file_size), path_(std::move(path)) {}

BlockWriter::~BlockWriter() {
  if (direct_fd_ >= 0) close(direct_fd_);
  if (fd_ >= 0) close(fd_);
}

void BlockWriter::fail(const char* what, uint64_t offset, size_t length, int err) const {
  throw std::runtime_error(path_ + ": " + what + " " + std::to_string(length) + " bytes at offset " +
                           std::to_string(offset) + ": " + strerror(err));
}

void BlockWriter::write(uint64_t offset, const uint8_t* src, size_t length) {
  if (offset > size_ || length > size_ - offset)
    throw std::out_of_range(path_ + ": write of " + std::to_string(length) + " bytes at offset " +
                            std::to_string(offset) + " is outside the file of " + std::to_string(size_) + " bytes");
  if (length == 0) return;
  if (!direct()) return write_buffered(offset, src, length);
  const uint64_t end = offset + length;
  const uint64_t a = (offset + kBlock - 1) / kBlock * kBlock, b = end / kBlock * kBlock;
  if (a >= b) return add_partial(offset, src, length);  // no whole block inside
  if (offset < a) add_partial(offset, src, a - offset);
  write_direct(a, src + (a - offset), b - a);
  if (b < end) add_partial(b, src + (b - offset), end - b);
}

void BlockWriter::write_buffered(uint64_t offset, const uint8_t* src, size_t length) {
  while (length > 0) {
    const ssize_t n = pwrite(fd_, src, std::min(length, kMaxSyscall), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("cannot write", offset, length, n < 0 ? errno : EIO);
    src += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<size_t>(n);
  }
}

// Whole blocks at a block-aligned offset. Memory not aligned like the file goes through
// a bounce buffer; a file system that turns O_DIRECT down at write time (EINVAL) gets
// this write and every later one through the page cache instead.
void BlockWriter::write_direct(uint64_t offset, const uint8_t* src, size_t length) {
  thread_local std::unique_ptr<uint8_t, void (*)(void*)> bounce{nullptr, std::free};
  while (length > 0) {
    if (!direct_ok_.load()) return write_buffered(offset, src, length);
    const uint8_t* from = src;
    size_t chunk = std::min(length, kMaxSyscall);
    if (!aligned(src)) {
      if (!bounce) bounce.reset(aligned_block(kBounce));
      chunk = std::min(length, kBounce);
      memcpy(bounce.get(), src, chunk);
      from = bounce.get();
    }
    const ssize_t n = pwrite(direct_fd_, from, chunk, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL) {
      direct_ok_.store(false);
      continue;
    }
    if (n <= 0) fail("cannot write", offset, chunk, n < 0 ? errno : EIO);
    if (static_cast<size_t>(n) % kBlock != 0) {  // a short write off the block grid
      direct_ok_.store(false);
    }
    src += n;
    offset += static_cast<uint64_t>(n);
    length -= static_cast<size_t>(n);
  }
}

void BlockWriter::add_partial(uint64_t offset, const uint8_t* src, size_t length) {
  while (length > 0) {
    const uint64_t block = offset / kBlock, start = block * kBlock;
    const size_t block_len = static_cast<size_t>(std::min<uint64_t>(kBlock, size_ - start));
    const size_t n = std::min<size_t>(length, start + kBlock - offset);
    std::unique_ptr<uint8_t, void (*)(void*)> full{nullptr, std::free};
    {
      std::lock_guard<std::mutex> lock(mu_);
      Partial& p = partial_[block];
      if (!p.data) p.data = std::unique_ptr<uint8_t, void (*)(void*)>(aligned_block(kBlock), std::free);
      const size_t at = offset - start;
      for (size_t i = at; i < at + n; ++i) {
        if (p.written[i])
          throw std::logic_error(path_ + ": byte " + std::to_string(start + i) + " was written more than once");
        p.written[i] = true;
      }
      memcpy(p.data.get() + at, src, n);
      p.filled += n;
      pending_ += n;
      if (p.filled == block_len) {
        full = std::move(p.data);
        partial_.erase(block);
        pending_ -= block_len;
      }
    }
    if (full) {
      if (block_len == kBlock) write_direct(start, full.get(), kBlock);
      else write_buffered(start, full.get(), block_len);  // the file's short last block
    }
    src += n;
    offset += n;
    length -= n;
  }
}

size_t BlockWriter::pending_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_;
}

std::unique_ptr<BlockWriter> create_output(const std::string& path, uint64_t size, bool allow_direct) {
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "cannot create");
  if (size > 0) {
    int rc = posix_fallocate(fd, 0, static_cast<off_t>(size));
    if (rc == EOPNOTSUPP || rc == EINVAL) rc = ftruncate(fd, static_cast<off_t>(size)) == 0 ? 0 : errno;
    if (rc != 0) {
      close(fd);
      unlink(path.c_str());
      throw std::system_error(rc, std::generic_category(), "cannot reserve " + std::to_string(size) + " bytes for");
    }
  }
  int direct_fd = -1;
#ifdef O_DIRECT
  if (allow_direct && local_block_fs(fd)) direct_fd = open(path.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC);
#else
  (void)allow_direct;
#endif
  return std::make_unique<BlockWriter>(fd, direct_fd, size, path);
}

}  // namespace della_io
