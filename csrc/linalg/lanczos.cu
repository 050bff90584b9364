// CUDA kernel of mat_cuda::lanczos_lambda_max: one thread block per matrix, all matrices in
// one launch, no host synchronisation. The block is the `Team` of the shared driver
// (lanczos.h): it cooperates on the matvecs, dot products and Gram–Schmidt updates; the
// tridiagonal solve runs on thread 0. Where each block's memory lives (shared, or its slice of
// a global workspace when n or iters is too large) is lanczos_plan.h.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "linalg/lanczos.h"
#include "linalg/lanczos_launch.h"

namespace mat_cuda {
namespace linalg {
namespace {

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The thread block as a Lanczos team (interface in lanczos.h). blockDim.x is a multiple of 32.
template <typename S>
struct BlockTeam {
  double* red;  // (32) shared partial sums, one per warp

  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void sync() const { __syncthreads(); }

  // In double: a few per step (α and norms), and squared norms of float32 vectors must
  // neither overflow nor underflow.
  __device__ double dot(const S* x, const S* y, int n) const {
    double v = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      v += static_cast<double>(x[i]) * static_cast<double>(y[i]);
    }
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    // Every thread sums the per-warp partials in the same order: the same value everywhere.
    double total = 0.0;
    const int nwarps = blockDim.x >> 5;
    for (int w = 0; w < nwarps; ++w) total += red[w];
    __syncthreads();  // red is reused by the next reduction
    return total;
  }

  // One warp per row; the lanes stride along the row (coalesced: A is row-major).
  __device__ void gemv(const S* A, int rows, int cols, const S* x, S* y) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int r = warp; r < rows; r += nwarps) {
      const S* a = A + static_cast<int64_t>(r) * cols;
      S v = S(0);
      for (int c = lane; c < cols; c += 32) v += a[c] * x[c];
      v = warp_sum(v);
      if (lane == 0) y[r] = v;
    }
    __syncthreads();
  }

  __device__ void sub_combination(const S* Q, int rows, int n, const S* c, S* w) const {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      S acc = w[i];
      for (int r = 0; r < rows; ++r) acc -= c[r] * Q[static_cast<int64_t>(r) * n + i];
      w[i] = acc;
    }
    __syncthreads();
  }

  __device__ void combination(const S* Q, int rows, int n, const double* s, S* y) const {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      S acc = S(0);
      for (int r = 0; r < rows; ++r) acc += static_cast<S>(s[r]) * Q[static_cast<int64_t>(r) * n + i];
      y[i] = acc;
    }
    __syncthreads();
  }
};

template <typename S, bool kBaseShared>
__global__ void lanczos_kernel(const S* __restrict__ K, const S* __restrict__ v0,
                               LanczosOptions opt, LanczosPlan plan, unsigned char* workspace,
                               S* lambdas, S* vectors, int* iterations, S* residuals) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  const int n = opt.n;
  unsigned char* gmem = workspace != nullptr ? workspace + b * static_cast<int64_t>(plan.global_bytes)
                                             : nullptr;
  LanczosScratch<S> sc;
  S* k_copy = lanczos_carve<S, kBaseShared>(plan, smem, gmem, &sc);
  const S* Kb = K + b * n * n;
  if (k_copy != nullptr) {
    const int64_t nn = static_cast<int64_t>(n) * n;
    for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) k_copy[i] = Kb[i];
    __syncthreads();
    Kb = k_copy;
  }
  BlockTeam<S> team{lanczos_red_slots(plan, smem)};
  lanczos_matrix<S>(team, Kb, v0 != nullptr ? v0 + b * n : nullptr, opt, sc,
                    lambdas + b * opt.topk, vectors + b * n, iterations + b, residuals + b);
}

template <typename S>
cudaError_t launch(const S* K, const S* v0, int64_t M, const LanczosOptions& opt,
                   const LanczosPlan& plan, unsigned char* workspace, S* lambdas, S* vectors,
                   int* iterations, S* residuals, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  if (M > 2147483647LL) return cudaErrorInvalidConfiguration;
  if (plan.global_bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  // Two instantiations (lanczos_plan.h, lanczos_base_shared): each launched by name.
  const unsigned grid = static_cast<unsigned>(M);
  if (lanczos_base_shared(plan)) {
    if (plan.smem_bytes > 48 * 1024) {
      MAT_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(lanczos_kernel<S, true>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(plan.smem_bytes)));
    }
    lanczos_kernel<S, true><<<grid, plan.block, plan.smem_bytes, stream>>>(
        K, v0, opt, plan, workspace, lambdas, vectors, iterations, residuals);
  } else {
    if (plan.smem_bytes > 48 * 1024) {
      MAT_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(lanczos_kernel<S, false>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    static_cast<int>(plan.smem_bytes)));
    }
    lanczos_kernel<S, false><<<grid, plan.block, plan.smem_bytes, stream>>>(
        K, v0, opt, plan, workspace, lambdas, vectors, iterations, residuals);
  }
  MAT_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace

cudaError_t lanczos_device_smem_limit(int device, size_t* bytes) {
  int max_optin = 0;
  MAT_RETURN_IF_CUDA_ERROR(
      cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  *bytes = static_cast<size_t>(max_optin);
  return cudaSuccess;
}

cudaError_t lanczos_launch_f32(const float* K, const float* v0, int64_t M, const LanczosOptions& opt,
                               const LanczosPlan& plan, unsigned char* workspace, float* lambdas,
                               float* vectors, int* iterations, float* residuals,
                               cudaStream_t stream) {
  return launch<float>(K, v0, M, opt, plan, workspace, lambdas, vectors, iterations, residuals,
                       stream);
}

cudaError_t lanczos_launch_f64(const double* K, const double* v0, int64_t M,
                               const LanczosOptions& opt, const LanczosPlan& plan,
                               unsigned char* workspace, double* lambdas, double* vectors,
                               int* iterations, double* residuals, cudaStream_t stream) {
  return launch<double>(K, v0, M, opt, plan, workspace, lambdas, vectors, iterations, residuals,
                        stream);
}

}  // namespace linalg
}  // namespace mat_cuda
