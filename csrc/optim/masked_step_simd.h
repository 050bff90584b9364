// AVX versions of the fp32 CPU hot loops (masked_step_avx_cpu.cpp). Each returns how many
// leading elements it updated (a multiple of 8); the caller finishes the rest with scalar code.
// Call them only when cpu_has_avx().
#pragma once

#include <stdint.h>

#include "optim/masked_step.h"

namespace mat_cuda {
namespace optim {

bool cpu_has_avx();

int64_t adamw_run_f32_avx(float* p, const float* g, float* m, float* v, int64_t n,
                          const AdamwConsts<float>& c, AdamModuleCoeffs k, bool has_scale,
                          float grad_scale, bool maximize);

// buf: nullptr without momentum.
int64_t sgd_run_f32_avx(float* p, const float* g, float* buf, int64_t n, bool first,
                        const SgdConsts<float>& c, bool has_scale, float grad_scale,
                        bool maximize);

}  // namespace optim
}  // namespace mat_cuda
