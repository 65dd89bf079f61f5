// MappedFile: a read-only memory map of a whole file, exposed to JS as
// zero-copy Uint8Array views. The map lives until the file is closed and every view
// made from it has been collected.
#pragma once
#include <napi.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "args.h"

namespace della_binding {

// An Error "<path>: <what>: <strerror>" with code (ENOENT, EACCES, ENOSPC, ... or
// ESYSTEM), errno and path set, as Node's own file errors have.
Napi::Error file_error(Napi::Env env, const std::string& what, const std::string& path, int err);

// The map and its slot in the SIGBUS guard (native/src/io/map_guard.h), which turns
// reads past the end of a file cut short into zeros and marks the map.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  int guard = -1;
  ~Mapping();
};

// The addon's classes, kept per environment (worker threads have their own).
struct AddonClasses {
  Napi::FunctionReference mapped_file;
  Napi::FunctionReference output_file;
  // Unfinished output directories (removeAtTeardown): removed with the environment. A
  // worker_thread stopped by terminate() runs no JS 'exit' handler, and left them.
  std::set<std::string> temp_dirs;
  ~AddonClasses();
};

using MapHolds = std::vector<std::shared_ptr<Mapping>>;

// An input tensor's bytes: a typed array or Buffer, or a slice { map, offset, length }
// of a MappedFile. Slices make no JS buffer at all: V8 counts each large external buffer
// as memory pressure and starts a full GC every 64 MB of them, dozens per merge when
// every input file had one. `holds` keeps the slices' maps alive while kernels read.
ByteSpan input_field(const Napi::Object& o, const char* key, const std::string& where, MapHolds& holds);

class MappedFile : public Napi::ObjectWrap<MappedFile> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit MappedFile(const Napi::CallbackInfo& info);

 private:
  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value Faulted(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Advise(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  friend ByteSpan input_field(const Napi::Object&, const char*, const std::string&, MapHolds&);

  std::shared_ptr<Mapping> map_;
  std::string path_;
  size_t size_ = 0;
  bool faulted_at_close_ = false;
};

}  // namespace della_binding
