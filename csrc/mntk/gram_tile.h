// Arithmetic of the Gram kernels, shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// Two custom kernels complete what the GEMMs (at::mm / at::bmm, called from the driver) do:
//  * the ghost form's reduction: for a tile of sample pairs (i, j), the sum over positions
//    (t, s) of the Hadamard product of the shared factor's Gram S and each group's Gram R;
//  * the scatter of per-group Gram tiles into K by group -> module id (several groups may feed
//    one module: a head's Q, K and V slices), mirrored into the lower triangle for
//    off-diagonal tiles.
// Each output element is owned by one CPU iteration / one GPU thread (or block), which loops
// over groups itself: no atomics, deterministic sums. No torch, no CUDA headers.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace mat_cuda {
namespace mntk {

// out[g, i, j] = Σ_{t<T, s<T} S[i·T+t, j·T+s] · R[g, i·T+t, j·T+s]
// S: (rI·T, rJ·T) row stride ld; R: (G, rI·T, rJ·T) row stride ld, batch stride r_batch;
// out: (G, rI, rJ) contiguous. All float32.
struct HadamardBlockSumArgs {
  const float* S;
  const float* R;
  float* out;
  int64_t ld;
  int64_t r_batch;
  int64_t T;
  int64_t G, rI, rJ;
};

// K[m, i0+i, j0+j] += scale · tile[g, i, j] for every g with m = group_module[g] in [0, M)
// (and K[m, j0+j, i0+i] too when mirror). K: (M, n, n) contiguous; tile: (G, rI, rJ) contiguous.
struct ScatterTileArgs {
  float* K;
  const float* tile;
  const int64_t* group_module;
  int64_t M, n;
  int64_t G, rI, rJ;
  int64_t i0, j0;
  bool mirror;
  float scale;
};

// Partial sum of a[r·lda + c] · b[r·ldb + c] over rows r = r0, r0+r_step, ... < rows and
// columns c = c0, c0+c_step, ... < cols. The CPU calls it with steps of 1 (the whole block, 8
// independent accumulators so the compiler can vectorise); a GPU block with its thread's offsets
// and strides, then reduces the partials.
MAT_HD float hadamard_partial_sum(const float* a, int64_t lda, const float* b, int64_t ldb,
                                  int64_t rows, int64_t cols, int64_t r0, int64_t r_step,
                                  int64_t c0, int64_t c_step) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t r = r0; r < rows; r += r_step) {
    const float* ar = a + r * lda;
    const float* br = b + r * ldb;
    int64_t c = c0;
    for (; c + 7 * c_step < cols; c += 8 * c_step) {
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int k = 0; k < 8; ++k) acc[k] += ar[c + k * c_step] * br[c + k * c_step];
    }
    for (; c < cols; c += c_step) acc[0] += ar[c] * br[c];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Start of the (i, j) block of group g in S and R, for output index idx = (g·rI + i)·rJ + j.
struct HadamardBlock {
  const float* s;
  const float* r;
};

MAT_HD HadamardBlock hadamard_block(const HadamardBlockSumArgs& a, int64_t idx) {
  const int64_t j = idx % a.rJ;
  const int64_t i = (idx / a.rJ) % a.rI;
  const int64_t g = idx / (a.rJ * a.rI);
  const int64_t offset = i * a.T * a.ld + j * a.T;
  return HadamardBlock{a.S + offset, a.R + g * a.r_batch + offset};
}

// One element of the scatter: the (i, j) of the tile, idx = i·rJ + j, all groups.
MAT_HD void scatter_tile_element(const ScatterTileArgs& a, int64_t idx) {
  const int64_t i = idx / a.rJ;
  const int64_t j = idx % a.rJ;
  const int64_t row = a.i0 + i;
  const int64_t col = a.j0 + j;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t m = a.group_module[g];
    if (m < 0 || m >= a.M) continue;  // -1 = skip; out-of-range ids are rejected before launch
    const float v = a.scale * a.tile[(g * a.rI + i) * a.rJ + j];
    float* Km = a.K + m * a.n * a.n;
    Km[row * a.n + col] += v;
    if (a.mirror) Km[col * a.n + row] += v;
  }
}

}  // namespace mntk
}  // namespace mat_cuda
