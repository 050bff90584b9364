// Host launchers of the CUDA masked optimizer kernels (csrc/optim/masked_step.cu): plain C++
// types only, so the g++-compiled registration (optim_cuda.cpp) and nvcc share this header.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "optim/masked_step.h"

namespace mat_cuda {
namespace optim {

enum class ParamDtype { kFloat32, kBFloat16, kFloat16 };

// One tensor of a launch: its parameter, gradient and up to two fp32 state tensors
// (AdamW: exp_avg, exp_avg_sq; SGD: momentum_buffer or none), all contiguous, numel elements.
struct TensorSlot {
  void* param;
  const void* grad;
  float* state0;
  float* state1;
  int64_t numel;
  TensorLayout layout;
};

// Device pointers every kernel of a call reads (none is read on the host).
struct MaskedStepDevicePtrs {
  const bool* module_mask;      // (num_modules,)
  const int64_t* module_steps;  // (num_modules + 1,), counts before this step
  const int64_t* group_table;   // (G,)
  const float* grad_scale;      // (1,) or nullptr
  const float* found_inf;       // (1,) or nullptr
  int64_t num_modules;
  bool maximize;
};

struct AdamwHyper {
  double lr, beta1, beta2, weight_decay, eps;
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

// tensors: n slots, all of parameter dtype `dtype`, zero-size ones allowed.
// coeff_workspace: (num_modules + 1) AdamModuleCoeffs of device memory, written then read.
cudaError_t launch_masked_adamw(const TensorSlot* tensors, int64_t n, ParamDtype dtype,
                                const MaskedStepDevicePtrs& ptrs, const AdamwHyper& hyper,
                                AdamModuleCoeffs* coeff_workspace, cudaStream_t stream);

cudaError_t launch_masked_sgd(const TensorSlot* tensors, int64_t n, ParamDtype dtype,
                              const MaskedStepDevicePtrs& ptrs, const SgdHyper& hyper,
                              cudaStream_t stream);

// steps: (num_modules + 1,) int64, advanced in place as next_module_step says.
cudaError_t launch_masked_module_steps(int64_t* module_steps, const bool* module_mask,
                                       int64_t num_modules, const float* found_inf,
                                       cudaStream_t stream);

}  // namespace optim
}  // namespace mat_cuda
