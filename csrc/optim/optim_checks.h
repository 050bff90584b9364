// Input checks of the fused masked optimizer ops, shared by the CPU and CUDA registrations.
// Every check runs before any tensor is written, so a rejected call leaves everything untouched.
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"
#include "optim/masked_step.h"

namespace mat_cuda {
namespace optim {

inline bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// module_steps: (M + 1,) int64; module_mask: (M,) bool; both on `device`.
inline void check_module_tensors(const at::Tensor& module_steps, const at::Tensor& module_mask,
                                 const at::Device& device) {
  CHECK_DEVICE(module_mask, device);
  CHECK_DTYPE(module_mask, at::kBool);
  CHECK_DIM(module_mask, 1);
  CHECK_CONTIGUOUS(module_mask);
  CHECK_DEVICE(module_steps, device);
  CHECK_DTYPE(module_steps, at::kLong);
  CHECK_CONTIGUOUS(module_steps);
  MAT_CHECK(module_steps.dim() == 1 && module_steps.size(0) == module_mask.size(0) + 1,
            "module_steps must have shape (num_modules + 1,) = (", module_mask.size(0) + 1,
            ",) for module_mask of length ", module_mask.size(0), ", got ", module_steps.sizes());
}

// grad_scale / found_inf: optional one-element float32 tensors on `device` (torch.amp.GradScaler).
inline void check_amp_tensor(const c10::optional<at::Tensor>& t, const char* name,
                             const at::Device& device) {
  if (!t.has_value()) return;
  MAT_CHECK(t->device() == device, name, " must be on ", device, ", got ", t->device());
  MAT_CHECK(t->scalar_type() == at::kFloat, name, " must have dtype float32, got ", t->scalar_type());
  MAT_CHECK(t->numel() == 1, name, " must have one element, got shape ", t->sizes());
}

// Checks the tensor lists against each other and the layout table, and the layout table's
// indices against the group table and the module count, so that every index a kernel computes
// from them stays in bounds. states: the per-element fp32 state lists (exp_avg, exp_avg_sq or
// momentum_buffer); an empty list is allowed where state_may_be_empty (SGD without momentum).
inline void check_masked_step_inputs(const char* op, at::TensorList params, at::TensorList grads,
                                     const std::vector<std::pair<const char*, at::TensorList>>& states,
                                     const at::Tensor& module_steps, const at::Tensor& module_mask,
                                     const at::Tensor& layout_table, const at::Tensor& group_table,
                                     const c10::optional<at::Tensor>& grad_scale,
                                     const c10::optional<at::Tensor>& found_inf) {
  const int64_t n = static_cast<int64_t>(params.size());
  MAT_CHECK(static_cast<int64_t>(grads.size()) == n, op, ": grads has ", grads.size(),
            " tensors, params has ", n);
  for (const auto& s : states) {
    MAT_CHECK(static_cast<int64_t>(s.second.size()) == n, op, ": ", s.first, " has ",
              s.second.size(), " tensors, params has ", n);
  }
  MAT_CHECK(layout_table.device().is_cpu(), op, ": layout_table must be a CPU tensor (host "
            "metadata), got ", layout_table.device());
  CHECK_DTYPE(layout_table, at::kLong);
  CHECK_CONTIGUOUS(layout_table);
  MAT_CHECK(layout_table.dim() == 2 && layout_table.size(0) == n && layout_table.size(1) == 4, op,
            ": layout_table must have shape (", n, ", 4), got ", layout_table.sizes());
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_module_tensors(module_steps, module_mask, device);
  CHECK_DEVICE(group_table, device);
  CHECK_DTYPE(group_table, at::kLong);
  CHECK_DIM(group_table, 1);
  CHECK_CONTIGUOUS(group_table);
  check_amp_tensor(grad_scale, "grad_scale", device);
  check_amp_tensor(found_inf, "found_inf", device);

  const int64_t num_modules = module_mask.size(0);
  const int64_t num_groups = group_table.size(0);
  const int64_t* lt = layout_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    MAT_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
              device, "; all parameters of one group must be on one device");
    MAT_CHECK(!p.is_complex(), op, ": params[", i, "] is complex (", p.scalar_type(),
              "); complex parameters are not supported");
    MAT_CHECK(is_supported_param_dtype(p.scalar_type()), op, ": params[", i,
              "] must be float32, bfloat16 or float16, got ", p.scalar_type());
    MAT_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    MAT_CHECK(g.layout() == at::kStrided, op, ": grads[", i, "] is sparse (", g.layout(),
              "); sparse gradients are not supported");
    MAT_CHECK(!g.is_complex(), op, ": grads[", i, "] is complex; complex gradients are not supported");
    MAT_CHECK(g.device() == device, op, ": grads[", i, "] must be on ", device, ", got ", g.device());
    MAT_CHECK(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] must have the dtype of params[",
              i, "] (", p.scalar_type(), "), got ", g.scalar_type());
    MAT_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] must have shape ", p.sizes(), ", got ",
              g.sizes());
    MAT_CHECK(g.is_contiguous(), op, ": grads[", i, "] must be contiguous");
    for (const auto& s : states) {
      const at::Tensor& st = s.second[i];
      MAT_CHECK(st.device() == device && st.scalar_type() == at::kFloat && st.sizes() == p.sizes() &&
                    st.is_contiguous(),
                op, ": ", s.first, "[", i, "] must be a contiguous float32 tensor of shape ", p.sizes(),
                " on ", device, ", got ", st.scalar_type(), " ", st.sizes(), " on ", st.device());
    }
    const TensorLayout l{lt[4 * i], lt[4 * i + 1], lt[4 * i + 2], lt[4 * i + 3]};
    const int64_t numel = p.numel();
    if (l.code == kLayoutWhole) {
      MAT_CHECK(l.module_or_offset >= 0 && l.module_or_offset <= num_modules, op,
                ": layout_table row ", i, " names module ", l.module_or_offset,
                ", out of range [0, ", num_modules, "]");
      continue;
    }
    MAT_CHECK(l.code == kLayoutRows || l.code == kLayoutCols, op, ": layout_table row ", i,
              " has unknown layout code ", l.code);
    if (numel == 0) continue;
    int64_t groups = 0;
    if (l.code == kLayoutRows) {
      MAT_CHECK(l.span > 0 && numel % l.span == 0, op, ": layout_table row ", i, ": row-group span ",
                l.span, " does not divide params[", i, "].numel() = ", numel);
      groups = numel / l.span;
    } else {
      MAT_CHECK(l.last_dim > 0 && p.dim() >= 1 && p.size(-1) == l.last_dim && l.span > 0 &&
                    l.last_dim % l.span == 0,
                op, ": layout_table row ", i, ": column groups of ", l.span, " over a last dim of ",
                l.last_dim, " do not fit params[", i, "] of shape ", p.sizes());
      groups = l.last_dim / l.span;
    }
    MAT_CHECK(l.module_or_offset >= 0 && l.module_or_offset + groups <= num_groups, op,
              ": layout_table row ", i, ": groups [", l.module_or_offset, ", ",
              l.module_or_offset + groups, ") exceed group_table of length ", num_groups);
  }
}

}  // namespace optim
}  // namespace mat_cuda
