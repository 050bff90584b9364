// CPU kernels of the fused masked optimizer steps: at::parallel_for over fixed-size chunks of the
// tensor list; inside a chunk, each maximal run of elements of one module is skipped when the
// module is masked and otherwise updated with 8-wide AVX vectors where the CPU has AVX
// (masked_step_avx_cpu.cpp), else at::vec lanes (fp32), or scalars (bf16/fp16, math in fp32).
// The per-element arithmetic is csrc/optim/masked_step.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "optim/group_table_check.h"
#include "optim/masked_step_simd.h"
#include "optim/optim_checks.h"

namespace mat_cuda {
namespace optim {
namespace {

using Vec = at::vec::Vectorized<float>;

struct VecSqrt {
  Vec operator()(const Vec& x) const { return x.sqrt(); }
};

// MAT_CUDA_DISABLE_AVX=1 forces the at::vec path (how the tests cover CPUs without AVX).
const bool kHasAvx = cpu_has_avx() && std::getenv("MAT_CUDA_DISABLE_AVX") == nullptr;

// Elements per parallel task: large enough to amortise the run search, small enough to balance.
constexpr int64_t kChunk = 32768;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Below this many elements in a call, threads cost more than they save: run inline.
constexpr int64_t kParallelFrom = 4 * kChunk;

std::vector<Chunk> make_chunks(at::TensorList params) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// The grain (in chunks) for at::parallel_for: everything in one task for small calls.
int64_t chunk_grain(at::TensorList params, const std::vector<Chunk>& chunks) {
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  return total < kParallelFrom ? static_cast<int64_t>(chunks.size()) + 1 : 1;
}

// What every chunk of one call reads: the mask, the tables and the AMP scale.
struct StepContext {
  const bool* module_mask;
  int64_t num_modules;
  const int64_t* module_steps;  // (num_modules + 1,), counts before this step
  const int64_t* group_table;
  std::vector<LayoutIndex> layouts;  // one per tensor, from the (T, 4) layout table
  bool has_scale;
  float grad_scale;
  bool maximize;

  const LayoutIndex& layout(int64_t t) const { return layouts[t]; }
};

StepContext make_context(const at::Tensor& module_steps, const at::Tensor& module_mask,
                         const at::Tensor& layout_table, const at::Tensor& group_table,
                         const c10::optional<at::Tensor>& grad_scale, bool maximize) {
  StepContext c;
  c.module_mask = module_mask.data_ptr<bool>();
  c.num_modules = module_mask.size(0);
  c.module_steps = module_steps.data_ptr<int64_t>();
  c.group_table = group_table.data_ptr<int64_t>();
  const int64_t* lt = layout_table.data_ptr<int64_t>();
  for (int64_t t = 0; t < layout_table.size(0); ++t) {
    c.layouts.push_back(make_layout_index({lt[4 * t], lt[4 * t + 1], lt[4 * t + 2], lt[4 * t + 3]}));
  }
  c.has_scale = grad_scale.has_value();
  c.grad_scale = c.has_scale ? grad_scale->item<float>() : 1.f;
  c.maximize = maximize;
  return c;
}

bool step_skipped(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.f;
}

// Calls fn(module, begin, end) for every maximal run of [begin, end) inside one active module.
// The indexing is masked_step.h's, shared with the CUDA kernel.
template <class Fn>
void for_each_active_run(const StepContext& c, const LayoutIndex& l, int64_t begin, int64_t end,
                         Fn&& fn) {
  int64_t i = begin;
  while (i < end) {
    const int64_t m = element_module(l, c.group_table, i);
    const int64_t stop = group_run_end(l, i, end);
    if (module_active(c.module_mask, c.num_modules, m)) fn(m, i, stop);
    i = stop;
  }
}

template <class V>
AdamwConsts<V> adamw_consts(double lr, double beta1, double beta2, double weight_decay, double eps) {
  const float lerp_w = static_cast<float>(1.0 - beta1);
  AdamwConsts<V> c{V(static_cast<float>(1.0 - lr * weight_decay)),
                   V(lerp_w),
                   V(1.f - lerp_w),
                   V(static_cast<float>(beta2)),
                   V(static_cast<float>(1.0 - beta2)),
                   V(static_cast<float>(eps)),
                   weight_decay != 0.0,
                   std::abs(lerp_w) < 0.5f};
  return c;
}

template <class V>
SgdConsts<V> sgd_consts(double lr, double momentum, double dampening, double weight_decay,
                        bool nesterov) {
  SgdConsts<V> c{V(static_cast<float>(weight_decay)), V(static_cast<float>(momentum)),
                 V(static_cast<float>(1.0 - dampening)), V(static_cast<float>(-lr)),
                 weight_decay != 0.0, momentum != 0.0, nesterov};
  return c;
}

// ---- AdamW ----

template <typename scalar_t>
void adamw_run(scalar_t* p, const scalar_t* g, float* m, float* v, int64_t n,
               const StepContext& c, const AdamwConsts<float>& cs, const AdamwConsts<Vec>& cv,
               AdamModuleCoeffs k) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kHasAvx) i = adamw_run_f32_avx(p, g, m, v, n, cs, k, c.has_scale, c.grad_scale, c.maximize);
    const Vec nss(k.neg_step_size), bc2(k.bc2_sqrt), scale(c.grad_scale);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i), mv = Vec::loadu(m + i), vv = Vec::loadu(v + i);
      const Vec gv = prepare_grad(Vec::loadu(g + i), c.has_scale, scale, c.maximize);
      adamw_update(pv, gv, mv, vv, cv, nss, bc2, VecSqrt());
      pv.store(p + i);
      mv.store(m + i);
      vv.store(v + i);
    }
  }
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    const float gf = prepare_grad(static_cast<float>(g[i]), c.has_scale, c.grad_scale, c.maximize);
    adamw_update(pf, gf, m[i], v[i], cs, k.neg_step_size, k.bc2_sqrt, ScalarSqrt());
    p[i] = static_cast<scalar_t>(pf);
  }
}

void masked_adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, const at::Tensor& module_steps,
                           const at::Tensor& module_mask, const at::Tensor& layout_table,
                           const at::Tensor& group_table, double lr, double beta1, double beta2,
                           double weight_decay, double eps, bool maximize,
                           const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& found_inf) {
  check_masked_step_inputs("masked_adamw_step_", params, grads,
                           {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, module_steps,
                           module_mask, layout_table, group_table, grad_scale, found_inf);
  if (params.empty()) return;
  ensure_group_table_valid(group_table, module_mask.size(0));
  if (step_skipped(found_inf)) return;

  const StepContext c = make_context(module_steps, module_mask, layout_table, group_table,
                                     grad_scale, maximize);
  std::vector<AdamModuleCoeffs> coeffs(c.num_modules + 1);
  for (int64_t m = 0; m <= c.num_modules; ++m) {
    coeffs[m] = adam_module_coeffs(c.module_steps[m] + 1, lr, beta1, beta2);
  }
  const auto cs = adamw_consts<float>(lr, beta1, beta2, weight_decay, eps);
  const auto cv = adamw_consts<Vec>(lr, beta1, beta2, weight_decay, eps);
  const std::vector<Chunk> chunks = make_chunks(params);

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(params, chunks),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t ci = lo; ci < hi; ++ci) {
      const Chunk& ch = chunks[ci];
      const at::Tensor& p = params[ch.tensor];
      float* m = exp_avgs[ch.tensor].data_ptr<float>();
      float* v = exp_avg_sqs[ch.tensor].data_ptr<float>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_adamw_step_", [&] {
        scalar_t* pp = p.data_ptr<scalar_t>();
        const scalar_t* gp = grads[ch.tensor].data_ptr<scalar_t>();
        for_each_active_run(c, c.layout(ch.tensor), ch.begin, ch.end,
                            [&](int64_t mod, int64_t b, int64_t e) {
                              adamw_run<scalar_t>(pp + b, gp + b, m + b, v + b, e - b, c, cs, cv,
                                                  coeffs[mod]);
                            });
      });
    }
  });
}

// ---- SGD ----

template <typename scalar_t>
void sgd_run(scalar_t* p, const scalar_t* g, float* buf, int64_t n, bool first,
             const StepContext& c, const SgdConsts<float>& cs, const SgdConsts<Vec>& cv) {
  int64_t i = 0;
  float unused_buf = 0.f;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kHasAvx) {
      i = sgd_run_f32_avx(p, g, buf, n, first, cs, c.has_scale, c.grad_scale, c.maximize);
    }
    const Vec scale(c.grad_scale);
    Vec unused_vec(0.f);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i);
      Vec bv = buf ? Vec::loadu(buf + i) : unused_vec;
      const Vec gv = prepare_grad(Vec::loadu(g + i), c.has_scale, scale, c.maximize);
      sgd_update(pv, gv, bv, first, cv);
      pv.store(p + i);
      if (buf) bv.store(buf + i);
    }
  }
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    const float gf = prepare_grad(static_cast<float>(g[i]), c.has_scale, c.grad_scale, c.maximize);
    sgd_update(pf, gf, buf ? buf[i] : unused_buf, first, cs);
    p[i] = static_cast<scalar_t>(pf);
  }
}

void masked_sgd_step_cpu(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, const at::Tensor& module_steps,
                         const at::Tensor& module_mask, const at::Tensor& layout_table,
                         const at::Tensor& group_table, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool maximize,
                         const c10::optional<at::Tensor>& grad_scale,
                         const c10::optional<at::Tensor>& found_inf) {
  const bool has_momentum = momentum != 0.0;
  std::vector<std::pair<const char*, at::TensorList>> states;
  if (has_momentum) states.push_back({"momentum_buffers", momentum_buffers});
  check_masked_step_inputs("masked_sgd_step_", params, grads, states, module_steps, module_mask,
                           layout_table, group_table, grad_scale, found_inf);
  if (params.empty()) return;
  ensure_group_table_valid(group_table, module_mask.size(0));
  if (step_skipped(found_inf)) return;

  const StepContext c = make_context(module_steps, module_mask, layout_table, group_table,
                                     grad_scale, maximize);
  const auto cs = sgd_consts<float>(lr, momentum, dampening, weight_decay, nesterov);
  const auto cv = sgd_consts<Vec>(lr, momentum, dampening, weight_decay, nesterov);
  const std::vector<Chunk> chunks = make_chunks(params);

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(params, chunks),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t ci = lo; ci < hi; ++ci) {
      const Chunk& ch = chunks[ci];
      const at::Tensor& p = params[ch.tensor];
      float* buf = has_momentum ? momentum_buffers[ch.tensor].data_ptr<float>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_step_", [&] {
        scalar_t* pp = p.data_ptr<scalar_t>();
        const scalar_t* gp = grads[ch.tensor].data_ptr<scalar_t>();
        for_each_active_run(c, c.layout(ch.tensor), ch.begin, ch.end,
                            [&](int64_t mod, int64_t b, int64_t e) {
                              sgd_run<scalar_t>(pp + b, gp + b, buf ? buf + b : nullptr, e - b,
                                                c.module_steps[mod] == 0, c, cs, cv);
                            });
      });
    }
  });
}

// ---- per-module step counts ----

void masked_module_steps_cpu(const at::Tensor& module_steps, const at::Tensor& module_mask,
                             const c10::optional<at::Tensor>& found_inf) {
  check_module_tensors(module_steps, module_mask, module_mask.device());
  check_amp_tensor(found_inf, "found_inf", module_mask.device());
  const bool skip = step_skipped(found_inf);
  const bool* mask = module_mask.data_ptr<bool>();
  int64_t* steps = module_steps.data_ptr<int64_t>();
  const int64_t num_modules = module_mask.size(0);
  for (int64_t m = 0; m <= num_modules; ++m) {
    steps[m] = next_module_step(steps[m], module_active(mask, num_modules, m), skip);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mat_cuda, CPU, m) {
  m.impl("masked_adamw_step_", &masked_adamw_step_cpu);
  m.impl("masked_sgd_step_", &masked_sgd_step_cpu);
  m.impl("masked_module_steps_", &masked_module_steps_cpu);
}

}  // namespace optim
}  // namespace mat_cuda
