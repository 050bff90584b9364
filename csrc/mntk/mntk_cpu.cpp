// CPU kernels of the Gram ops: the two custom kernels of gram_tile.h as at::parallel_for loops,
// and the op registrations (the orchestration is gram_driver.h, shared with CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mntk/gram_driver.h"
#include "mntk/gram_tile.h"

namespace mat_cuda {
namespace mntk {
namespace {

void hadamard_block_sum_cpu(const at::Tensor& S, const at::Tensor& R, int64_t T, at::Tensor& out) {
  const at::Tensor Sc = S.contiguous(), Rc = R.contiguous();
  HadamardBlockSumArgs a{Sc.data_ptr<float>(), Rc.data_ptr<float>(), out.data_ptr<float>(),
                         Sc.size(1), Rc.size(1) * Rc.size(2), T,
                         out.size(0), out.size(1), out.size(2)};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(T * T, 1));
  at::parallel_for(0, a.G * a.rI * a.rJ, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const HadamardBlock blk = hadamard_block(a, idx);
      a.out[idx] = hadamard_partial_sum(blk.s, a.ld, blk.r, a.ld, T, T, 0, 1, 0, 1);
    }
  });
}

void scatter_tile_cpu(at::Tensor& K, const at::Tensor& tile, const at::Tensor& group_module,
                      int64_t i0, int64_t j0, bool mirror, double scale) {
  const at::Tensor tc = tile.contiguous(), gm = group_module.contiguous();
  ScatterTileArgs a{K.data_ptr<float>(), tc.data_ptr<float>(), gm.data_ptr<int64_t>(),
                    K.size(0), K.size(1), tc.size(0), tc.size(1), tc.size(2), i0, j0, mirror,
                    static_cast<float>(scale)};
  at::parallel_for(0, a.rI * a.rJ, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) scatter_tile_element(a, idx);
  });
}

const GramKernels kCpuKernels{hadamard_block_sum_cpu, scatter_tile_cpu};

void linear_gram_cpu(at::Tensor K, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& group_module, int64_t group_dim, int64_t group_size,
                     bool weight, bool bias, double scale, int64_t algorithm,
                     int64_t workspace_bytes, const std::optional<at::Tensor>& workspace) {
  linear_gram(kCpuKernels, K, A, B, group_module, group_dim, group_size, weight, bias, scale,
              algorithm, workspace_bytes, workspace);
}

void embedding_gram_cpu(at::Tensor K, const at::Tensor& indices, const at::Tensor& B,
                        int64_t module, std::optional<int64_t> padding_idx, double scale,
                        int64_t algorithm, int64_t workspace_bytes, int64_t num_embeddings) {
  embedding_gram(kCpuKernels, K, indices, B, module, padding_idx, scale, algorithm,
                 workspace_bytes, num_embeddings);
}

void sample_gram_cpu(at::Tensor K, const at::Tensor& G, const at::Tensor& group_module,
                     int64_t group_size, double scale) {
  sample_gram(kCpuKernels, K, G, group_module, group_size, scale);
}

}  // namespace
}  // namespace mntk
}  // namespace mat_cuda

TORCH_LIBRARY_IMPL(mat_cuda, CPU, m) {
  m.impl("linear_gram_", &mat_cuda::mntk::linear_gram_cpu);
  m.impl("embedding_gram_", &mat_cuda::mntk::embedding_gram_cpu);
  m.impl("sample_gram_", &mat_cuda::mntk::sample_gram_cpu);
}
