#include "cuda_plugin.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdlib>
#include <mutex>

#include "../cuda/della_cuda_api.h"
#include "promise_worker.h"

namespace della_binding {
namespace {

constexpr const char* kPluginFile = "della_merge_cuda.so";

struct Plugin {
  bool tried = false;
  std::string path;
  void* handle = nullptr;
  std::string error;  // why it is not loaded
  della_cuda_abi_version_fn abi_version = nullptr;
  della_cuda_probe_fn probe = nullptr;
  della_cuda_open_fn open = nullptr;
  della_cuda_run_fn run = nullptr;
  della_cuda_close_fn close = nullptr;
};

std::mutex g_mutex;  // guards everything below; one GPU batch at a time per process
Plugin g_plugin;
DellaCudaContext* g_ctx = nullptr;
int g_ctx_device = -1;
uint64_t g_ctx_memory = 0;
DellaCudaDeviceInfo g_ctx_info{};

// <directory of this addon>/della_merge_cuda.so, or $DELLA_CUDA_PLUGIN.
std::string plugin_path() {
  if (const char* env = std::getenv("DELLA_CUDA_PLUGIN"); env && *env) return env;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&plugin_path), &info) && info.dli_fname) {
    std::string self = info.dli_fname;
    const size_t slash = self.rfind('/');
    return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/" + kPluginFile;
  }
  return kPluginFile;
}

bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// Loads the plugin once; afterwards g_plugin.handle or g_plugin.error says how it went.
Plugin& plugin_locked() {
  Plugin& p = g_plugin;
  if (p.tried) return p;
  p.tried = true;
  p.path = plugin_path();
  dlerror();
  p.handle = dlopen(p.path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!p.handle) {
    const char* e = dlerror();
    p.error = std::string("the CUDA plugin could not be loaded: ") + (e ? e : p.path);
    const char* env = std::getenv("DELLA_CUDA_PLUGIN");
    if (env && *env)
      p.error += " (DELLA_CUDA_PLUGIN names it; unset it to load the plugin beside the addon)";
    else if (!file_exists(p.path))
      p.error += " (this installation has no CUDA plugin: it is built with the addon when CMake finds nvcc >= 12; "
                 "`DELLA_FORCE_BUILD=1 npm rebuild della-merge` builds both from source where the prebuilt package "
                 "has none; or set DELLA_CUDA_PLUGIN to its path)";
    return p;
  }
  auto sym = [&](const char* name) { return dlsym(p.handle, name); };
  p.abi_version = reinterpret_cast<della_cuda_abi_version_fn>(sym("della_cuda_abi_version"));
  p.probe = reinterpret_cast<della_cuda_probe_fn>(sym("della_cuda_probe"));
  p.open = reinterpret_cast<della_cuda_open_fn>(sym("della_cuda_open"));
  p.run = reinterpret_cast<della_cuda_run_fn>(sym("della_cuda_run"));
  p.close = reinterpret_cast<della_cuda_close_fn>(sym("della_cuda_close"));
  if (!p.abi_version || !p.probe || !p.open || !p.run || !p.close) {
    p.error = "the CUDA plugin " + p.path + " lacks the della_cuda_* functions (not a della-merge CUDA plugin?)";
  } else if (p.abi_version() != DELLA_CUDA_ABI_VERSION) {
    p.error = "the CUDA plugin " + p.path + " has ABI version " + std::to_string(p.abi_version()) +
              "; this addon needs " + std::to_string(DELLA_CUDA_ABI_VERSION) + ": rebuild both together";
  } else {
    return p;
  }
  dlclose(p.handle);
  p.handle = nullptr;
  return p;
}

Napi::Value device_to_js(Napi::Env env, const DellaCudaDeviceInfo& d) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("index", d.index);
  o.Set("name", std::string(d.name));
  o.Set("count", d.count);
  o.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
  o.Set("totalMemory", static_cast<double>(d.total_memory));
  o.Set("freeMemory", static_cast<double>(d.free_memory));
  o.Set("multiprocessors", d.multiprocessors);
  o.Set("runtimeVersion", d.runtime_version);
  o.Set("driverVersion", d.driver_version);
  return o;
}

// The open context for (device, memory), opening (or reopening) it as needed.
DellaCudaContext* context_locked(int device, uint64_t memory) {
  Plugin& p = plugin_locked();
  if (!p.handle) throw CudaFailure(-1, p.error);
  if (g_ctx && g_ctx_device == device && g_ctx_memory == memory) return g_ctx;
  if (g_ctx) {
    p.close(g_ctx);
    g_ctx = nullptr;
  }
  DellaCudaOptions o{};
  o.device = device;
  o.memory_budget = memory;
  char err[1024] = {0};
  int code = 0;
  DellaCudaDeviceInfo info{};
  DellaCudaContext* ctx = p.open(&o, &info, &code, err, sizeof err);
  if (!ctx) throw CudaFailure(code ? code : DELLA_CUDA_ERROR, err[0] ? err : "the CUDA device could not be opened");
  g_ctx = ctx;
  g_ctx_device = device;
  g_ctx_memory = memory;
  g_ctx_info = info;
  return ctx;
}

}  // namespace

const char* cuda_code_name(int code) {
  switch (code) {
    case -1: return "E_NO_PLUGIN";
    case DELLA_CUDA_NO_DEVICE: return "E_NO_DEVICE";
    case DELLA_CUDA_OUT_OF_MEMORY: return "E_OUT_OF_MEMORY";
    default: return "E_CUDA";
  }
}

std::vector<della::MergeStats> cuda_run_batch(int device, uint64_t memory, const std::vector<della::MergeTask>& tasks,
                                              unsigned threads) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DellaCudaContext* ctx = context_locked(device, memory);
  // The plugin's C view of the tasks; the vectors keep shapes and experts alive.
  std::vector<std::vector<DellaCudaExpert>> experts(tasks.size());
  std::vector<DellaCudaTask> cts(tasks.size());
  std::vector<della::MergeStats> stats(tasks.size());
  std::vector<DellaCudaStats> cstats(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    const della::MergeTask& t = tasks[i];
    for (const della::ExpertInput& e : t.experts) {
      if (e.shape.size() != t.shape.size()) throw CudaFailure(DELLA_CUDA_ERROR, "expert rank differs from the base's");
      DellaCudaExpert c{};
      c.data = e.data;
      c.dtype = static_cast<uint32_t>(e.dtype);
      c.shape = e.shape.data();
      c.weight = e.weight;
      c.density = e.density;
      c.epsilon = e.epsilon;
      c.gamma = e.gamma;
      experts[i].push_back(c);
    }
    DellaCudaTask& c = cts[i];
    c.linear = t.linear;
    c.base = t.base;
    c.base_dtype = static_cast<uint32_t>(t.base_dtype);
    c.out = t.out;
    c.out_dtype = static_cast<uint32_t>(t.out_dtype);
    c.shape = t.shape.data();
    c.rank = static_cast<uint32_t>(t.shape.size());
    c.experts = experts[i].data();
    c.num_experts = static_cast<uint32_t>(experts[i].size());
    c.sparsifier = static_cast<uint32_t>(t.sparsifier);
    c.rescale = static_cast<uint32_t>(t.rescale);
    c.consensus = static_cast<uint32_t>(t.consensus);
    c.normalize = t.normalize;
    c.lambda = t.lambda;
    c.tensor_id = t.tensor_id;
    c.seed = t.seed;
    c.digest = t.digest;
    stats[i].nonfinite.assign(t.experts.size() + 1, 0);
    stats[i].kept.assign(t.experts.size(), 0);
    cstats[i].nonfinite = stats[i].nonfinite.data();
    cstats[i].kept = stats[i].kept.data();
  }
  char err[1024] = {0};
  const int rc = g_plugin.run(ctx, cts.data(), cts.size(), cstats.data(), threads, err, sizeof err);
  if (rc != DELLA_CUDA_OK) {
    // The next call starts from a fresh context: a failed kernel can poison this one.
    g_plugin.close(g_ctx);
    g_ctx = nullptr;
    throw CudaFailure(rc, err[0] ? err : "the GPU merge failed");
  }
  for (size_t i = 0; i < tasks.size(); ++i) {
    stats[i].numel = cstats[i].numel;
    stats[i].out_nonfinite = cstats[i].out_nonfinite;
    stats[i].has_digest = cstats[i].has_digest != 0;
    stats[i].digest = cstats[i].digest;
  }
  return stats;
}

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int device = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  Plugin& p = plugin_locked();
  Napi::Object o = Napi::Object::New(env);
  o.Set("plugin", p.path);
  o.Set("pluginExists", file_exists(p.path));
  o.Set("loaded", p.handle != nullptr);
  o.Set("device", env.Null());
  if (!p.handle) {
    o.Set("ok", false);
    o.Set("code", cuda_code_name(-1));
    o.Set("error", p.error);
    return o;
  }
  if (g_ctx && g_ctx_device == device) {  // already open: describe it without a new probe
    o.Set("ok", true);
    o.Set("code", env.Null());
    o.Set("error", env.Null());
    o.Set("device", device_to_js(env, g_ctx_info));
    return o;
  }
  DellaCudaDeviceInfo d{};
  char err[1024] = {0};
  const int rc = p.probe(device, &d, err, sizeof err);
  o.Set("ok", rc == DELLA_CUDA_OK);
  o.Set("code", rc == DELLA_CUDA_OK ? env.Null() : Napi::Value(Napi::String::New(env, cuda_code_name(rc))));
  o.Set("error", rc == DELLA_CUDA_OK ? env.Null() : Napi::Value(Napi::String::New(env, err)));
  if (rc == DELLA_CUDA_OK) o.Set("device", device_to_js(env, d));
  return o;
}

namespace {

struct OpenRequest {
  int device;
  uint64_t memory;
};

OpenRequest open_request(const Napi::CallbackInfo& info, const char* name) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject())
    throw Napi::TypeError::New(env, std::string(name) + "({ device, memory }) takes an object");
  Napi::Object o = info[0].As<Napi::Object>();
  const Napi::Value dv = o.Get("device"), mv = o.Get("memory");
  const int device = dv.IsNumber() ? dv.As<Napi::Number>().Int32Value() : 0;
  const double memory = mv.IsNumber() ? mv.As<Napi::Number>().DoubleValue() : 0;
  if (device < 0 || !(memory >= 0)) throw Napi::RangeError::New(env, std::string(name) + ": bad device or memory");
  return {device, static_cast<uint64_t>(memory)};
}

// Opens (or finds open) the context; returns its description. Throws CudaFailure.
DellaCudaDeviceInfo open_device(const OpenRequest& r) {
  std::lock_guard<std::mutex> lock(g_mutex);
  context_locked(r.device, r.memory);
  return g_ctx_info;
}

}  // namespace

Napi::Value CudaOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const OpenRequest r = open_request(info, "cudaOpen");
  try {
    return device_to_js(env, open_device(r));
  } catch (const CudaFailure& f) {
    Napi::Error e = Napi::Error::New(env, f.what());
    e.Set("cudaCode", cuda_code_name(f.code));
    throw e;
  }
}

Napi::Value CudaOpenAsync(const Napi::CallbackInfo& info) {
  const OpenRequest r = open_request(info, "cudaOpenAsync");
  return PromiseWorker<DellaCudaDeviceInfo>::Start(info.Env(), "della-merge:cudaOpen", info[0].As<Napi::Object>(),
                                                   [r] { return open_device(r); }, device_to_js);
}

}  // namespace della_binding
