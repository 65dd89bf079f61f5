// MappedFile: a read-only memory map of a whole file, exposed to JS as
// zero-copy Uint8Array views. The map lives until the file is closed and every view
// made from it has been collected.
#pragma once
#include <napi.h>

#include <memory>
#include <string>

namespace della_binding {

// An Error "<path>: <what>: <strerror>" with code (ENOENT, EACCES, ENOSPC, ... or
// ESYSTEM), errno and path set, as Node's own file errors have.
Napi::Error file_error(Napi::Env env, const std::string& what, const std::string& path, int err);

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping();
};

class MappedFile : public Napi::ObjectWrap<MappedFile> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit MappedFile(const Napi::CallbackInfo& info);

 private:
  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Advise(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  std::shared_ptr<Mapping> map_;
  std::string path_;
  size_t size_ = 0;
};

}  // namespace della_binding
