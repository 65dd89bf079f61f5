/* The CUDA plugin's C ABI: what the core addon (native/src/binding/cuda_plugin.cc)
 * finds with dlsym in della_merge_cuda.so. Plain C structs mirroring MergeTask, so
 * that the addon and the plugin share no C++ types. Bump DELLA_CUDA_ABI_VERSION on
 * any change to this file: the addon refuses a plugin of another version. */
#ifndef DELLA_CUDA_API_H
#define DELLA_CUDA_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DELLA_CUDA_ABI_VERSION 3

/* Return codes of the plugin's functions. */
#define DELLA_CUDA_OK 0
#define DELLA_CUDA_ERROR 1         /* anything else: the message says what */
#define DELLA_CUDA_OUT_OF_MEMORY 2 /* device (or pinned host) memory ran out */
#define DELLA_CUDA_NO_DEVICE 3     /* no driver, no GPU, or no such device index */

typedef struct DellaCudaDeviceInfo {
  char name[256];
  int index;
  int count;                /* CUDA devices visible */
  int major, minor;         /* compute capability */
  int runtime_version;      /* cudaRuntimeGetVersion, e.g. 13000 */
  int driver_version;       /* cudaDriverGetVersion, 0 without a driver */
  uint64_t total_memory;    /* bytes */
  uint64_t free_memory;     /* bytes, when probed */
  int multiprocessors;
} DellaCudaDeviceInfo;

typedef struct DellaCudaExpert {
  const void* data;         /* host pointer (a memory map): numel(shape) elements */
  uint32_t dtype;           /* della::DType */
  const int64_t* shape;     /* rank entries: equal to the task's, or larger in every dimension */
  float weight;             /* f32(w_k) */
  double density, epsilon, gamma;
} DellaCudaExpert;

typedef struct DellaCudaTask {
  int linear;               /* 1: no base, out = fuse(w_k * X_k) */
  const void* base;         /* host pointer, NULL when linear */
  uint32_t base_dtype;
  void* out;                /* host pointer (the output file's map) */
  uint32_t out_dtype;
  const int64_t* shape;
  uint32_t rank;
  const DellaCudaExpert* experts;
  uint32_t num_experts;
  uint32_t sparsifier, rescale, consensus; /* della::Sparsifier, Rescale, Consensus */
  int normalize;
  double lambda;
  uint32_t tensor_id;
  uint64_t seed;
  int digest;               /* 1: also return the output's XXH64 (DellaCudaStats.digest) */
} DellaCudaTask;

typedef struct DellaCudaStats {
  uint64_t* nonfinite;      /* num_experts + 1 entries, filled by the plugin */
  uint64_t* kept;           /* num_experts entries */
  uint64_t out_nonfinite;   /* merged values stored as NaN or infinity (overflow) */
  uint64_t numel;
  int has_digest;           /* the task asked for its digest: */
  uint64_t digest;          /* XXH64 (seed 0) of the output tensor's bytes */
} DellaCudaStats;

typedef struct DellaCudaOptions {
  int device;               /* CUDA device index */
  uint64_t memory_budget;   /* device bytes the plugin may allocate; 0: the default */
  uint32_t host_threads;    /* threads for staging copies into pinned memory */
} DellaCudaOptions;

typedef struct DellaCudaContext DellaCudaContext;

typedef int (*della_cuda_abi_version_fn)(void);
typedef int (*della_cuda_probe_fn)(int device, DellaCudaDeviceInfo* info, char* err, size_t errlen);
typedef DellaCudaContext* (*della_cuda_open_fn)(const DellaCudaOptions* options, DellaCudaDeviceInfo* info, int* code,
                                                 char* err, size_t errlen);
typedef int (*della_cuda_run_fn)(DellaCudaContext* ctx, const DellaCudaTask* tasks, size_t count, DellaCudaStats* stats,
                                 uint32_t host_threads, char* err, size_t errlen);
typedef void (*della_cuda_close_fn)(DellaCudaContext* ctx);

/* DELLA_CUDA_ABI_VERSION of the plugin. */
int della_cuda_abi_version(void);
/* Describes device `device`; DELLA_CUDA_NO_DEVICE with the runtime's reason when there
 * is no driver, no GPU or no such index. Allocates nothing on the device. */
int della_cuda_probe(int device, DellaCudaDeviceInfo* info, char* err, size_t errlen);
/* Opens a device and allocates its streams and device memory (the budget), or returns
 * NULL with *code and the reason. */
DellaCudaContext* della_cuda_open(const DellaCudaOptions* options, DellaCudaDeviceInfo* info, int* code, char* err,
                                  size_t errlen);
/* Runs merge tasks (host pointers in, host pointers out) on an open context. Results are
 * bit for bit those of della::run_batch. One call at a time per context. */
int della_cuda_run(DellaCudaContext* ctx, const DellaCudaTask* tasks, size_t count, DellaCudaStats* stats,
                   uint32_t host_threads, char* err, size_t errlen);
void della_cuda_close(DellaCudaContext* ctx);

#ifdef __cplusplus
}
#endif

#endif
