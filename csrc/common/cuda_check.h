// Error handling for .cu launchers, which include no torch header: a launcher returns the
// cudaError_t of its last launch and the g++-compiled registration code turns it into a
// c10::Error (C10_CUDA_CHECK). Launch failures are never ignored.
#pragma once

#include <cuda_runtime.h>

#define MAT_RETURN_IF_CUDA_ERROR(expr)   \
  do {                                   \
    cudaError_t mat_err__ = (expr);      \
    if (mat_err__ != cudaSuccess) return mat_err__; \
  } while (0)

// After every <<<...>>> launch.
#define MAT_RETURN_IF_LAUNCH_FAILED() MAT_RETURN_IF_CUDA_ERROR(cudaGetLastError())
