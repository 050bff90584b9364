// Host launchers of the CUDA Lanczos kernel (lanczos.cu), called by lanczos_cuda.cpp. Plain
// pointers and POD structs only: no torch here.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "linalg/lanczos.h"

namespace mat_cuda {
namespace linalg {

// Where one block's data lives. Shared memory always holds the tridiagonal and the small
// vectors ("base"); then the Lanczos basis Q (m×n) if it fits, then K (n×n) if it also fits
// (else K is streamed from global memory through L1/L2 at every matvec).
struct LanczosPlan {
  int block;           // threads per block
  size_t base_bytes;   // shared memory that must fit
  size_t smem_bytes;   // dynamic shared memory of the launch
  size_t max_smem;     // the device's opt-in limit per block
  bool q_in_shared;    // else the caller passes a global Q workspace of M·m·n elements
  bool k_in_shared;
};

// Fills `plan` for matrices of size n, budget m and element size elem_bytes (4 or 8) on `device`.
cudaError_t lanczos_make_plan(int device, int n, int m, size_t elem_bytes, LanczosPlan* plan);

// One block per matrix, all M matrices in one launch. K: (M, n, n); v0: (M, n) or nullptr;
// Q_global: (M, m, n) or nullptr when plan.q_in_shared; lambdas (M, topk); vectors (M, n);
// iterations (M,); residuals (M,).
cudaError_t lanczos_launch_f32(const float* K, const float* v0, int64_t M, const LanczosOptions& opt,
                               const LanczosPlan& plan, float* Q_global, float* lambdas,
                               float* vectors, int* iterations, float* residuals,
                               cudaStream_t stream);
cudaError_t lanczos_launch_f64(const double* K, const double* v0, int64_t M,
                               const LanczosOptions& opt, const LanczosPlan& plan, double* Q_global,
                               double* lambdas, double* vectors, int* iterations,
                               double* residuals, cudaStream_t stream);

}  // namespace linalg
}  // namespace mat_cuda
