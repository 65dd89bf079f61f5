// The CUDA backend's cuda_kernels, compiled as C++ for the emulated device (cuda_runtime.h here).
#include "../../src/cuda/cuda_kernels.cu"
