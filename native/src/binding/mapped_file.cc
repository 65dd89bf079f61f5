#include "mapped_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../io/map_guard.h"
#include "args.h"

namespace della_binding {

Mapping::~Mapping() {
  della_io::unguard_map(guard);  // first: the address range may be reused once unmapped
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
                      InstanceAccessor<&MappedFile::Faulted>("faulted"),
                      InstanceMethod<&MappedFile::View>("view"),
                      InstanceMethod<&MappedFile::Advise>("advise"),
                      InstanceMethod<&MappedFile::Close>("close")});
}

// new MappedFile(path[, copyOnWrite]) maps an existing file: read-only (the merge's
// inputs), or copy on write (the API's openCheckpoint, whose views users may write to).
MappedFile::MappedFile(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MappedFile>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "MappedFile: path must be a string");
  path_ = info[0].As<Napi::String>().Utf8Value();
  const bool copy_on_write = info.Length() > 1 && info[1].IsBoolean() && info[1].As<Napi::Boolean>().Value();
  map_ = std::make_shared<Mapping>();
  Fd f{open(path_.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw file_error(env, "cannot open", path_, errno);
  struct stat st;
  if (fstat(f.fd, &st) != 0) throw file_error(env, "cannot stat", path_, errno);
  if (S_ISDIR(st.st_mode)) throw file_error(env, "cannot map", path_, EISDIR);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    // Copy on write: a view written to from JS (openCheckpoint(dir).array(name)[0] = 1)
    // changes a private copy of that page, never the file; read-only, it was a SIGSEGV.
    // Unwritten pages are the page cache's, as with MAP_SHARED. MAP_NORESERVE: nothing is
    // charged for pages never written; where strict overcommit charges them anyway and
    // refuses, the map is read-only.
    void* p = MAP_FAILED;
    if (copy_on_write) p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, f.fd, 0);
    if (p == MAP_FAILED) p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, f.fd, 0);
    if (p == MAP_FAILED) throw file_error(env, "cannot map", path_, errno);
    map_->addr = p;
    map_->size = size_;
    map_->guard = della_io::guard_map(p, size_);
  }
}

Napi::Value MappedFile::Size(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(size_));
}

// faulted: whether a read of the map went past the end of its file, cut short since it
// was mapped (and read zeros there).
Napi::Value MappedFile::Faulted(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), map_ ? della_io::map_faulted(map_->guard) : faulted_at_close_);
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
  della_io::guard_in_front();  // the view is about to be read (see input_field)
  // the JS side views larger tensors in windows
  if (n > kMaxTypedArrayBytes)
    throw Napi::RangeError::New(env, path_ + ": a view of " + std::to_string(n) +
                                         " bytes is longer than the 4 GiB one Uint8Array holds");
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

ByteSpan input_field(const Napi::Object& o, const char* key, const std::string& where, MapHolds& holds) {
  Napi::Env env = o.Env();
  Napi::Value v = field(o, key, where);
  if (v.IsTypedArray() || v.IsDataView() || !v.IsObject()) return bytes_field(o, key, where);
  const std::string w = where + "." + key;
  Napi::Object slice = v.As<Napi::Object>();
  Napi::Value m = field(slice, "map", w);
  auto* classes = env.GetInstanceData<AddonClasses>();
  if (!m.IsObject() || !m.As<Napi::Object>().InstanceOf(classes->mapped_file.Value()))
    throw Napi::TypeError::New(env, w + " must be a typed array or a { map, offset, length } slice of a MappedFile");
  MappedFile* f = MappedFile::Unwrap(m.As<Napi::Object>());
  if (!f->map_) throw Napi::Error::New(env, w + ": " + f->path_ + " is closed");
  const int64_t off = integer_field(slice, "offset", w, 0, 9007199254740991.0);
  const int64_t len = integer_field(slice, "length", w, 0, 9007199254740991.0);
  if (static_cast<uint64_t>(off) + static_cast<uint64_t>(len) > f->size_)
    throw Napi::RangeError::New(env, w + ": [" + std::to_string(off) + ", +" + std::to_string(len) + ") is outside " +
                                         f->path_ + " (" + std::to_string(f->size_) + " bytes)");
  // Once per batch, before its kernels read: a SIGBUS handler installed since the map
  // was opened (process.on('SIGBUS')) would take the guard's faults and hang the merge.
  if (holds.empty()) della_io::guard_in_front();
  holds.push_back(f->map_);
  if (len == 0) return {nullptr, 0};
  return {static_cast<uint8_t*>(f->map_->addr) + off, static_cast<size_t>(len)};
}

// close(): no new views; the map itself goes when the last view is collected.
Napi::Value MappedFile::Close(const Napi::CallbackInfo& info) {
  if (map_) faulted_at_close_ = della_io::map_faulted(map_->guard);
  map_.reset();
  return info.Env().Undefined();
}

}  // namespace della_binding
