// The plugin's C ABI (della_cuda_api.h): plain structs in, della::cuda::Context inside.
// Only these functions are exported from della_merge_cuda.so; every C++ exception stops
// here and becomes a return code and a message.
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>

#include "cuda_merge.h"
#include "della_cuda_api.h"

#define DELLA_EXPORT extern "C" __attribute__((visibility("default")))

struct DellaCudaContext {
  della::cuda::Context* ctx;
};

namespace {

void set_error(char* err, size_t errlen, const char* what) {
  if (err && errlen > 0) std::snprintf(err, errlen, "%s", what);
}

template <class Fn>
int guarded(char* err, size_t errlen, Fn fn) {
  try {
    fn();
    return DELLA_CUDA_OK;
  } catch (const della::cuda::Error& e) {
    set_error(err, errlen, e.what());
    return e.code();
  } catch (const std::bad_alloc&) {
    set_error(err, errlen, "out of host memory");
    return DELLA_CUDA_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_error(err, errlen, e.what());
    return DELLA_CUDA_ERROR;
  } catch (...) {
    set_error(err, errlen, "unknown error in the CUDA plugin");
    return DELLA_CUDA_ERROR;
  }
}

della::MergeTask to_task(const DellaCudaTask& c) {
  della::MergeTask t;
  t.linear = c.linear != 0;
  t.base = c.base;
  t.base_dtype = static_cast<della::DType>(c.base_dtype);
  t.out = c.out;
  t.out_dtype = static_cast<della::DType>(c.out_dtype);
  t.shape.assign(c.shape, c.shape + c.rank);
  for (uint32_t k = 0; k < c.num_experts; ++k) {
    const DellaCudaExpert& e = c.experts[k];
    della::ExpertInput in;
    in.data = e.data;
    in.dtype = static_cast<della::DType>(e.dtype);
    in.shape.assign(e.shape, e.shape + c.rank);
    in.weight = e.weight;
    in.density = e.density;
    in.epsilon = e.epsilon;
    in.gamma = e.gamma;
    t.experts.push_back(std::move(in));
  }
  t.sparsifier = static_cast<della::Sparsifier>(c.sparsifier);
  t.rescale = static_cast<della::Rescale>(c.rescale);
  t.consensus = static_cast<della::Consensus>(c.consensus);
  t.normalize = c.normalize != 0;
  t.lambda = c.lambda;
  t.tensor_id = c.tensor_id;
  t.seed = c.seed;
  t.digest = c.digest != 0;
  return t;
}

}  // namespace

DELLA_EXPORT int della_cuda_abi_version(void) { return DELLA_CUDA_ABI_VERSION; }

DELLA_EXPORT int della_cuda_probe(int device, DellaCudaDeviceInfo* info, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    const DellaCudaDeviceInfo i = della::cuda::probe(device);
    if (info) *info = i;
  });
}

DELLA_EXPORT DellaCudaContext* della_cuda_open(const DellaCudaOptions* options, DellaCudaDeviceInfo* info, int* code,
                                               char* err, size_t errlen) {
  DellaCudaContext* out = nullptr;
  const int rc = guarded(err, errlen, [&] {
    della::cuda::Options o;
    o.device = options->device;
    o.memory_budget = options->memory_budget;
    auto* ctx = new della::cuda::Context(o);
    out = new DellaCudaContext{ctx};
    if (info) *info = ctx->info();
  });
  if (code) *code = rc;
  return out;
}

DELLA_EXPORT int della_cuda_run(DellaCudaContext* ctx, const DellaCudaTask* tasks, size_t count, DellaCudaStats* stats,
                                uint32_t host_threads, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    if (!ctx || !ctx->ctx) throw std::invalid_argument("no CUDA context");
    std::vector<della::MergeTask> ts;
    ts.reserve(count);
    for (size_t i = 0; i < count; ++i) ts.push_back(to_task(tasks[i]));
    std::vector<della::MergeStats> st;
    ctx->ctx->run(ts, st, host_threads);
    for (size_t i = 0; i < count; ++i) {
      std::memcpy(stats[i].nonfinite, st[i].nonfinite.data(), st[i].nonfinite.size() * sizeof(uint64_t));
      std::memcpy(stats[i].kept, st[i].kept.data(), st[i].kept.size() * sizeof(uint64_t));
      stats[i].out_nonfinite = st[i].out_nonfinite;
      stats[i].numel = st[i].numel;
      stats[i].has_digest = st[i].has_digest;
      stats[i].digest = st[i].digest;
    }
  });
}

DELLA_EXPORT void della_cuda_close(DellaCudaContext* ctx) {
  if (!ctx) return;
  delete ctx->ctx;
  delete ctx;
}
