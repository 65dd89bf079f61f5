#include "output_file.h"
#include "promise_worker.h"

#include <sys/mman.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "mapped_file.h"

namespace della_binding {
namespace {

// Writes one range on a libuv thread; holds the source array and the writer until done.
class WriteWorker : public Napi::AsyncWorker {
 public:
  WriteWorker(Napi::Env env, std::shared_ptr<della_io::BlockWriter> writer, uint64_t offset, Napi::Object src,
              ByteSpan bytes)
      : Napi::AsyncWorker(env, "della-merge:write"),
        deferred_(Napi::Promise::Deferred::New(env)),
        writer_(std::move(writer)),
        offset_(offset),
        data_(bytes.data),
        length_(bytes.length),
        src_(Napi::Persistent(src)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      writer_->write(offset_, data_, length_);
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    settle_promise(deferred_, [&] {
      src_.Reset();
      deferred_.Resolve(Env().Undefined());
    });
  }
  void OnError(const Napi::Error& e) override {
    settle_promise(deferred_, [&] {
      src_.Reset();
      deferred_.Reject(e.Value());
    });
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<della_io::BlockWriter> writer_;
  uint64_t offset_;
  const uint8_t* data_;
  size_t length_;
  Napi::ObjectReference src_;
};

}  // namespace

Napi::Function OutputFile::Define(Napi::Env env) {
  return DefineClass(env, "OutputFile",
                     {InstanceAccessor<&OutputFile::Size>("size"), InstanceAccessor<&OutputFile::Direct>("direct"),
                      InstanceMethod<&OutputFile::Write>("write"), InstanceMethod<&OutputFile::Close>("close")});
}

// new OutputFile(path, size, direct): creates the file (it must not exist) and reserves
// its blocks; `direct` false never uses O_DIRECT.
OutputFile::OutputFile(const Napi::CallbackInfo& info) : Napi::ObjectWrap<OutputFile>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsNumber() || !info[2].IsBoolean())
    throw Napi::TypeError::New(env, "OutputFile(path, size, direct) takes a string, a number and a boolean");
  path_ = info[0].As<Napi::String>().Utf8Value();
  const double want = info[1].As<Napi::Number>().DoubleValue();
  if (!(want >= 0 && want <= 9007199254740991.0) || want != static_cast<uint64_t>(want))
    throw Napi::RangeError::New(env, "OutputFile: bad size");
  size_ = static_cast<uint64_t>(want);
  try {
    writer_ = della_io::create_output(path_, size_, info[2].As<Napi::Boolean>().Value());
  } catch (const std::system_error& e) {
    const std::string what = e.what();
    throw file_error(env, what.substr(0, what.find(':')), path_, e.code().value());
  }
}

OutputFile* OutputFile::From(const Napi::Value& v) {
  if (!v.IsObject()) return nullptr;
  auto* classes = v.Env().GetInstanceData<AddonClasses>();
  if (classes == nullptr || !v.As<Napi::Object>().InstanceOf(classes->output_file.Value())) return nullptr;
  return OutputFile::Unwrap(v.As<Napi::Object>());
}

Napi::Value OutputFile::Size(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(size_));
}

Napi::Value OutputFile::Direct(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), writer_ && writer_->direct());
}

// write(offset, bytes) -> Promise<void>: bytes must stay unchanged until it settles.
Napi::Value OutputFile::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!writer_) throw Napi::Error::New(env, path_ + ": file is closed");
  ByteSpan bytes{};
  if (info.Length() < 2 || !info[0].IsNumber() || !byte_view(info[1], bytes))
    throw Napi::TypeError::New(env, "write(offset, bytes) takes a number and a Uint8Array or DataView");
  const double off = info[0].As<Napi::Number>().DoubleValue();
  if (!(off >= 0) || off != static_cast<uint64_t>(off) || off + static_cast<double>(bytes.length) > static_cast<double>(size_))
    throw Napi::RangeError::New(env, path_ + ": write of " + std::to_string(bytes.length) + " bytes at offset " +
                                         std::to_string(off) + " is outside the file of " + std::to_string(size_) +
                                         " bytes");
  auto* w = new WriteWorker(env, writer_, static_cast<uint64_t>(off), info[1].As<Napi::Object>(), bytes);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// close(): after every write has settled. Fails if some bytes of the file were never
// written (their blocks are still waiting); the descriptors close with the last write.
Napi::Value OutputFile::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!writer_) return env.Undefined();
  const size_t pending = writer_->pending_bytes();
  writer_.reset();
  if (pending > 0)
    throw Napi::Error::New(env, path_ + ": closed with parts of " + std::to_string(pending) +
                                    " bytes' blocks never completed (some of the file was not written)");
  return env.Undefined();
}

Napi::Value RemoveAtTeardown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsBoolean())
    throw Napi::TypeError::New(env, "removeAtTeardown(dir, on) takes a path and a boolean");
  auto* classes = env.GetInstanceData<AddonClasses>();
  const std::string dir = info[0].As<Napi::String>().Utf8Value();
  if (info[1].As<Napi::Boolean>().Value()) classes->temp_dirs.insert(dir);
  else classes->temp_dirs.erase(dir);
  return env.Undefined();
}

AddonClasses::~AddonClasses() {
  std::error_code ignored;  // nothing to report to at teardown
  for (const std::string& dir : temp_dirs) std::filesystem::remove_all(dir, ignored);
}

Napi::Value AllocStaging(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "allocStaging(bytes) takes a number");
  const double want = info[0].As<Napi::Number>().DoubleValue();
  if (!(want > 0 && want <= 9007199254740991.0) || want != static_cast<uint64_t>(want))
    throw Napi::RangeError::New(env, "allocStaging: bytes must be a positive integer");
  const size_t huge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(want);
  if (bytes > kMaxTypedArrayBytes) {
    // More than an external buffer may hold (args.h): memory V8 allocates, a block more
    // than asked, viewed from its first block-aligned byte. Made by JS's own ArrayBuffer
    // constructor, whose failure is a RangeError: N-API's napi_create_arraybuffer ends
    // the process when the memory is not there.
    const size_t block = della_io::BlockWriter::kBlock;
    Napi::ArrayBuffer ab;
    try {
      Napi::Function ctor = env.Global().Get("ArrayBuffer").As<Napi::Function>();
      ab = ctor.New({Napi::Number::New(env, static_cast<double>(bytes + block))}).As<Napi::ArrayBuffer>();
    } catch (const Napi::Error&) {
      throw Napi::Error::New(env, "allocStaging: out of memory for " + std::to_string(bytes) + " bytes");
    }
    const uintptr_t at = reinterpret_cast<uintptr_t>(ab.Data());
    const size_t skip = (block - at % block) % block;
    const uintptr_t h0 = (at + huge - 1) / huge * huge, h1 = (at + bytes) / huge * huge;
    if (h1 > h0) madvise(reinterpret_cast<void*>(h0), h1 - h0, MADV_HUGEPAGE);  // a hint, as below
    return Napi::DataView::New(env, ab, skip, bytes);
  }
  // Buffers of 2 MiB and more in transparent huge pages where the kernel has them: the
  // O_DIRECT writes pin every page of a buffer, and the kernels write each byte once.
  const size_t k = bytes >= huge ? huge : della_io::BlockWriter::kBlock;
  const size_t rounded = (bytes + k - 1) / k * k;
  void* p = std::aligned_alloc(k, rounded);
  if (p == nullptr) throw Napi::Error::New(env, "allocStaging: out of memory for " + std::to_string(bytes) + " bytes");
  if (k == huge) madvise(p, rounded, MADV_HUGEPAGE);  // a hint: refused quietly where THP is off
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(rounded));
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
      env, p, bytes,
      [](Napi::Env e, void* data, size_t* size) {
        Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(*size));
        std::free(data);
        delete size;
      },
      new size_t(rounded));
  return Napi::Uint8Array::New(env, bytes, ab, 0);
}

}  // namespace della_binding
