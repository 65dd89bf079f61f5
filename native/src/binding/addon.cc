// Module entry: registers the binding's functions and classes. No math here.
#include <napi.h>

#include <thread>

#include "../kernels/merge_cpu.h"
#include "../kernels/thread_pool.h"
#include "args.h"
#include "della/philox.h"
#include "della/xxh64.h"
#include "cuda_plugin.h"
#include "mapped_file.h"
#include "merge_worker.h"
#include "output_file.h"

namespace della_binding {
namespace {


// philoxBlock(c0, c1, c2, c3, k0, k1) -> [w0, w1, w2, w3]: exposes the kernels'
// generator so tests can check it against known answers.
Napi::Value PhiloxBlock(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t a[6];
  for (int i = 0; i < 6; ++i) {
    if (i >= static_cast<int>(info.Length()) || !info[i].IsNumber())
      throw Napi::TypeError::New(env, "philoxBlock takes six 32-bit numbers");
    a[i] = info[i].As<Napi::Number>().Uint32Value();
  }
  const della::Philox4 b = della::philox4x32_10(a[0], a[1], a[2], a[3], a[4], a[5]);
  Napi::Array out = Napi::Array::New(env, 4);
  for (uint32_t i = 0; i < 4; ++i) out.Set(i, Napi::Number::New(env, b.v[i]));
  return out;
}

// xxh64(bytes) -> 16 hex digits: the digest a merge records for each output tensor.
// `bytes`: a Uint8Array, a DataView, or a slice { map, offset, length } of a MappedFile
// (any length: tensors over 4 GiB are hashed straight from their map).
// Synchronous: it runs at memory speed, and the caller overlaps it with the next batch.
Napi::Value Xxh64(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ByteSpan bytes{};
  if (info.Length() < 1) throw Napi::TypeError::New(env, "xxh64 takes a Uint8Array, a DataView or a map slice");
  if (!byte_view(info[0], bytes)) {
    if (!info[0].IsObject() || info[0].IsTypedArray())
      throw Napi::TypeError::New(env, "xxh64 takes a Uint8Array, a DataView or a map slice");
    Napi::Object holder = Napi::Object::New(env);
    holder.Set("slice", info[0]);
    MapHolds holds;
    bytes = input_field(holder, "slice", "xxh64", holds);  // messages name xxh64.slice
    return hex64(env, della::xxh64(bytes.data, bytes.length));  // while `holds` keeps the map
  }
  return hex64(env, della::xxh64(bytes.data, bytes.length));
}

// cpuFeatures() -> names of the SIMD extensions this CPU has (for `doctor`).
Napi::Value CpuFeatures(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("sse4.2")) out.Set(i++, "sse4.2");
  if (__builtin_cpu_supports("avx")) out.Set(i++, "avx");
  if (__builtin_cpu_supports("avx2")) out.Set(i++, "avx2");
  if (__builtin_cpu_supports("fma")) out.Set(i++, "fma");
  if (__builtin_cpu_supports("avx512f")) out.Set(i++, "avx512f");
  if (__builtin_cpu_supports("avx512bw")) out.Set(i++, "avx512bw");
#elif defined(__aarch64__)
  out.Set(i++, "neon");
#endif
  return out;
}

// kernelPaths() -> the CPU kernel paths this machine selects (for `doctor`).
Napi::Value KernelPaths(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (const std::string& p : della::cpu_kernel_paths()) out.Set(i++, p);
  return out;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  Napi::Function mapped = MappedFile::Define(env);
  Napi::Function output = OutputFile::Define(env);
  // Per-environment storage keeps the classes alive in each worker thread's env.
  env.SetInstanceData<AddonClasses>(new AddonClasses{Napi::Persistent(mapped), Napi::Persistent(output), {}});
  exports.Set("MappedFile", mapped);
  exports.Set("OutputFile", output);
  exports.Set("kernelPaths", Napi::Function::New(env, KernelPaths, "kernelPaths"));
  exports.Set("allocStaging", Napi::Function::New(env, AllocStaging, "allocStaging"));
  exports.Set("removeAtTeardown", Napi::Function::New(env, RemoveAtTeardown, "removeAtTeardown"));
  exports.Set("mergeBatch", Napi::Function::New(env, MergeBatch, "mergeBatch"));
  exports.Set("dotBatch", Napi::Function::New(env, DotBatch, "dotBatch"));
  exports.Set("philoxBlock", Napi::Function::New(env, PhiloxBlock, "philoxBlock"));
  exports.Set("xxh64", Napi::Function::New(env, Xxh64, "xxh64"));
  exports.Set("cpuFeatures", Napi::Function::New(env, CpuFeatures, "cpuFeatures"));
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
  exports.Set("cudaOpen", Napi::Function::New(env, CudaOpen, "cudaOpen"));
  exports.Set("cudaOpenAsync", Napi::Function::New(env, CudaOpenAsync, "cudaOpenAsync"));
  exports.Set("hardwareThreads", Napi::Number::New(env, della::ThreadPool::hardware_threads()));
  // lib/native.ts ADDON_ABI_VERSION: bump both when what the addon takes or returns changes.
  exports.Set("abiVersion", Napi::Number::New(env, 5));
  return exports;
}

}  // namespace
}  // namespace della_binding

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return della_binding::Init(env, exports); }

NODE_API_MODULE(della_merge, InitModule)
