// Input checks and output allocation for mat_cuda::lanczos_lambda_max, shared by the CPU and
// CUDA registrations (.cpp only: uses torch).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/checks.h"
#include "linalg/lanczos.h"

namespace mat_cuda {
namespace linalg {

// K: (M, n, n) float32/float64 contiguous; v0: optional (M, n), same dtype and device.
// Returns the step budget m = min(iters, n).
inline int64_t check_lanczos_inputs(const at::Tensor& K, const c10::optional<at::Tensor>& v0_opt,
                                    int64_t iters, double tol, int64_t topk) {
  CHECK_DIM(K, 3);
  MAT_CHECK(K.size(1) == K.size(2), "K must hold square matrices (M, n, n), got shape ",
            K.sizes());
  MAT_CHECK(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble,
            "K must have dtype float32 or float64, got ", K.scalar_type());
  CHECK_CONTIGUOUS(K);
  const int64_t M = K.size(0), n = K.size(1);
  MAT_CHECK(n >= 1, "K must hold matrices of size n >= 1, got shape ", K.sizes());
  MAT_CHECK(n <= (1 << 20), "K's matrices must have n <= 2^20, got n = ", n);
  MAT_CHECK(topk >= 1 && topk <= kMaxTopk, "topk must be in [1, ", kMaxTopk, "], got ", topk);
  MAT_CHECK(topk <= n, "topk must be <= n = ", n, ", got ", topk);
  MAT_CHECK(iters >= topk, "iters must be >= topk = ", topk, ", got ", iters);
  MAT_CHECK(tol >= 0.0, "tol must be >= 0, got ", tol);
  if (v0_opt.has_value()) {
    const at::Tensor& v0 = *v0_opt;
    // (CHECK_DEVICE's parameter is named `device`: pass a variable of that name.)
    const at::Device device = K.device();
    CHECK_DEVICE(v0, device);
    CHECK_DTYPE(v0, K.scalar_type());
    CHECK_SHAPE(v0, M, n);
    CHECK_CONTIGUOUS(v0);
  }
  return iters < n ? iters : n;
}

// (lambdas (M, topk), vectors (M, n), iterations (M,) int32, residuals (M,)) on K's device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_outputs(
    const at::Tensor& K, int64_t topk) {
  const int64_t M = K.size(0), n = K.size(1);
  return {at::empty({M, topk}, K.options()), at::empty({M, n}, K.options()),
          at::empty({M}, K.options().dtype(at::kInt)), at::empty({M}, K.options())};
}

}  // namespace linalg
}  // namespace mat_cuda
