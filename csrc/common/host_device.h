// Arithmetic shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// Per-element and per-matrix math lives in MAT_HD inline functions in headers that both the
// *_cpu.cpp and the *.cu of a kernel family include, so the CPU tests exercise the very
// arithmetic the GPU runs. This header must stay includable without torch and without CUDA.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MAT_HD __host__ __device__ __forceinline__
#define MAT_DEVICE __device__ __forceinline__
#else
#define MAT_HD inline
#define MAT_DEVICE inline
#endif
