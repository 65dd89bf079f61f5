// The CUDA plugin as the addon sees it: a shared library found beside the addon (or at
// $DELLA_CUDA_PLUGIN), loaded with dlopen() only when a GPU is asked for. No CUDA
// headers or libraries here: the addon never links CUDA. No math either: this file
// marshals MergeTask into the plugin's C structs.
#pragma once
#include <napi.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/merge_cpu.h"

namespace della_binding {

// An error of the CUDA path, with the plugin's code (della_cuda_api.h) or -1 when the
// plugin itself could not be loaded.
struct CudaFailure : std::runtime_error {
  CudaFailure(int c, const std::string& what) : std::runtime_error(what), code(c) {}
  int code;
};

// Merges on device `device` with a device memory budget (0: the plugin's default),
// through a context kept open between calls. Throws CudaFailure.
std::vector<della::MergeStats> cuda_run_batch(int device, uint64_t memory, const std::vector<della::MergeTask>& tasks,
                                              unsigned threads);

// cudaInfo(device) -> { plugin, pluginExists, loaded, ok, code, error, device }: never throws.
Napi::Value CudaInfo(const Napi::CallbackInfo& info);
// cudaOpen({ device, memory }) -> device description; throws an Error with `cudaCode`
// ('E_NO_PLUGIN', 'E_NO_DEVICE', 'E_OUT_OF_MEMORY', 'E_CUDA') when the device cannot be used.
Napi::Value CudaOpen(const Napi::CallbackInfo& info);
// cudaOpenAsync({ device, memory }) -> Promise of the same, opened on a worker thread, so
// that the caller can set up the rest of a merge while CUDA creates its context
// (a third of a second on an H100); rejects as cudaOpen throws.
Napi::Value CudaOpenAsync(const Napi::CallbackInfo& info);

// The JS name of a CudaFailure code: 'E_NO_PLUGIN', 'E_NO_DEVICE', 'E_OUT_OF_MEMORY', 'E_CUDA'.
const char* cuda_code_name(int code);

}  // namespace della_binding
