// CUDA registration of mat_cuda::lanczos_lambda_max: checks (shared with the CPU kernel),
// device guard, current stream, the launch plan (lanczos_plan.h: shared memory where it fits,
// else a global workspace) and the launcher. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "linalg/lanczos_checks.h"
#include "linalg/lanczos_launch.h"

namespace mat_cuda {
namespace linalg {
namespace {

// MAT_CUDA_LANCZOS_SMEM_LIMIT=<bytes> lowers the shared-memory budget of the plan below the
// device's, so that the global-memory placements (lanczos_plan.h) can be tested on any GPU
// (tests/test_linalg_lanczos.py, scripts/gpu_check.sh). Unset: no cap.
size_t smem_budget_override() {
  const char* v = std::getenv("MAT_CUDA_LANCZOS_SMEM_LIMIT");
  if (v == nullptr || *v == '\0') return SIZE_MAX;
  char* end = nullptr;
  const unsigned long long bytes = std::strtoull(v, &end, 10);
  MAT_CHECK(end != nullptr && *end == '\0', "MAT_CUDA_LANCZOS_SMEM_LIMIT must be a byte count, got '",
            v, "'");
  return static_cast<size_t>(bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_lambda_max_cuda(
    const at::Tensor& K, int64_t iters, double tol, const c10::optional<at::Tensor>& v0,
    int64_t topk, int64_t seed) {
  MAT_CHECK(K.is_cuda(), "K must be a CUDA tensor, got ", K.device());
  const int64_t m = check_lanczos_inputs(K, v0, iters, tol, topk);
  const c10::cuda::CUDAGuard guard(K.device());
  auto [lambdas, vectors, iterations, residuals] = lanczos_outputs(K, topk);
  const int64_t M = K.size(0), n = K.size(1);
  if (M == 0) return {lambdas, vectors, iterations, residuals};
  MAT_CHECK(M <= 2147483647LL, "K may hold at most 2^31 - 1 matrices on CUDA, got ", M);
  const LanczosOptions opt{static_cast<int>(n), static_cast<int>(m), static_cast<int>(topk), tol,
                           static_cast<uint64_t>(seed)};
  size_t max_smem = 0;
  C10_CUDA_CHECK(lanczos_device_smem_limit(K.get_device(), &max_smem));
  const size_t budget = std::min(max_smem, smem_budget_override());
  LanczosPlan plan;
  MAT_CHECK(lanczos_make_plan(static_cast<int>(n), static_cast<int>(m), K.element_size(), budget,
                              &plan),
            "lanczos_lambda_max on CUDA needs ", lanczos_fixed_bytes(), " bytes of shared memory "
            "per block (its reduction and control scratch), more than the ", budget,
            " bytes available (device limit ", max_smem, ", MAT_CUDA_LANCZOS_SMEM_LIMIT ",
            std::getenv("MAT_CUDA_LANCZOS_SMEM_LIMIT") ? std::getenv("MAT_CUDA_LANCZOS_SMEM_LIMIT")
                                                       : "unset", ")");
  // The regions that do not fit in shared memory: one slice of plan.global_bytes per matrix.
  at::Tensor workspace;
  if (plan.global_bytes > 0) {
    workspace = at::empty({M * static_cast<int64_t>(plan.global_bytes)}, K.options().dtype(at::kByte));
  }
  unsigned char* ws = workspace.defined() ? workspace.data_ptr<unsigned char>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(K.get_device()).stream();
  const bool has_v0 = v0.has_value();
  cudaError_t err;
  if (K.scalar_type() == at::kFloat) {
    err = lanczos_launch_f32(K.data_ptr<float>(), has_v0 ? v0->data_ptr<float>() : nullptr, M, opt,
                             plan, ws, lambdas.data_ptr<float>(), vectors.data_ptr<float>(),
                             iterations.data_ptr<int>(), residuals.data_ptr<float>(), stream);
  } else {
    err = lanczos_launch_f64(K.data_ptr<double>(), has_v0 ? v0->data_ptr<double>() : nullptr, M,
                             opt, plan, ws, lambdas.data_ptr<double>(), vectors.data_ptr<double>(),
                             iterations.data_ptr<int>(), residuals.data_ptr<double>(), stream);
  }
  C10_CUDA_CHECK(err);
  return {lambdas, vectors, iterations, residuals};
}

}  // namespace

TORCH_LIBRARY_IMPL(mat_cuda, CUDA, m) {
  m.impl("lanczos_lambda_max", &lanczos_lambda_max_cuda);
}

}  // namespace linalg
}  // namespace mat_cuda
