# Cross-compiling for linux-arm64 (aarch64: AWS Graviton, Ampere, NVIDIA Grace) from an
# x86-64 machine with Debian's cross compiler (apt-get install g++-aarch64-linux-gnu).
# Used by scripts/arm64-check.sh and, through scripts/prebuild-shim.js, by the release
# build of prebuilds/linux-arm64. DELLA_CROSS_PREFIX names another compiler prefix.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
if(DEFINED ENV{DELLA_CROSS_PREFIX})
  set(della_prefix $ENV{DELLA_CROSS_PREFIX})
else()
  set(della_prefix aarch64-linux-gnu-)
endif()
set(CMAKE_C_COMPILER ${della_prefix}gcc)
set(CMAKE_CXX_COMPILER ${della_prefix}g++)
set(CMAKE_STRIP ${della_prefix}strip)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# ctest runs the test programs under qemu-user where it is installed.
find_program(DELLA_QEMU_AARCH64 qemu-aarch64)
if(DELLA_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${DELLA_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu)
endif()
# No CUDA plugin unless asked for: an x86-64 toolkit's nvcc builds arm64 plugins only
# with arm64 runtime libraries (CUDA12_TARGET=arm64 scripts/cuda12-toolkit.sh makes such
# a toolkit): -DDELLA_CUDA=ON with CUDACXX=/opt/cuda-12.4-sbsa/bin/nvcc.
set(DELLA_CUDA OFF CACHE BOOL "Build the CUDA plugin when a CUDA toolkit is found")
set(CMAKE_CUDA_HOST_COMPILER ${della_prefix}g++)
