// CUDA kernels of the Gram ops: launch, indexing and the block reduction only; the arithmetic
// is gram_tile.h, shared with the CPU kernels (which the CPU tests exercise).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "mntk/mntk_launch.h"

namespace mat_cuda {
namespace mntk {
namespace {

// One block of kCols x kRows threads per output (g, i, j) when the T x T block is large enough
// to keep a block busy: thread (x, y) sums rows y, y+kRows, ... and columns x, x+kCols, ...
// (consecutive x read consecutive floats), then the block reduces the partials.
constexpr int kCols = 32;  // one warp per thread row
constexpr int kRows = 8;
// Below this T a block would idle; one thread per output element instead.
constexpr int64_t kMinTPerBlock = 16;
constexpr int kThreads = 256;

__global__ void hadamard_block_sum_per_block(HadamardBlockSumArgs a) {
  const int64_t idx = blockIdx.x;
  const HadamardBlock blk = hadamard_block(a, idx);
  float v = hadamard_partial_sum(blk.s, a.ld, blk.r, a.ld, a.T, a.T, threadIdx.y, kRows,
                                 threadIdx.x, kCols);
  for (int off = kCols / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __shared__ float row_sums[kRows];
  if (threadIdx.x == 0) row_sums[threadIdx.y] = v;
  __syncthreads();
  if (threadIdx.y == 0) {  // the whole first warp takes part in the shuffles
    v = threadIdx.x < kRows ? row_sums[threadIdx.x] : 0.f;
    for (int off = kRows / 2; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) a.out[idx] = v;
  }
}

__global__ void hadamard_block_sum_per_thread(HadamardBlockSumArgs a, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const HadamardBlock blk = hadamard_block(a, idx);
  a.out[idx] = hadamard_partial_sum(blk.s, a.ld, blk.r, a.ld, a.T, a.T, 0, 1, 0, 1);
}

__global__ void scatter_tile_kernel(ScatterTileArgs a, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  scatter_tile_element(a, idx);
}

int64_t blocks_for(int64_t total) { return (total + kThreads - 1) / kThreads; }

}  // namespace

cudaError_t launch_hadamard_block_sum(const HadamardBlockSumArgs& args, cudaStream_t stream) {
  const int64_t total = args.G * args.rI * args.rJ;
  if (total == 0) return cudaSuccess;
  if (args.T >= kMinTPerBlock) {
    if (total > INT32_MAX) return cudaErrorInvalidConfiguration;  // gridDim.x limit
    hadamard_block_sum_per_block<<<static_cast<unsigned>(total), dim3(kCols, kRows), 0, stream>>>(
        args);
  } else {
    if (blocks_for(total) > INT32_MAX) return cudaErrorInvalidConfiguration;
    hadamard_block_sum_per_thread<<<static_cast<unsigned>(blocks_for(total)), kThreads, 0,
                                    stream>>>(args, total);
  }
  MAT_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

cudaError_t launch_scatter_tile(const ScatterTileArgs& args, cudaStream_t stream) {
  const int64_t total = args.rI * args.rJ;
  if (total == 0 || args.G == 0) return cudaSuccess;
  if (blocks_for(total) > INT32_MAX) return cudaErrorInvalidConfiguration;
  scatter_tile_kernel<<<static_cast<unsigned>(blocks_for(total)), kThreads, 0, stream>>>(args,
                                                                                         total);
  MAT_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace mntk
}  // namespace mat_cuda
