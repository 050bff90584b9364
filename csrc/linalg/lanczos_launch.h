// Host launchers of the CUDA Lanczos kernel (lanczos.cu), called by lanczos_cuda.cpp. Plain
// pointers and POD structs only: no torch here. The plan (where each block's memory lives) is
// lanczos_plan.h, a pure function the host tests run too.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "linalg/lanczos.h"
#include "linalg/lanczos_plan.h"

namespace mat_cuda {
namespace linalg {

// The device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
cudaError_t lanczos_device_smem_limit(int device, size_t* bytes);

// One block per matrix, all M matrices in one launch. K: (M, n, n); v0: (M, n) or nullptr;
// workspace: M · plan.global_bytes bytes of device memory (16-byte aligned), or nullptr when
// plan.global_bytes is 0; lambdas (M, topk); vectors (M, n); iterations (M,); residuals (M,).
cudaError_t lanczos_launch_f32(const float* K, const float* v0, int64_t M, const LanczosOptions& opt,
                               const LanczosPlan& plan, unsigned char* workspace, float* lambdas,
                               float* vectors, int* iterations, float* residuals,
                               cudaStream_t stream);
cudaError_t lanczos_launch_f64(const double* K, const double* v0, int64_t M,
                               const LanczosOptions& opt, const LanczosPlan& plan,
                               unsigned char* workspace, double* lambdas, double* vectors,
                               int* iterations, double* residuals, cudaStream_t stream);

}  // namespace linalg
}  // namespace mat_cuda
