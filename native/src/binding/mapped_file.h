// MappedFile: a read-only or read-write memory map of a whole file, exposed to JS as
// zero-copy Uint8Array views. The map lives until the file is closed and every view
// made from it has been collected.
#pragma once
#include <napi.h>

#include <memory>
#include <string>

namespace della_binding {

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
  Napi::Value Writable(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Advise(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  std::shared_ptr<Mapping> map_;
  std::string path_;
  size_t size_ = 0;
  bool writable_ = false;
};

}  // namespace della_binding
