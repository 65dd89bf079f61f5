// The CUDA backend's cuda_context, compiled as C++ for the emulated device (cuda_runtime.h here).
#include "../../src/cuda/cuda_context.cu"
