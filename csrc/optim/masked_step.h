// Arithmetic of the fused masked optimizer steps, shared by the CPU kernel (g++) and the CUDA
// kernel (nvcc): which module an element belongs to, the per-module Adam bias corrections, and
// the AdamW / SGD update of one element. The updates are templates over the value type V so the
// CPU kernel runs them on at::vec::Vectorized<float> lanes and on scalars, and CUDA on floats;
// the operation order follows torch.optim's single-tensor AdamW / SGD so all-active steps agree
// with torch to float rounding.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/fast_divmod.h"
#include "common/host_device.h"

namespace mat_cuda {
namespace optim {

// ---- element -> module (the tables of mat_cuda/modules.py ModuleMap.kernel_tables) ----

enum LayoutCode : int64_t { kLayoutWhole = 0, kLayoutRows = 1, kLayoutCols = 2 };

// One row of the per-tensor layout table:
//   whole: {kLayoutWhole, module, 0, 0}
//   rows:  {kLayoutRows, group_offset, span = rows_per_group * row_length, 0}
//   cols:  {kLayoutCols, group_offset, group_size, last_dim}
struct TensorLayout {
  int64_t code;
  int64_t module_or_offset;
  int64_t span;
  int64_t last_dim;
};

// The layout with its divisors prepared for division without a divide instruction
// (common/fast_divmod.h): the CUDA kernel looks an element's module up per element (scalar
// path) or per 4 elements (vector path), and a 64-bit `/` or `%` there is a software routine of
// ~70 instructions on a GPU; the CPU kernel uses the same helpers once per run of a module.
// Built once per tensor on the host.
struct LayoutIndex {
  int64_t code;
  int64_t module_or_offset;
  FastDivU64 span;      // rows: elements per group; cols: columns per group
  FastDivU64 last_dim;  // cols: row length; unused otherwise
};

inline LayoutIndex make_layout_index(const TensorLayout& l) {
  LayoutIndex x;
  x.code = l.code;
  x.module_or_offset = l.module_or_offset;
  const bool grouped = l.code == kLayoutRows || l.code == kLayoutCols;
  x.span = make_fast_div_u64(grouped && l.span > 0 ? static_cast<uint64_t>(l.span) : 0);
  x.last_dim = make_fast_div_u64(l.code == kLayoutCols && l.last_dim > 0
                                     ? static_cast<uint64_t>(l.last_dim) : 0);
  return x;
}

// The group-table index of flat element i (rows/cols layouts): i / span, or
// (i % last_dim) / span.
MAT_HD int64_t layout_group(const LayoutIndex& l, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return static_cast<int64_t>(l.code == kLayoutRows ? l.span.div(u) : l.span.div(l.last_dim.mod(u)));
}

// The module of flat element i of a contiguous tensor. group_table: (G,) module of each group.
MAT_HD int64_t element_module(const LayoutIndex& l, const int64_t* group_table, int64_t i) {
  if (l.code == kLayoutWhole) return l.module_or_offset;
  return group_table[l.module_or_offset + layout_group(l, i)];
}

// The end of the run of elements from i that lie in i's group, capped at `end`: group
// boundaries fall every span flat elements for both row and column layouts (span divides
// last_dim); a whole tensor is one run.
MAT_HD int64_t group_run_end(const LayoutIndex& l, int64_t i, int64_t end) {
  if (l.code == kLayoutWhole) return end;
  const int64_t stop = static_cast<int64_t>((l.span.div(static_cast<uint64_t>(i)) + 1) * l.span.divisor);
  return stop < end ? stop : end;
}

// Module slot num_modules holds the unmanaged elements: always active.
MAT_HD bool module_active(const bool* module_mask, int64_t num_modules, int64_t m) {
  return m == num_modules || module_mask[m];
}

// Whether every run of 4 consecutive elements starting at a multiple of 4 lies in one module,
// so a vectorised kernel can look the module up once per 4 elements.
MAT_HD bool layout_uniform_in_fours(const LayoutIndex& l) {
  if (l.code == kLayoutWhole) return true;
  if (l.code == kLayoutRows) return l.span.divisor % 4 == 0;
  return l.span.divisor % 4 == 0 && l.last_dim.divisor % 4 == 0;
}

// ---- per-module step counts ----

// The step count of module m after a step: active modules (and the unmanaged slot) advance,
// unless the step is skipped for inf/nan gradients. The update ops read the counts *before* the
// step (an updated module is at count + 1) and masked_module_steps_ advances them afterwards, so
// a call rejected by its input checks leaves the counts untouched too.
MAT_HD int64_t next_module_step(int64_t step, bool active, bool skip) {
  return (active && !skip) ? step + 1 : step;
}

// Adam's bias corrections for a module at its own step count, computed in double like torch's
// Python-side scalars and rounded to float once.
struct AdamModuleCoeffs {
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
};

MAT_HD AdamModuleCoeffs adam_module_coeffs(int64_t step, double lr, double beta1, double beta2) {
  const double s = static_cast<double>(step);
  const double bc1 = 1.0 - pow(beta1, s);
  const double bc2 = 1.0 - pow(beta2, s);
  AdamModuleCoeffs c;
  c.neg_step_size = static_cast<float>(-(lr / bc1));
  c.bc2_sqrt = static_cast<float>(sqrt(bc2));
  return c;
}

// ---- per-element updates ----

// The gradient as the update sees it: unscaled by the AMP scale, negated for maximize.
template <class V>
MAT_HD V prepare_grad(V g, bool has_scale, const V& scale, bool maximize) {
  if (has_scale) g = g / scale;
  if (maximize) g = V(0.f) - g;
  return g;
}

// Group-constant scalars of AdamW, broadcast to V.
template <class V>
struct AdamwConsts {
  V decay;            // 1 - lr * weight_decay
  V lerp_w;           // 1 - beta1
  V lerp_w_comp;      // beta1 (= 1 - lerp_w, for torch's lerp from the end point)
  V beta2;
  V one_minus_beta2;
  V eps;
  bool has_decay;       // weight_decay != 0
  bool lerp_from_start;  // |1 - beta1| < 0.5, the branch torch's lerp takes
};

struct ScalarSqrt {
  MAT_HD float operator()(float x) const { return sqrtf(x); }
};

// One AdamW step of one element (or one vector of elements): p (param), m (exp_avg),
// v (exp_avg_sq) updated in place from the prepared gradient g, as torch's _single_tensor_adam
// with decoupled weight decay does it.
template <class V, class Sqrt>
MAT_HD void adamw_update(V& p, const V& g, V& m, V& v, const AdamwConsts<V>& c,
                         const V& neg_step_size, const V& bc2_sqrt, Sqrt sqrt_fn) {
  if (c.has_decay) p = p * c.decay;
  m = c.lerp_from_start ? m + c.lerp_w * (g - m) : g - (g - m) * c.lerp_w_comp;
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const V denom = sqrt_fn(v) / bc2_sqrt + c.eps;
  p = p + neg_step_size * m / denom;
}

// Group-constant scalars of SGD, broadcast to V.
template <class V>
struct SgdConsts {
  V weight_decay;
  V momentum;
  V one_minus_dampening;
  V neg_lr;
  bool has_decay;
  bool has_momentum;
  bool nesterov;
};

// One SGD step of one element (or vector): p (param), buf (momentum buffer, unused without
// momentum). first: the module's first active step, where torch sets buf = grad.
template <class V>
MAT_HD void sgd_update(V& p, V g, V& buf, bool first, const SgdConsts<V>& c) {
  if (c.has_decay) g = g + c.weight_decay * p;
  if (c.has_momentum) {
    buf = first ? g : buf * c.momentum + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * buf : buf;
  }
  p = p + c.neg_lr * g;
}

}  // namespace optim
}  // namespace mat_cuda
