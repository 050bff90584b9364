// CUDA registration of mat_cuda::lanczos_lambda_max: checks (shared with the CPU kernel),
// device guard, current stream, the launch plan and the launcher. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "linalg/lanczos_checks.h"
#include "linalg/lanczos_launch.h"

namespace mat_cuda {
namespace linalg {
namespace {

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
  LanczosPlan plan;
  C10_CUDA_CHECK(lanczos_make_plan(K.get_device(), static_cast<int>(n), static_cast<int>(m),
                                   K.element_size(), &plan));
  MAT_CHECK(plan.base_bytes <= plan.max_smem, "lanczos_lambda_max on CUDA needs ", plan.base_bytes,
            " bytes of shared memory per block for n = ", n, ", iters = ", m,
            ", more than this device's ", plan.max_smem, ": lower iters");
  at::Tensor Q_workspace;
  if (!plan.q_in_shared) Q_workspace = at::empty({M, m, n}, K.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(K.get_device()).stream();
  const bool has_v0 = v0.has_value();
  cudaError_t err;
  if (K.scalar_type() == at::kFloat) {
    err = lanczos_launch_f32(K.data_ptr<float>(), has_v0 ? v0->data_ptr<float>() : nullptr, M, opt,
                             plan, plan.q_in_shared ? nullptr : Q_workspace.data_ptr<float>(),
                             lambdas.data_ptr<float>(), vectors.data_ptr<float>(),
                             iterations.data_ptr<int>(), residuals.data_ptr<float>(), stream);
  } else {
    err = lanczos_launch_f64(K.data_ptr<double>(), has_v0 ? v0->data_ptr<double>() : nullptr, M,
                             opt, plan, plan.q_in_shared ? nullptr : Q_workspace.data_ptr<double>(),
                             lambdas.data_ptr<double>(), vectors.data_ptr<double>(),
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
