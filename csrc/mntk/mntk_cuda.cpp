// CUDA registration of the Gram ops: the two custom kernels behind GramKernels (launched on the
// current stream, no host synchronisation), the orchestration of gram_driver.h (cuBLAS GEMMs
// through ATen), and TORCH_LIBRARY_IMPL(mat_cuda, CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mntk/gram_driver.h"
#include "mntk/mntk_launch.h"

namespace mat_cuda {
namespace mntk {
namespace {

void hadamard_block_sum_cuda(const at::Tensor& S, const at::Tensor& R, int64_t T, at::Tensor& out) {
  const at::Tensor Sc = S.contiguous(), Rc = R.contiguous();
  const HadamardBlockSumArgs a{Sc.data_ptr<float>(), Rc.data_ptr<float>(), out.data_ptr<float>(),
                               Sc.size(1), Rc.size(1) * Rc.size(2), T,
                               out.size(0), out.size(1), out.size(2)};
  C10_CUDA_CHECK(launch_hadamard_block_sum(a, c10::cuda::getCurrentCUDAStream()));
}

void scatter_tile_cuda(at::Tensor& K, const at::Tensor& tile, const at::Tensor& group_module,
                       int64_t i0, int64_t j0, bool mirror, double scale) {
  const at::Tensor tc = tile.contiguous(), gm = group_module.contiguous();
  const ScatterTileArgs a{K.data_ptr<float>(), tc.data_ptr<float>(), gm.data_ptr<int64_t>(),
                          K.size(0), K.size(1), tc.size(0), tc.size(1), tc.size(2), i0, j0,
                          mirror, static_cast<float>(scale)};
  C10_CUDA_CHECK(launch_scatter_tile(a, c10::cuda::getCurrentCUDAStream()));
}

const GramKernels kCudaKernels{hadamard_block_sum_cuda, scatter_tile_cuda};

void linear_gram_cuda(at::Tensor K, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& group_module, int64_t group_dim, int64_t group_size,
                      bool weight, bool bias, double scale, int64_t algorithm,
                      int64_t workspace_bytes, const std::optional<at::Tensor>& workspace) {
  const c10::cuda::CUDAGuard guard(K.device());
  linear_gram(kCudaKernels, K, A, B, group_module, group_dim, group_size, weight, bias, scale,
              algorithm, workspace_bytes, workspace);
}

void embedding_gram_cuda(at::Tensor K, const at::Tensor& indices, const at::Tensor& B,
                         int64_t module, std::optional<int64_t> padding_idx, double scale,
                         int64_t algorithm, int64_t workspace_bytes, int64_t num_embeddings) {
  const c10::cuda::CUDAGuard guard(K.device());
  embedding_gram(kCudaKernels, K, indices, B, module, padding_idx, scale, algorithm,
                 workspace_bytes, num_embeddings);
}

void sample_gram_cuda(at::Tensor K, const at::Tensor& G, const at::Tensor& group_module,
                      int64_t group_size, double scale) {
  const c10::cuda::CUDAGuard guard(K.device());
  sample_gram(kCudaKernels, K, G, group_module, group_size, scale);
}

}  // namespace
}  // namespace mntk
}  // namespace mat_cuda

TORCH_LIBRARY_IMPL(mat_cuda, CUDA, m) {
  m.impl("linear_gram_", &mat_cuda::mntk::linear_gram_cuda);
  m.impl("embedding_gram_", &mat_cuda::mntk::embedding_gram_cuda);
  m.impl("sample_gram_", &mat_cuda::mntk::sample_gram_cuda);
}
