// An emulated CUDA device on the CPU, for checking the CUDA backend's kernels and
// pipeline on machines without a GPU (see README.md here). The plugin's sources compile
// as plain C++ against this header in place of the toolkit's cuda_runtime.h: each CUDA
// thread of a block runs as a fiber on one host thread, __syncthreads() and
// the warp intrinsics are barriers between those fibers, and streams run their work in
// order, as late as they may: when the host waits for the stream (or an event on it),
// frees memory, or destroys the stream, so that host code that reads results or reuses
// buffers without waiting sees it (DELLA_CUDA_EMU_STREAMS=immediate runs each operation
// when it is enqueued instead). What it checks: the kernels' indexing, shared
// memory use, barriers and host logic, against the CPU kernels, bit for bit. What it
// cannot: the device compiler's code (contraction, division), timing, streams running
// side by side, and memory faults inside one allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define DELLA_CUDA_EMU 1

// Qualifiers: every function is a host function; a block's shared variables are one per
// host thread (a block's fibers all run on the thread that launched it).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// ---------------------------------------------------------------- runtime types

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorDevicesUnavailable = 46,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorHostMemoryAlreadyRegistered = 712,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorCompatNotSupportedOnDevice = 805,
};
using cudaError = cudaError_t;

enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;
constexpr unsigned cudaHostRegisterDefault = 0;
constexpr unsigned cudaHostRegisterReadOnly = 8;

struct CUstream_st;
struct CUevent_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;

struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---------------------------------------------------------------- runtime API

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaHostRegister(void* p, size_t bytes, unsigned flags);
cudaError_t cudaHostUnregister(void* p);
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
template <class T>
cudaError_t cudaMallocHost(T** p, size_t bytes) {
  return cudaMallocHost(reinterpret_cast<void**>(p), bytes);
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);

cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b);

namespace della_emu {
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value);
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return della_emu::set_func_attribute(reinterpret_cast<const void*>(func), attr, value);
}

// ---------------------------------------------------------------- device side

namespace della_emu {

struct ThreadPos {
  dim3 thread, block, block_dim, grid_dim;
};
const ThreadPos& pos();        // of the fiber running now
unsigned char* dynamic_smem();  // the running block's dynamic shared memory
void syncthreads();
// Lane values of a warp-synchronous exchange: every lane in `mask` deposits v and waits;
// returns the value lane `src` deposited.
uint32_t warp_exchange(unsigned mask, uint32_t v, int src);
// On entering a block collective (cub_emu.h): the first thread of the block to enter it
// fills its temporary storage with garbage, as the device's collective may write any of
// it from then on, so that a thread still reading those bytes (a missing barrier) sees it.
void collective_enter(void* storage, size_t bytes);
// A kernel did what the device would fault on: says what and where, and ends the process.
[[noreturn]] void kernel_fault(const char* what);

// Queues f on stream s (the device-wide algorithms of cub_emu.h use it).
void enqueue(cudaStream_t s, std::function<void()> f);
// Checks the launch configuration as the device would (a refused launch sets the error
// cudaGetLastError returns), then queues the grid on s: body() as every thread of every
// block.
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s, std::function<void()> body);

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <class... A>
  void operator()(A&&... a) const {
    // The arguments are copied when the kernel is launched, as the device's are.
    auto args = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(a)...);
    void (*k)(P...) = kernel;
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
           [k, args] { std::apply(k, *args); });  // by value, per thread, as kernel parameters
  }
};
template <class... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s) {
  return Launcher<P...>{kernel, grid, block, smem, s};
}

}  // namespace della_emu

#define threadIdx (::della_emu::pos().thread)
#define blockIdx (::della_emu::pos().block)
#define blockDim (::della_emu::pos().block_dim)
#define gridDim (::della_emu::pos().grid_dim)

inline void __syncthreads() { della_emu::syncthreads(); }

// Lanes converge only where the code says so (__syncwarp, *_sync): the emulation's
// active mask is the calling lane alone, which the device may also report.
inline unsigned __activemask() { return 1u << (threadIdx.x & 31); }
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  unsigned same = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane) & 1u)
      if (della_emu::warp_exchange(mask, v, lane) == v) same |= 1u << lane;
  return same;
}
inline unsigned __shfl_down_sync(unsigned mask, unsigned v, int delta) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  return della_emu::warp_exchange(mask, v, lane + delta < 32 ? lane + delta : lane);
}
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
template <class T>
inline T atomicAdd(T* p, T v) {
  static_assert(std::is_integral<T>::value, "integer atomics only");
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
