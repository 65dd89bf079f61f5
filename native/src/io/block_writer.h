// BlockWriter: writes byte ranges of a file that together cover it exactly once, in any
// order and from any thread, with O_DIRECT where the file system allows it.
//
// Why: a merge's output is new memory to the operating system. Written through a
// memory map or write(2), every page of it is first zero-filled or allocated in the
// page cache, which on the machines we measured costs as much CPU as the merge of a
// task-arithmetic tensor. O_DIRECT hands the caller's (reused, already resident)
// buffer to the device instead, and the CPU goes back to merging.
//
// O_DIRECT needs block-aligned file offsets, lengths and memory. The aligned interior of
// each range is written directly (through a small bounce buffer when the caller's
// memory is not aligned to the file offset); the partial blocks at its ends are copied
// into per-block buffers and written once their neighbours have filled them. The
// file's last block, when the file size is not a multiple of the block, goes through
// the page cache (O_DIRECT cannot write a partial block). O_DIRECT is used on local
// block-device file systems (ext4, XFS, Btrfs, F2FS); elsewhere (tmpfs, NFS and other
// network file systems, or with DELLA_DIRECT_IO=0) every range is an ordinary pwrite.
#pragma once
#include <atomic>
#include <bitset>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace della_io {

class BlockWriter {
 public:
  static constexpr size_t kBlock = 4096;

  // Takes ownership of the descriptors. `direct_fd` is -1 when the file could not be
  // opened with O_DIRECT; `fd` is an ordinary descriptor open for writing.
  BlockWriter(int fd, int direct_fd, uint64_t file_size, std::string path);
  ~BlockWriter();
  BlockWriter(const BlockWriter&) = delete;
  BlockWriter& operator=(const BlockWriter&) = delete;

  // Writes [offset, offset + length) from `src`. Thread-safe. Each byte of the file
  // must be written exactly once. Throws std::runtime_error naming the file on failure.
  void write(uint64_t offset, const uint8_t* src, size_t length);

  // Bytes copied into partial blocks that still wait for the rest of their block (0
  // once every byte of the file has been written).
  size_t pending_bytes() const;
  bool direct() const { return direct_fd_ >= 0 && direct_ok_.load(); }
  uint64_t size() const { return size_; }

 private:
  struct Partial {
    std::unique_ptr<uint8_t, void (*)(void*)> data{nullptr, nullptr};
    size_t filled = 0;
    std::bitset<kBlock> written;  // catches a byte written twice
  };
  void write_direct(uint64_t offset, const uint8_t* src, size_t length);
  void write_buffered(uint64_t offset, const uint8_t* src, size_t length);
  void add_partial(uint64_t offset, const uint8_t* src, size_t length);
  [[noreturn]] void fail(const char* what, uint64_t offset, size_t length, int err) const;

  int fd_;
  int direct_fd_;
  uint64_t size_;
  std::string path_;
  std::atomic<bool> direct_ok_{true};
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Partial> partial_;  // by block index
  size_t pending_ = 0;
};

// Opens `path` for a BlockWriter: creates it (it must not exist), reserves `size` bytes
// on disk so that a full disk fails here, and opens a second descriptor with O_DIRECT
// unless `allow_direct` is false, the file system is not a local block-device one, or
// it refuses. Throws std::system_error
// (with errno) naming the step that failed; nothing is left behind on failure.
std::unique_ptr<BlockWriter> create_output(const std::string& path, uint64_t size, bool allow_direct);

}  // namespace della_io
