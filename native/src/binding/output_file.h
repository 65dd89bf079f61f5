// OutputFile: a new file written by byte ranges, each write a promise that runs off the
// JS thread (della_io::BlockWriter does the writing, with O_DIRECT where it can).
// allocStaging: resident, block-aligned memory for the bytes on their way there.
#pragma once
#include <napi.h>

#include <memory>
#include <string>

#include "../io/block_writer.h"

namespace della_binding {

class OutputFile : public Napi::ObjectWrap<OutputFile> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit OutputFile(const Napi::CallbackInfo& info);

  // The OutputFile `v` is, or null when it is something else.
  static OutputFile* From(const Napi::Value& v);
  // The writer, shared with writes in flight; null once closed.
  std::shared_ptr<della_io::BlockWriter> writer() const { return writer_; }
  const std::string& path() const { return path_; }

 private:
  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value Direct(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  std::shared_ptr<della_io::BlockWriter> writer_;
  std::string path_;
  uint64_t size_ = 0;
};

// allocStaging(bytes) -> a Uint8Array of that many bytes (a DataView over 4 GiB) whose
// first byte is aligned to della_io::BlockWriter::kBlock; freed when collected.
Napi::Value AllocStaging(const Napi::CallbackInfo& info);

// removeAtTeardown(dir, on): while on, `dir` (an output being built) is removed when this
// environment is torn down, the way a Worker ends on terminate(); off once it is put in
// place or removed.
Napi::Value RemoveAtTeardown(const Napi::CallbackInfo& info);

}  // namespace della_binding
