// The Gram ops' orchestration, the same on every device: input checks, the cost model, the
// tiling, and the GEMMs (ATen, so cuBLAS / the CPU BLAS do the heavy part). The two custom
// kernels (gram_tile.h) come from the device's file through GramKernels. Included by
// mntk_cpu.cpp and mntk_cuda.cpp only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "common/checks.h"

namespace mat_cuda {
namespace mntk {

// The device's custom kernels. All tensors float32 contiguous except group_module (int64).
struct GramKernels {
  // out (G, rI, rJ) = Σ_{t,s<T} S[i·T+t, j·T+s] · R[g, i·T+t, j·T+s]; S (rI·T, rJ·T),
  // R (G, rI·T, rJ·T).
  void (*hadamard_block_sum)(const at::Tensor& S, const at::Tensor& R, int64_t T, at::Tensor& out);
  // K[group_module[g], i0+i, j0+j] += scale · tile[g, i, j] (mirrored when `mirror`);
  // tile (G, rI, rJ), group_module (G,).
  void (*scatter_tile)(at::Tensor& K, const at::Tensor& tile, const at::Tensor& group_module,
                       int64_t i0, int64_t j0, bool mirror, double scale);
};

// kSyncFree (embedding only): the explicit form over a static bound on the distinct ids, or
// the ghost form, chosen by shapes alone: no host synchronisation (see embedding_gram).
enum class GramAlgorithm : int64_t { kAuto = 0, kGhost = 1, kExplicit = 2, kSyncFree = 3 };

// ---- input checks (all before any write: K is untouched on error) ----

inline void check_gram_target(const at::Tensor& K, int64_t n) {
  MAT_CHECK(K.dim() == 3, "K must have shape (M, n, n), got ", K.sizes());
  CHECK_DTYPE(K, at::kFloat);
  CHECK_CONTIGUOUS(K);
  MAT_CHECK(K.size(1) == n && K.size(2) == n, "K must have shape (M, n, n) with n = ", n,
            " (the inputs' sample count), got ", K.sizes());
}

// (checks.h's CHECK_DEVICE cannot be used: its parameter `device` also replaces `.device()`.)
inline void check_same_device(const at::Tensor& x, const at::Tensor& K, const char* name) {
  MAT_CHECK(x.device() == K.device(), name, " must be on K's device ", K.device(), ", got ",
            x.device());
}

inline void check_factor_dtype(const at::Tensor& x, const char* name) {
  const auto t = x.scalar_type();
  MAT_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
            " must be float32, bfloat16 or float16, got ", t);
}

inline void check_group_module(const at::Tensor& K, const at::Tensor& group_module,
                               int64_t num_groups_expected, int64_t group_size, int64_t dim,
                               const char* dim_name) {
  check_same_device(group_module, K, "group_module");
  CHECK_DTYPE(group_module, at::kLong);
  CHECK_DIM(group_module, 1);
  MAT_CHECK(group_size >= 0, "group_size must be >= 0, got ", group_size);
  MAT_CHECK(group_size > 0 || dim == 0, "group_size must be positive, got ", group_size);
  MAT_CHECK(group_size == 0 || dim % group_size == 0, "group_size ", group_size,
            " must divide ", dim_name, " = ", dim);
  MAT_CHECK(group_module.size(0) == num_groups_expected, "group_module must have one entry per "
            "group: ", dim_name, " / group_size = ", num_groups_expected, ", got ",
            group_module.size(0));
  // Values are checked where they can be read without a device synchronisation (CPU); the CUDA
  // kernels skip out-of-range ids and the Python wrapper checks them (validate=True).
  if (group_module.device().is_cpu() && group_module.numel() > 0) {
    const int64_t lo = group_module.min().item<int64_t>();
    const int64_t hi = group_module.max().item<int64_t>();
    MAT_CHECK(lo >= -1 && hi < K.size(0), "group_module ids must be in [-1, ", K.size(0) - 1,
              "] (K has M = ", K.size(0), " modules), got values in [", lo, ", ", hi, "]");
  }
}

// ---- shared pieces ----

inline at::Tensor as_3d(const at::Tensor& x) { return x.dim() == 2 ? x.unsqueeze(1) : x; }

inline at::Tensor to_float_contiguous(const at::Tensor& x) {
  return x.to(at::kFloat).contiguous();  // no copy when already float32 contiguous
}

// Samples per tile side so that a tile's shared Gram plus `grams_per_tile` group Grams,
// each (rb·T)² floats, fit in the workspace. At least 1, at most n.
inline int64_t tile_samples(int64_t workspace_bytes, int64_t grams_per_tile, int64_t T, int64_t n) {
  const double floats = static_cast<double>(workspace_bytes) / sizeof(float);
  const double side = std::sqrt(floats / static_cast<double>(1 + grams_per_tile));
  const int64_t rb = static_cast<int64_t>(side / static_cast<double>(std::max<int64_t>(T, 1)));
  return std::min(std::max<int64_t>(rb, 1), std::max<int64_t>(n, 1));
}

// Ghost form, tiled over blocks of samples (upper-triangle tiles only, mirrored by the scatter):
// per tile (I, J), SS = S_I S_Jᵀ (shared by every group), RR_g = R_I^g R_J^gᵀ, and
// ⟨g_i, g_j⟩_group = Σ_{t,s} SS ∘ RR_g over the (i, j) block. The n·T x n·T Grams are never
// held whole. S (n·T, dS) float; Rg (G, n·T, gs) float, each group's columns contiguous.
// `same_index` (n·T) replaces SS by [idx_it == idx_js] (the embedding case) when defined.
inline void ghost_tiles(const GramKernels& k, at::Tensor& K, const at::Tensor& S,
                        const at::Tensor& same_index, const at::Tensor& Rg,
                        const at::Tensor& group_module, int64_t n, int64_t T, double scale,
                        int64_t workspace_bytes) {
  const int64_t G = Rg.size(0);
  int64_t gc = G;  // groups per chunk
  int64_t rb = tile_samples(workspace_bytes, gc, T, n);
  if (rb == 1 && G > 1) {
    // Even one sample pair's Grams of all groups do not fit: take fewer groups at a time.
    const int64_t fit = workspace_bytes / static_cast<int64_t>(sizeof(float) * T * T) - 1;
    gc = std::min(std::max<int64_t>(fit, 1), G);
  }
  const auto fopts = S.defined() ? S.options() : Rg.options();
  for (int64_t I0 = 0; I0 < n; I0 += rb) {
    const int64_t bI = std::min(rb, n - I0);
    for (int64_t J0 = I0; J0 < n; J0 += rb) {
      const int64_t bJ = std::min(rb, n - J0);
      at::Tensor SS;  // (bI·T, bJ·T)
      if (same_index.defined()) {
        SS = at::eq(same_index.narrow(0, I0 * T, bI * T).unsqueeze(1),
                    same_index.narrow(0, J0 * T, bJ * T).unsqueeze(0)).to(at::kFloat);
      } else {
        SS = at::mm(S.narrow(0, I0 * T, bI * T), S.narrow(0, J0 * T, bJ * T).t());
      }
      for (int64_t g0 = 0; g0 < G; g0 += gc) {
        const int64_t gw = std::min(gc, G - g0);
        const at::Tensor Rc = Rg.narrow(0, g0, gw);
        const at::Tensor RR = at::bmm(Rc.narrow(1, I0 * T, bI * T),
                                      Rc.narrow(1, J0 * T, bJ * T).transpose(1, 2));
        at::Tensor tile = at::empty({gw, bI, bJ}, fopts);
        k.hadamard_block_sum(SS, RR, T, tile);
        k.scatter_tile(K, tile, group_module.narrow(0, g0, gw), I0, J0, I0 != J0, scale);
      }
    }
  }
}

// Explicit form: per-sample gradient slices g_i[:, cols] = R_iᵀ S_i[:, cols] (one bmm over the
// samples), each group's rows reduced to its n x n Gram at once (one bmm over the groups), then
// freed. Chunked over S's columns so the per-sample gradients never exceed the workspace.
// R (n, T, dR) float; S (n, T, dS) float.
inline void explicit_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& R,
                          const at::Tensor& S, const at::Tensor& group_module, int64_t group_size,
                          double scale, int64_t workspace_bytes, const at::Tensor& workspace) {
  const int64_t n = R.size(0), dR = R.size(2), dS = S.size(2), G = group_module.size(0);
  const int64_t per_col = static_cast<int64_t>(sizeof(float)) * n * std::max<int64_t>(dR, 1);
  // Equal chunks (a short last chunk would be an inefficient GEMM).
  const int64_t max_cs = std::min(std::max<int64_t>(workspace_bytes / per_col, 1), dS);
  const int64_t num_chunks = (dS + max_cs - 1) / max_cs;
  const int64_t cs = (dS + num_chunks - 1) / num_chunks;
  const at::Tensor Rt = R.transpose(1, 2);  // (n, dR, T)
  // One scratch buffer for every chunk's per-sample gradients: the caller's reusable workspace
  // when it is large enough (a fresh CPU allocation of this size costs page faults on each
  // call, about half the GEMM time at BERT-base sizes), else one allocation for this call.
  const at::Tensor scratch = workspace.defined() && workspace.numel() >= n * dR * cs
                                 ? workspace
                                 : at::empty({n * dR * cs}, R.options());
  at::Tensor acc = at::zeros({G, n, n}, R.options());
  for (int64_t c0 = 0; c0 < dS; c0 += cs) {
    const int64_t cw = std::min(cs, dS - c0);
    at::Tensor g = scratch.narrow(0, 0, n * dR * cw).view({n, dR, cw});
    at::bmm_out(g, Rt, S.narrow(2, c0, cw));  // per-sample gradient columns c0..c0+cw
    const at::Tensor gg = g.view({n, G, group_size * cw}).transpose(0, 1);  // (G, n, gs·cw)
    acc.baddbmm_(gg, gg.transpose(1, 2));
  }
  k.scatter_tile(K, acc, group_module, 0, 0, false, scale);
}

// Σ_t R_it restricted to each group, Gram per group: the bias part. R (n, T, dR) float.
inline void bias_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& R,
                      const at::Tensor& group_module, int64_t group_size, double scale) {
  const int64_t n = R.size(0), G = group_module.size(0);
  const at::Tensor gb = R.sum(1).view({n, G, group_size}).transpose(0, 1);  // (G, n, gs)
  k.scatter_tile(K, at::bmm(gb, gb.transpose(1, 2)).contiguous(), group_module, 0, 0, false,
                 scale);
}

// Estimated multiply-adds of each form (DESIGN.md cost model). The ghost form computes the
// upper-triangle tiles of its sample-block tiling (all of the n·T x n·T Grams when one tile
// holds every sample, about half with many tiles): two Grams over dS + dR features plus one
// Hadamard reduction per group. The explicit one forms n·T·dS·dR per-sample gradient entries
// and an n² Gram over dS·dR of them.
inline bool ghost_is_cheaper(int64_t n, int64_t T, int64_t dS, int64_t dR, int64_t G,
                             int64_t workspace_bytes) {
  const double nT = static_cast<double>(n) * static_cast<double>(T);
  const int64_t rb = tile_samples(workspace_bytes, G, T, n);
  const double blocks = static_cast<double>((n + rb - 1) / rb);
  const double tiled_fraction = (blocks + 1.0) / (2.0 * blocks);
  const double ghost = tiled_fraction * nT * nT * static_cast<double>(dS + dR + G);
  const double expl = static_cast<double>(n) * static_cast<double>(T + n) *
                      static_cast<double>(dS) * static_cast<double>(dR);
  return ghost < expl;
}

// ---- the ops ----

inline void linear_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& group_module, int64_t group_dim,
                        int64_t group_size, bool weight, bool bias, double scale,
                        int64_t algorithm, int64_t workspace_bytes,
                        const std::optional<at::Tensor>& workspace) {
  MAT_CHECK(A.dim() == 2 || A.dim() == 3, "A must have shape (n, T, d_in) or (n, d_in), got ",
            A.sizes());
  MAT_CHECK(B.dim() == A.dim(), "B must have as many dimensions as A (", A.dim(), "), got shape ",
            B.sizes());
  MAT_CHECK(B.size(0) == A.size(0), "A and B must have the same sample count n, got A ",
            A.sizes(), " and B ", B.sizes());
  MAT_CHECK(A.dim() == 2 || B.size(1) == A.size(1), "A and B must have the same sequence "
            "length T, got A ", A.sizes(), " and B ", B.sizes());
  check_factor_dtype(A, "A");
  MAT_CHECK(B.scalar_type() == A.scalar_type(), "B must have A's dtype (", A.scalar_type(),
            "), got ", B.scalar_type());
  check_gram_target(K, A.size(0));
  check_same_device(A, K, "A");
  check_same_device(B, K, "B");
  MAT_CHECK(group_dim == 0 || group_dim == 1, "group_dim must be 0 (output rows) or 1 (input "
            "columns), got ", group_dim);
  MAT_CHECK(!(bias && group_dim == 1), "bias=True needs group_dim=0 (a bias has no input "
            "columns to group)");
  MAT_CHECK(algorithm >= 0 && algorithm <= 2, "algorithm must be 0 (auto), 1 (ghost) or 2 "
            "(explicit), got ", algorithm);
  MAT_CHECK(workspace_bytes > 0, "workspace_bytes must be positive, got ", workspace_bytes);
  if (workspace.has_value()) {
    check_same_device(*workspace, K, "workspace");
    MAT_CHECK(workspace->scalar_type() == at::kFloat && workspace->dim() == 1 &&
              workspace->is_contiguous(), "workspace must be a contiguous 1-D float32 tensor, "
              "got dtype ", workspace->scalar_type(), " and shape ", workspace->sizes());
  }
  const at::Tensor A3 = as_3d(A), B3 = as_3d(B);
  // Normalise: R is the grouped factor, S the shared one; group g's gradient slice is
  // R_i^gᵀ S_i (the transpose of the weight's slice when group_dim = 1: same Gram).
  const at::Tensor& R3 = group_dim == 0 ? B3 : A3;
  const at::Tensor& S3 = group_dim == 0 ? A3 : B3;
  const int64_t dR = R3.size(2);
  const int64_t num_groups = group_size > 0 ? dR / group_size : group_module.size(0);
  check_group_module(K, group_module, num_groups, group_size, dR,
                     group_dim == 0 ? "d_out (B's last dim)" : "d_in (A's last dim)");

  const int64_t n = A3.size(0), T = A3.size(1), dS = S3.size(2), G = group_module.size(0);
  if (n == 0 || G == 0) return;
  const at::Tensor R = to_float_contiguous(R3);  // (n, T, dR)
  if (bias) bias_gram(k, K, R, group_module, group_size, scale);
  if (!weight || T == 0 || dS == 0 || dR == 0) return;
  const at::Tensor S = to_float_contiguous(S3);  // (n, T, dS)
  const auto algo = static_cast<GramAlgorithm>(algorithm);
  const bool ghost = algo == GramAlgorithm::kGhost ||
                     (algo == GramAlgorithm::kAuto &&
                      ghost_is_cheaper(n, T, dS, dR, G, workspace_bytes));
  if (ghost) {
    const at::Tensor Rg = G == 1 ? R.view({1, n * T, dR})
                                 : R.view({n * T, G, group_size}).permute({1, 0, 2}).contiguous();
    ghost_tiles(k, K, S.view({n * T, dS}), at::Tensor(), Rg, group_module, n, T, scale,
                workspace_bytes);
  } else {
    // A given workspace's size is the explicit form's memory bound.
    const at::Tensor ws = workspace.has_value() ? *workspace : at::Tensor();
    explicit_gram(k, K, R, S, group_module, group_size, scale,
                  ws.defined() ? std::max<int64_t>(ws.numel() * 4, 4) : workspace_bytes, ws);
  }
}

// Embedding cost model (multiply-adds). Ghost: the index-equality and B Grams over the n·T
// positions (upper-triangle tiles) plus the Hadamard reduction, ~(n·T)²·(d + 3). Explicit: the
// scatter of n·T rows of d into per-sample gradients over the U distinct ids of the batch, then
// their n x n Gram over U·d columns, ~n·T·d + n²·U·d.
inline double embedding_ghost_cost(int64_t n, int64_t T, int64_t d, int64_t workspace_bytes) {
  const double nT = static_cast<double>(n) * static_cast<double>(T);
  const int64_t rb = tile_samples(workspace_bytes, 1, T, n);
  const double blocks = static_cast<double>((n + rb - 1) / rb);
  return (blocks + 1.0) / (2.0 * blocks) * nT * nT * static_cast<double>(d + 3);
}

inline double embedding_explicit_cost(int64_t n, int64_t T, int64_t d, int64_t U) {
  return static_cast<double>(n) * static_cast<double>(d) *
         (static_cast<double>(T) + static_cast<double>(n) * static_cast<double>(U));
}

// Largest chunk of the explicit embedding form's per-sample gradients. Larger chunks buy
// nothing (the Gram GEMM is already long in its reduction dimension) and cost: on CPU a fresh
// buffer above glibc's mmap threshold (at most 32 MiB) is page-faulted on every call (measured:
// 59 MB zeroed fresh 189 ms vs 30 MB 7 ms), and a chunk that stays in cache is zeroed,
// scattered into and read by the GEMM without going to memory three times.
constexpr int64_t kEmbeddingChunkBytes = 8 << 20;

// Explicit embedding form: sample i's gradient is nonzero only on the rows of ids it uses, so
// it is scattered into a compact (U, d) block over the batch's U distinct ids (slot (n·T,) =
// i·U + the position's id rank), and the n x n Gram is one GEMM over U·d columns. Chunked over
// d so the per-sample gradients (n·U·cw floats) stay within the workspace and
// kEmbeddingChunkBytes. Bf (n·T, d) float.
inline void embedding_explicit_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& slot,
                                    int64_t U, const at::Tensor& Bf, const at::Tensor& gm,
                                    int64_t n, double scale, int64_t workspace_bytes) {
  const int64_t d = Bf.size(1);
  const int64_t per_col = static_cast<int64_t>(sizeof(float)) * n * U;
  const int64_t chunk_bytes = std::min(workspace_bytes, kEmbeddingChunkBytes);
  const int64_t max_cs = std::min(std::max<int64_t>(chunk_bytes / per_col, 1), d);
  const int64_t num_chunks = (d + max_cs - 1) / max_cs;
  const int64_t cs = (d + num_chunks - 1) / num_chunks;  // equal chunks
  const at::Tensor scratch = at::empty({n * U * cs}, Bf.options());
  at::Tensor acc = at::zeros({1, n, n}, Bf.options());
  at::Tensor acc0 = acc.select(0, 0);
  for (int64_t c0 = 0; c0 < d; c0 += cs) {
    const int64_t cw = std::min(cs, d - c0);
    at::Tensor g = scratch.narrow(0, 0, n * U * cw).view({n * U, cw});
    g.zero_();
    g.index_add_(0, slot, Bf.narrow(1, c0, cw));  // per-sample gradients, columns c0..c0+cw
    const at::Tensor gf = g.view({n, U * cw});
    acc0.addmm_(gf, gf.t());
  }
  k.scatter_tile(K, acc, gm, 0, 0, false, scale);
}

// The dense rank of every id among the distinct ids of `flat` (0 for the smallest), without a
// host synchronisation: sort, mark where the sorted value changes, prefix-sum, scatter back.
// Ranks are < flat.numel(). flat: (N,) int64.
inline at::Tensor dense_id_rank(const at::Tensor& flat) {
  const int64_t N = flat.size(0);
  const auto sorted = at::sort(flat);
  const at::Tensor& values = std::get<0>(sorted);
  at::Tensor is_new = at::ones({N}, flat.options());
  if (N > 1) is_new.narrow(0, 1, N - 1).copy_(values.narrow(0, 1, N - 1).ne(values.narrow(0, 0, N - 1)));
  const at::Tensor rank_sorted = is_new.cumsum(0).sub_(1);
  return at::empty_like(flat).scatter_(0, std::get<1>(sorted), rank_sorted);
}

// algorithm: 0 auto, 1 ghost, 2 explicit (these two count the batch's distinct ids U with
// unique: a host synchronisation on CUDA), 3 sync-free. num_embeddings (V, 0 = unknown) bounds U
// for the sync-free form: U <= min(n·T, V), and the explicit form runs over that static bound
// (its id slots are the ids themselves when V <= n·T, else their dense ranks, sync-free), unused
// slots adding zero columns; the ghost form is taken instead when cheaper by the same cost
// model with U at its bound. Same Gram as the other forms up to float rounding.
inline void embedding_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& indices,
                           const at::Tensor& B, int64_t module, std::optional<int64_t> padding_idx,
                           double scale, int64_t algorithm, int64_t workspace_bytes,
                           int64_t num_embeddings) {
  CHECK_DIM(indices, 2);
  CHECK_DTYPE(indices, at::kLong);
  CHECK_DIM(B, 3);
  MAT_CHECK(B.size(0) == indices.size(0) && B.size(1) == indices.size(1), "B must have shape "
            "(n, T, d) matching indices (n, T) = ", indices.sizes(), ", got ", B.sizes());
  check_factor_dtype(B, "B");
  check_gram_target(K, indices.size(0));
  check_same_device(indices, K, "indices");
  check_same_device(B, K, "B");
  MAT_CHECK(module >= -1 && module < K.size(0), "module must be in [-1, ", K.size(0) - 1,
            "] (K has M = ", K.size(0), " modules), got ", module);
  MAT_CHECK(algorithm >= 0 && algorithm <= 3, "algorithm must be 0 (auto), 1 (ghost), 2 "
            "(explicit) or 3 (sync_free), got ", algorithm);
  MAT_CHECK(workspace_bytes > 0, "workspace_bytes must be positive, got ", workspace_bytes);
  MAT_CHECK(num_embeddings >= 0, "num_embeddings must be >= 0 (0: unknown), got ", num_embeddings);
  const int64_t n = B.size(0), T = B.size(1), d = B.size(2);
  if (module < 0 || n == 0 || T == 0 || d == 0) return;
  at::Tensor Bf = to_float_contiguous(B);
  if (padding_idx.has_value()) {
    // Padding positions get no gradient: zeroing their rows removes them from every sum.
    Bf = Bf * indices.ne(*padding_idx).unsqueeze(2).to(at::kFloat);
  }
  const at::Tensor flat = indices.reshape({n * T});
  const at::Tensor gm = at::full({1}, module, indices.options());
  const auto algo = static_cast<GramAlgorithm>(algorithm);
  const auto explicit_with = [&](const at::Tensor& rank, int64_t U) {
    // slot (n·T,) = i·U + rank of idx_it
    const at::Tensor slot = (at::arange(n, flat.options()).mul_(U).unsqueeze(1) +
                             rank.reshape({n, T})).reshape({n * T});
    embedding_explicit_gram(k, K, slot, U, Bf.view({n * T, d}), gm, n, scale, workspace_bytes);
  };
  if (algo == GramAlgorithm::kSyncFree) {
    const bool ids_are_slots = num_embeddings > 0 && num_embeddings <= n * T;
    const int64_t U = ids_are_slots ? num_embeddings : n * T;
    if (embedding_explicit_cost(n, T, d, U) <= embedding_ghost_cost(n, T, d, workspace_bytes)) {
      explicit_with(ids_are_slots ? flat : dense_id_rank(flat), U);
      return;
    }
  } else if (algo != GramAlgorithm::kGhost) {
    // The explicit form and the choice need U, the batch's distinct id count: on CUDA a host
    // synchronisation for unique's output size (the ghost and sync-free forms have none).
    const auto uniq = at::_unique(flat, /*sorted=*/false, /*return_inverse=*/true);
    const int64_t U = std::get<0>(uniq).size(0);
    if (algo == GramAlgorithm::kExplicit ||
        embedding_explicit_cost(n, T, d, U) <= embedding_ghost_cost(n, T, d, workspace_bytes)) {
      explicit_with(std::get<1>(uniq), U);
      return;
    }
  }
  ghost_tiles(k, K, at::Tensor(), flat, Bf.view({1, n * T, d}), gm, n, T, scale, workspace_bytes);
}

inline void sample_gram(const GramKernels& k, at::Tensor& K, const at::Tensor& G,
                        const at::Tensor& group_module, int64_t group_size, double scale) {
  CHECK_DIM(G, 2);
  check_factor_dtype(G, "G");
  check_gram_target(K, G.size(0));
  check_same_device(G, K, "G");
  const int64_t n = G.size(0), p = G.size(1);
  const int64_t num_groups = group_size > 0 ? p / group_size : group_module.size(0);
  check_group_module(K, group_module, num_groups, group_size, p, "p (G's last dim)");
  const int64_t num = group_module.size(0);
  if (n == 0 || num == 0) return;
  const at::Tensor gg = to_float_contiguous(G).view({n, num, group_size}).transpose(0, 1);
  k.scatter_tile(K, at::bmm(gg, gg.transpose(1, 2)).contiguous(), group_module, 0, 0, false,
                 scale);
}

}  // namespace mntk
}  // namespace mat_cuda
