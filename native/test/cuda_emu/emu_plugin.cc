// The CUDA backend's plugin, compiled as C++ for the emulated device (cuda_runtime.h here).
#include "../../src/cuda/plugin.cu"
