#include "file_row_sink.h"

#include <limits>
#include <stdexcept>

#include "output_file.h"
#include "promise_worker.h"

namespace della_binding {

namespace {
constexpr uint64_t kBlock = della_io::BlockWriter::kBlock;
}

FileRowSink::FileRowSink(std::shared_ptr<della_io::BlockWriter> writer, uint64_t offset, uint64_t row_bytes,
                         ByteSpan buffer, std::string what, const uint8_t* cancel)
    : writer_(std::move(writer)), offset_(offset), row_bytes_(row_bytes), what_(std::move(what)), cancel_(cancel) {
  half_bytes_ = buffer.length / 2 / kBlock * kBlock;
  half_[0] = buffer.data;
  half_[1] = buffer.data + half_bytes_;
}

FileRowSink::~FileRowSink() {
  // A merge that failed part-way: no write may still read the buffer once it returns.
  for (auto& p : pending_)
    if (p.valid()) p.wait();
}

uint64_t FileRowSink::slab_rows() const {
  // Each slab starts at its file offset's place within a block (up to kBlock - 1 bytes
  // in), so that O_DIRECT writes it straight from the buffer.
  if (row_bytes_ == 0) return std::numeric_limits<uint32_t>::max();
  return half_bytes_ < kBlock ? 0 : (half_bytes_ - (kBlock - 1)) / row_bytes_;
}

uint8_t* FileRowSink::room(uint64_t row0, uint64_t rows) {
  if (rows > slab_rows()) throw std::logic_error("a slab larger than the sink's room");
  // (set by the JS thread: a relaxed read, seen within a slab or two)
  if (cancel_ != nullptr && __atomic_load_n(cancel_, __ATOMIC_RELAXED) != 0)
    throw Cancelled("cancelled while merging " + what_);
  const int h = static_cast<int>(next_ % 2);
  wait(h);  // the slab two before this one was written from this half
  const uint64_t at = (offset_ + row0 * row_bytes_) % kBlock;
  const uint64_t mis = reinterpret_cast<uintptr_t>(half_[h]) % kBlock;
  return half_[h] + (at + kBlock - mis) % kBlock;
}

void FileRowSink::put(uint64_t row0, uint64_t rows, uint8_t* bytes) {
  const int h = static_cast<int>(next_++ % 2);
  const uint64_t off = offset_ + row0 * row_bytes_, len = rows * row_bytes_;
  pending_[h] = std::async(std::launch::async, [w = writer_, off, bytes, len] { w->write(off, bytes, len); });
}

void FileRowSink::finish() {
  wait(0);
  wait(1);
}

void FileRowSink::wait(int half) {
  if (!pending_[half].valid()) return;
  try {
    pending_[half].get();
  } catch (const std::exception& e) {
    throw WriteFailure("cannot write " + what_ + ": " + e.what());
  }
}

std::shared_ptr<FileRowSink> file_row_sink_field(const Napi::Object& out, const std::string& where,
                                                 uint64_t row_bytes, uint64_t total_bytes, const std::string& name,
                                                 const uint8_t* cancel) {
  Napi::Env env = out.Env();
  OutputFile* file = OutputFile::From(field(out, "file", where));
  if (file == nullptr) throw Napi::TypeError::New(env, where + ".file must be an OutputFile");
  std::shared_ptr<della_io::BlockWriter> writer = file->writer();
  if (!writer) throw Napi::Error::New(env, where + ".file (" + file->path() + ") is closed");
  const uint64_t offset = static_cast<uint64_t>(integer_field(out, "offset", where, 0, 9007199254740991.0));
  if (offset > writer->size() || total_bytes > writer->size() - offset)
    throw Napi::RangeError::New(env, where + ": " + std::to_string(total_bytes) + " bytes at offset " +
                                         std::to_string(offset) + " are outside " + file->path() + " (" +
                                         std::to_string(writer->size()) + " bytes)");
  ByteSpan buffer{};
  if (!byte_view(field(out, "buffer", where), buffer))
    throw Napi::TypeError::New(env, where + ".buffer must be a Uint8Array or DataView");
  return std::make_shared<FileRowSink>(std::move(writer), offset, row_bytes, buffer, "tensor \"" + name + "\"", cancel);
}

}  // namespace della_binding
