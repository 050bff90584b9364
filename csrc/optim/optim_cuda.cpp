// CUDA registration of the fused masked optimizer ops: the shared input checks, then the
// launchers of masked_step.cu on the current stream (one multi-tensor launch per parameter dtype
// present). The only device read on the host is the group table's one-time check
// (group_table_check.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "optim/group_table_check.h"
#include "optim/optim_checks.h"
#include "optim/optim_launch.h"

namespace mat_cuda {
namespace optim {
namespace {

ParamDtype param_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ParamDtype::kFloat32;
    case at::kBFloat16:
      return ParamDtype::kBFloat16;
    default:
      return ParamDtype::kFloat16;  // the checks admit float32, bfloat16 and float16 only
  }
}

MaskedStepDevicePtrs device_ptrs(const at::Tensor& module_steps, const at::Tensor& module_mask,
                                 const at::Tensor& group_table,
                                 const c10::optional<at::Tensor>& grad_scale,
                                 const c10::optional<at::Tensor>& found_inf, bool maximize) {
  MaskedStepDevicePtrs p;
  p.module_mask = module_mask.data_ptr<bool>();
  p.module_steps = module_steps.data_ptr<int64_t>();
  p.group_table = group_table.data_ptr<int64_t>();
  p.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  p.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  p.num_modules = module_mask.size(0);
  p.maximize = maximize;
  return p;
}

// The launch slots of the tensors whose parameter has dtype `dtype`.
std::vector<TensorSlot> slots_of_dtype(at::ScalarType dtype, at::TensorList params,
                                       at::TensorList grads, at::TensorList state0,
                                       at::TensorList state1, const at::Tensor& layout_table) {
  const int64_t* lt = layout_table.data_ptr<int64_t>();
  std::vector<TensorSlot> slots;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].scalar_type() != dtype) continue;
    TensorSlot s;
    s.param = params[i].data_ptr();
    s.grad = grads[i].data_ptr();
    s.state0 = state0.empty() ? nullptr : state0[i].data_ptr<float>();
    s.state1 = state1.empty() ? nullptr : state1[i].data_ptr<float>();
    s.numel = params[i].numel();
    s.layout = TensorLayout{lt[4 * i], lt[4 * i + 1], lt[4 * i + 2], lt[4 * i + 3]};
    slots.push_back(s);
  }
  return slots;
}

constexpr at::ScalarType kParamDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};

void masked_adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MaskedStepDevicePtrs ptrs =
      device_ptrs(module_steps, module_mask, group_table, grad_scale, found_inf, maximize);
  static_assert(sizeof(AdamModuleCoeffs) == 2 * sizeof(float), "coefficient workspace layout");
  at::Tensor coeffs = at::empty({2 * (ptrs.num_modules + 1)}, module_steps.options().dtype(at::kFloat));
  const AdamwHyper hyper{lr, beta1, beta2, weight_decay, eps};
  for (at::ScalarType dtype : kParamDtypes) {
    const auto slots = slots_of_dtype(dtype, params, grads, exp_avgs, exp_avg_sqs, layout_table);
    if (slots.empty()) continue;
    C10_CUDA_CHECK(launch_masked_adamw(slots.data(), static_cast<int64_t>(slots.size()),
                                       param_dtype(dtype), ptrs, hyper,
                                       reinterpret_cast<AdamModuleCoeffs*>(coeffs.data_ptr<float>()),
                                       stream));
  }
}

void masked_sgd_step_cuda(at::TensorList params, at::TensorList grads,
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
  c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MaskedStepDevicePtrs ptrs =
      device_ptrs(module_steps, module_mask, group_table, grad_scale, found_inf, maximize);
  const SgdHyper hyper{lr, momentum, dampening, weight_decay, nesterov};
  const at::TensorList bufs = has_momentum ? momentum_buffers : at::TensorList();
  for (at::ScalarType dtype : kParamDtypes) {
    const auto slots = slots_of_dtype(dtype, params, grads, bufs, at::TensorList(), layout_table);
    if (slots.empty()) continue;
    C10_CUDA_CHECK(launch_masked_sgd(slots.data(), static_cast<int64_t>(slots.size()),
                                     param_dtype(dtype), ptrs, hyper, stream));
  }
}

void masked_module_steps_cuda(const at::Tensor& module_steps, const at::Tensor& module_mask,
                              const c10::optional<at::Tensor>& found_inf) {
  check_module_tensors(module_steps, module_mask, module_mask.device());
  check_amp_tensor(found_inf, "found_inf", module_mask.device());
  c10::cuda::CUDAGuard guard(module_mask.device());
  C10_CUDA_CHECK(launch_masked_module_steps(
      module_steps.data_ptr<int64_t>(), module_mask.data_ptr<bool>(), module_mask.size(0),
      found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(mat_cuda, CUDA, m) {
  m.impl("masked_adamw_step_", &masked_adamw_step_cuda);
  m.impl("masked_sgd_step_", &masked_sgd_step_cuda);
  m.impl("masked_module_steps_", &masked_module_steps_cuda);
}

}  // namespace optim
}  // namespace mat_cuda
