#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "args.h"

namespace della_binding {

Mapping::~Mapping() {
  if (addr != nullptr) munmap(addr, size);
}

Napi::Error file_error(Napi::Env env, const std::string& what, const std::string& path, int err) {
  Napi::Error e = Napi::Error::New(env, path + ": " + what + ": " + strerror(err));
  const char* code = err == ENOENT ? "ENOENT" : err == EACCES ? "EACCES" : err == ENOSPC ? "ENOSPC"
                     : err == EEXIST ? "EEXIST" : err == EISDIR ? "EISDIR" : err == ENOMEM ? "ENOMEM"
                     : "ESYSTEM";
  e.Set("code", Napi::String::New(env, code));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("path", Napi::String::New(env, path));
  return e;
}

namespace {

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

Napi::Function MappedFile::Define(Napi::Env env) {
  return DefineClass(env, "MappedFile",
                     {InstanceAccessor<&MappedFile::Size>("size"),
                      InstanceMethod<&MappedFile::View>("view"),
                      InstanceMethod<&MappedFile::Advise>("advise"),
                      InstanceMethod<&MappedFile::Close>("close")});
}

// new MappedFile(path) maps an existing file read-only.
MappedFile::MappedFile(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MappedFile>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "MappedFile: path must be a string");
  path_ = info[0].As<Napi::String>().Utf8Value();
  map_ = std::make_shared<Mapping>();
  Fd f{open(path_.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw file_error(env, "cannot open", path_, errno);
  struct stat st;
  if (fstat(f.fd, &st) != 0) throw file_error(env, "cannot stat", path_, errno);
  if (S_ISDIR(st.st_mode)) throw file_error(env, "cannot map", path_, EISDIR);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, f.fd, 0);
    if (p == MAP_FAILED) throw file_error(env, "cannot map", path_, errno);
    map_->addr = p;
    map_->size = size_;
  }
}

Napi::Value MappedFile::Size(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(size_));
}

// view(offset, length): a Uint8Array over the map. It keeps the map alive.
Napi::Value MappedFile::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!map_) throw Napi::Error::New(env, path_ + ": file is closed");
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber())
    throw Napi::TypeError::New(env, "view(offset, length) takes two numbers");
  const double off = info[0].As<Napi::Number>().DoubleValue();
  const double len = info[1].As<Napi::Number>().DoubleValue();
  if (!(off >= 0 && len >= 0 && off + len <= static_cast<double>(size_)) || off != static_cast<uint64_t>(off) ||
      len != static_cast<uint64_t>(len))
    throw Napi::RangeError::New(env, path_ + ": view [" + std::to_string(off) + ", +" + std::to_string(len) +
                                         ") is outside the file of " + std::to_string(size_) + " bytes");
  const size_t o = static_cast<size_t>(off), n = static_cast<size_t>(len);
  if (n == 0) return Napi::Uint8Array::New(env, 0);
  auto* hold = new std::shared_ptr<Mapping>(map_);
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
      env, static_cast<uint8_t*>(map_->addr) + o, n,
      [](Napi::Env, void*, std::shared_ptr<Mapping>* h) { delete h; }, hold);
  return Napi::Uint8Array::New(env, n, ab, 0);
}

// advise(offset, length, 'willneed' | 'dontneed' | 'sequential'): a hint, never an error.
Napi::Value MappedFile::Advise(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!map_ || !map_->addr || info.Length() < 3) return env.Undefined();
  const long page = sysconf(_SC_PAGESIZE);
  const double off = info[0].As<Napi::Number>().DoubleValue();
  const double len = info[1].As<Napi::Number>().DoubleValue();
  const std::string how = info[2].As<Napi::String>().Utf8Value();
  if (!(off >= 0 && len > 0 && off + len <= static_cast<double>(size_))) return env.Undefined();
  const size_t begin = static_cast<size_t>(off) / page * page;
  const size_t end = static_cast<size_t>(off + len);
  const int advice = how == "willneed" ? MADV_WILLNEED : how == "dontneed" ? MADV_DONTNEED : MADV_SEQUENTIAL;
  madvise(static_cast<char*>(map_->addr) + begin, end - begin, advice);
  return env.Undefined();
}

// close(): no new views; the map itself goes when the last view is collected.
Napi::Value MappedFile::Close(const Napi::CallbackInfo& info) {
  map_.reset();
  return info.Env().Undefined();
}

}  // namespace della_binding
