// Host launchers of the Gram CUDA kernels (mntk.cu), called from mntk_cuda.cpp. Plain C++ types
// and cuda_runtime.h only, so the .cu includes no torch header.
#pragma once

#include <cuda_runtime.h>

#include "mntk/gram_tile.h"

namespace mat_cuda {
namespace mntk {

// out[g, i, j] = Σ_{t,s<T} S ∘ R over the (i, j) block (see HadamardBlockSumArgs).
cudaError_t launch_hadamard_block_sum(const HadamardBlockSumArgs& args, cudaStream_t stream);

// K[group_module[g], i0+i, j0+j] += scale · tile[g, i, j] (see ScatterTileArgs).
cudaError_t launch_scatter_tile(const ScatterTileArgs& args, cudaStream_t stream);

}  // namespace mntk
}  // namespace mat_cuda
