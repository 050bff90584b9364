// Where the CUDA Lanczos kernel keeps each block's working memory: the launch plan, a pure
// function of (n, m, element size, shared-memory budget), and the carving of a block's memory
// into LanczosScratch from it. No CUDA and no torch here, so the host tests run both
// (tests/cpp/lanczos_plan_test.cpp) and the kernel (lanczos.cu) carves with the same code.
//
// One block works on one matrix. Its memory falls into regions, placed greedily in this order
// in dynamic shared memory while they fit the budget, else in the block's slice of a global
// workspace (read through L1/L2):
//   fixed  ritz, est (kMaxTopk doubles each), the block reduction's red (32 doubles), flags
//          (4 ints): always shared (400 bytes);
//   small  alpha, beta, s (m doubles each), work (5m doubles), coef (m elements): O(m);
//   w      the next Lanczos vector (n elements);
//   Q      the Lanczos basis (m·n elements), re-read at every step's reorthogonalisation;
//   K      a copy of the matrix (n·n elements), re-read at every matvec (else K is read from
//          the input in global memory, where it already is).
// Before this plan, small and w were always shared, so float32 n beyond about 57 000 (about
// 29 000 in float64) failed on a 227 KB-per-block GPU although the op accepts n <= 2^20 and the
// CPU kernel runs it; now only `fixed` must fit, and every n the op accepts has a plan.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/host_device.h"
#include "linalg/lanczos.h"

namespace mat_cuda {
namespace linalg {

constexpr int kLanczosRedSlots = 32;  // one partial sum per warp of a block of <= 1024 threads
constexpr int kLanczosFlagInts = 4;
constexpr size_t kLanczosAlign = 16;

// One region's place: in shared memory or in the matrix's global slice, at a byte offset.
struct LanczosRegion {
  bool shared;
  size_t offset;
  size_t bytes;
};

struct LanczosPlan {
  int n, m;              // matrix size and step budget planned for
  int block;             // threads per block
  size_t max_smem;       // the shared-memory budget per block it was planned for
  size_t smem_bytes;     // dynamic shared memory of the launch
  size_t global_bytes;   // bytes of global workspace per matrix (a multiple of kLanczosAlign)
  LanczosRegion fixed;   // always shared
  LanczosRegion small;
  LanczosRegion w;
  LanczosRegion q;
  LanczosRegion k;       // k.bytes == 0 when K is read from the input instead of a copy
};

inline size_t lanczos_align_up(size_t x) { return (x + kLanczosAlign - 1) / kLanczosAlign * kLanczosAlign; }

inline size_t lanczos_fixed_bytes() {
  return (2 * kMaxTopk + kLanczosRedSlots) * sizeof(double) + kLanczosFlagInts * sizeof(int);
}

inline size_t lanczos_small_bytes(int m, size_t elem) {
  return 8 * static_cast<size_t>(m) * sizeof(double) + static_cast<size_t>(m) * elem;
}

// Plans matrices of size n (1 <= n <= 2^20), step budget m (1 <= m <= n), element size
// elem_bytes (4 or 8) for a budget of max_smem bytes of shared memory per block. Returns false
// only when even the fixed region does not fit (a budget under 400 bytes).
inline bool lanczos_make_plan(int n, int m, size_t elem_bytes, size_t max_smem, LanczosPlan* plan) {
  LanczosPlan p{};
  // Small matrices: 4 warps (a warp per row of a 64-wide matvec is already 16 rows per warp).
  p.block = n <= 64 ? 128 : 256;
  p.n = n;
  p.m = m;
  p.max_smem = max_smem;
  size_t smem = 0, global = 0;
  auto place = [&](LanczosRegion* r, size_t bytes, bool may_share) {
    r->bytes = bytes;
    const size_t at = lanczos_align_up(smem);
    if (may_share && at + bytes <= max_smem) {
      r->shared = true;
      r->offset = at;
      smem = at + bytes;
    } else {
      r->shared = false;
      r->offset = lanczos_align_up(global);
      global = r->offset + bytes;
    }
  };
  const size_t nn = static_cast<size_t>(n), mm = static_cast<size_t>(m);
  place(&p.fixed, lanczos_fixed_bytes(), true);
  if (!p.fixed.shared) return false;
  place(&p.small, lanczos_small_bytes(m, elem_bytes), true);
  place(&p.w, nn * elem_bytes, true);
  place(&p.q, mm * nn * elem_bytes, true);
  // A copy of K only pays where it is shared; in global memory the input is read directly.
  const size_t k_bytes = nn * nn * elem_bytes;
  if (lanczos_align_up(smem) + k_bytes <= max_smem) {
    place(&p.k, k_bytes, true);
  } else {
    p.k = LanczosRegion{false, 0, 0};
  }
  p.smem_bytes = smem;
  p.global_bytes = lanczos_align_up(global);
  *plan = p;
  return true;
}

// Whether the small region and w are both shared (every plan for n up to ~57 000 in float32 on
// a 227 KB GPU). The kernel is instantiated for this case separately: with those pointers
// known to point into shared memory, nvcc uses shared loads and 32-bit addresses for them
// (sm_90, CUDA 13: 100 registers in float32, against 146 when every region may be global).
inline bool lanczos_base_shared(const LanczosPlan& p) { return p.small.shared && p.w.shared; }

// The block's scratch from the plan: smem is the block's dynamic shared memory, gmem its slice
// of the global workspace (plan.global_bytes bytes; unused when 0). kBaseShared: the caller
// knows lanczos_base_shared(p). Returns where K's copy goes (nullptr when K is read from the
// input).
template <typename S, bool kBaseShared>
MAT_HD S* lanczos_carve(const LanczosPlan& p, unsigned char* smem, unsigned char* gmem,
                        LanczosScratch<S>* sc) {
  unsigned char* f = smem + p.fixed.offset;
  sc->ritz = reinterpret_cast<double*>(f);
  sc->est = sc->ritz + kMaxTopk;
  sc->flags = reinterpret_cast<int*>(sc->est + kMaxTopk + kLanczosRedSlots);
  const int m = p.m;
  unsigned char* s = (kBaseShared || p.small.shared ? smem : gmem) + p.small.offset;
  sc->alpha = reinterpret_cast<double*>(s);
  sc->beta = sc->alpha + m;
  sc->s = sc->beta + m;
  sc->work = sc->s + m;
  sc->coef = reinterpret_cast<S*>(sc->work + 5 * m);
  sc->w = reinterpret_cast<S*>((kBaseShared || p.w.shared ? smem : gmem) + p.w.offset);
  sc->Q = reinterpret_cast<S*>((p.q.shared ? smem : gmem) + p.q.offset);
  return p.k.bytes > 0 ? reinterpret_cast<S*>(smem + p.k.offset) : nullptr;
}

// The block reduction's slots (kLanczosRedSlots doubles) inside the fixed region.
MAT_HD double* lanczos_red_slots(const LanczosPlan& p, unsigned char* smem) {
  return reinterpret_cast<double*>(smem + p.fixed.offset) + 2 * kMaxTopk;
}

}  // namespace linalg
}  // namespace mat_cuda
