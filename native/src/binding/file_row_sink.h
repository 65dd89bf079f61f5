// FileRowSink: a merge's output written to its place in an output file slab by slab,
// through two halves of one staging buffer, so that a tensor of any size needs only
// that buffer: the kernels merge the next slab into one half while the other half's
// slab is written on a thread of its own.
#pragma once
#include <napi.h>

#include <future>
#include <memory>
#include <string>

#include "../io/block_writer.h"
#include "../kernels/merge_cpu.h"
#include "args.h"

namespace della_binding {

class FileRowSink : public della::RowSink {
 public:
  // Rows of row_bytes bytes go to `offset` onwards in the writer's file; `buffer`
  // (block-aligned, as allocStaging's) holds two slabs. `what` names the tensor. When
  // the byte at `cancel` (if any) turns non-zero, the next slab is refused (Cancelled):
  // a tensor of many slabs stops within one.
  FileRowSink(std::shared_ptr<della_io::BlockWriter> writer, uint64_t offset, uint64_t row_bytes, ByteSpan buffer,
              std::string what, const uint8_t* cancel = nullptr);
  ~FileRowSink() override;

  uint64_t slab_rows() const override;
  uint8_t* room(uint64_t row0, uint64_t rows) override;
  void put(uint64_t row0, uint64_t rows, uint8_t* bytes) override;
  void finish() override;

 private:
  void wait(int half);

  std::shared_ptr<della_io::BlockWriter> writer_;
  uint64_t offset_, row_bytes_;
  uint8_t* half_[2];
  uint64_t half_bytes_;
  std::string what_;
  const uint8_t* cancel_;
  std::future<void> pending_[2];
  uint64_t next_ = 0;  // slabs handed out so far: the next one goes into half next_ % 2
};

// A merge's `out` given as { file: OutputFile, offset, buffer }: a sink writing rows of
// row_bytes bytes for the tensor `name`, watching `cancel`. Throws a JS TypeError or
// RangeError naming `where` for anything else.
std::shared_ptr<FileRowSink> file_row_sink_field(const Napi::Object& out, const std::string& where,
                                                 uint64_t row_bytes, uint64_t total_bytes, const std::string& name,
                                                 const uint8_t* cancel);

}  // namespace della_binding
