// CUDA kernels of the fused masked optimizer steps: a multi-tensor apply over 64K-element chunks
// of the tensor lists. Each block owns one chunk of one tensor; it first asks whether any module
// touching its chunk is active (one __syncthreads_or) and returns before loading anything when
// none is. Elements are processed four at a time with 16-byte (fp32) / 8-byte (half) vector
// loads when the tensors are aligned and each run of four lies in one module, else one at a time.
// The element's module comes from its layout by index arithmetic without a divide instruction
// (masked_step.h, common/fast_divmod.h); the update
// arithmetic is the same MAT_HD code the CPU kernel runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "optim/optim_launch.h"

namespace mat_cuda {
namespace optim {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block

// The kernel argument of one launch: up to kMaxTensors tensors and, per block, which chunk of
// which tensor it updates; a step over more tensors or chunks takes several launches. Kernel
// parameters were limited to 4 KB until CUDA 12.1, which allows 32 764 bytes on Volta and newer
// (the default TORCH_CUDA_ARCH_LIST is 8.0;9.0+PTX; an older architecture stops the build at
// the check below, with the way out): with it, one
// launch covers 192 tensors and 1024 blocks (two waves of 512-thread blocks on a 132-SM H100/H200)
// instead of 16 and 320: a BERT-base step (~200 tensors, ~1700 chunks) takes 2 launches per
// dtype, against about 9 with the 24 tensors and 320 blocks that fitted 4 KB before.
// MAT_CUDA_SMALL_KERNEL_PARAMS forces the 4 KB layout (for a toolkit or target without it).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && !defined(MAT_CUDA_SMALL_KERNEL_PARAMS)
constexpr int kMaxTensors = 192;
constexpr int kMaxBlocks = 1024;
constexpr size_t kKernelParamBytes = 32764;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "mat_cuda: 32 KB kernel parameters need sm_70 or newer; drop the older architectures from TORCH_CUDA_ARCH_LIST or define MAT_CUDA_SMALL_KERNEL_PARAMS"
#endif
#else
constexpr int kMaxTensors = 16;
constexpr int kMaxBlocks = 320;
constexpr size_t kKernelParamBytes = 4096;
#endif
static_assert(kMaxTensors <= 256, "LaunchArgs::tensor holds tensor slots in an unsigned char");

struct LaunchArgs {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* state0[kMaxTensors];
  float* state1[kMaxTensors];
  int64_t numel[kMaxTensors];
  LayoutIndex layout[kMaxTensors];
  int chunk[kMaxBlocks];
  unsigned char tensor[kMaxBlocks];
};

// All parameters of masked_step_kernel<T, Op> must fit the limit (checked per Op, where
// launch_chunks instantiates it); 64 bytes of slack for alignment padding between them.
template <typename Op>
constexpr bool kernel_params_fit() {
  return sizeof(LaunchArgs) + sizeof(MaskedStepDevicePtrs) + sizeof(Op) + 64 <= kKernelParamBytes;
}

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// The AdamW update of one element of module m (coeffs: (M + 1,) from adam_coeffs_kernel).
struct AdamwOp {
  AdamwConsts<float> c;
  const AdamModuleCoeffs* coeffs;
  __device__ __forceinline__ void operator()(float& p, float g, float& s0, float& s1, int64_t m) const {
    const AdamModuleCoeffs k = coeffs[m];
    adamw_update(p, g, s0, s1, c, k.neg_step_size, k.bc2_sqrt, ScalarSqrt());
  }
};

// The SGD update of one element of module m; its buffer starts at the module's first step.
struct SgdOp {
  SgdConsts<float> c;
  const int64_t* module_steps;
  __device__ __forceinline__ void operator()(float& p, float g, float& s0, float&, int64_t m) const {
    sgd_update(p, g, s0, module_steps[m] == 0, c);
  }
};

// Whether a module touching elements [begin, end) of a tensor is active; each thread checks its
// share of the chunk's groups, the caller ORs them over the block.
__device__ bool thread_sees_active_module(const LayoutIndex& l, const MaskedStepDevicePtrs& ptrs,
                                          int64_t begin, int64_t end) {
  if (l.code == kLayoutWhole) {
    return module_active(ptrs.module_mask, ptrs.num_modules, l.module_or_offset);
  }
  int64_t g0, g1;  // inclusive range of group indices within the tensor
  if (l.code == kLayoutRows ||
      l.last_dim.div(static_cast<uint64_t>(begin)) == l.last_dim.div(static_cast<uint64_t>(end - 1))) {
    g0 = layout_group(l, begin);  // rows, or columns inside one row
    g1 = layout_group(l, end - 1);
  } else {
    g0 = 0;
    g1 = static_cast<int64_t>(l.last_dim.divisor / l.span.divisor) - 1;
  }
  for (int64_t g = g0 + threadIdx.x; g <= g1; g += blockDim.x) {
    if (module_active(ptrs.module_mask, ptrs.num_modules, ptrs.group_table[l.module_or_offset + g])) {
      return true;
    }
  }
  return false;
}

template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
masked_step_kernel(LaunchArgs args, MaskedStepDevicePtrs ptrs, Op op) {
  if (ptrs.found_inf != nullptr && *ptrs.found_inf != 0.f) return;
  const int t = args.tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(args.chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(args.numel[t], begin + kChunk);
  const LayoutIndex l = args.layout[t];
  // Uniform across the block, so the early return leaves no thread behind at a barrier.
  if (!__syncthreads_or(thread_sees_active_module(l, ptrs, begin, end))) return;

  T* __restrict__ p = static_cast<T*>(args.param[t]);
  const T* __restrict__ g = static_cast<const T*>(args.grad[t]);
  float* __restrict__ s0 = args.state0[t];
  float* __restrict__ s1 = args.state1[t];
  const bool has_scale = ptrs.grad_scale != nullptr;
  const float scale = has_scale ? *ptrs.grad_scale : 1.f;
  float unused0 = 0.f, unused1 = 0.f;

  int64_t scalar_from = begin;
  if (layout_uniform_in_fours(l) && aligned4<T>(p) && aligned4<T>(g) && aligned4<float>(s0) &&
      aligned4<float>(s1)) {
    const int64_t vec_end = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + 4 * static_cast<int64_t>(threadIdx.x); i < vec_end;
         i += 4 * static_cast<int64_t>(blockDim.x)) {
      const int64_t m = element_module(l, ptrs.group_table, i);
      if (!module_active(ptrs.module_mask, ptrs.num_modules, m)) continue;
      Pack4<T> pv = *reinterpret_cast<const Pack4<T>*>(p + i);
      const Pack4<T> gv = *reinterpret_cast<const Pack4<T>*>(g + i);
      Pack4<float> a, b;
      if (s0 != nullptr) a = *reinterpret_cast<const Pack4<float>*>(s0 + i);
      if (s1 != nullptr) b = *reinterpret_cast<const Pack4<float>*>(s1 + i);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float pf = to_float(pv.v[j]);
        const float gf = prepare_grad(to_float(gv.v[j]), has_scale, scale, ptrs.maximize);
        op(pf, gf, s0 != nullptr ? a.v[j] : unused0, s1 != nullptr ? b.v[j] : unused1, m);
        pv.v[j] = from_float<T>(pf);
      }
      *reinterpret_cast<Pack4<T>*>(p + i) = pv;
      if (s0 != nullptr) *reinterpret_cast<Pack4<float>*>(s0 + i) = a;
      if (s1 != nullptr) *reinterpret_cast<Pack4<float>*>(s1 + i) = b;
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t m = element_module(l, ptrs.group_table, i);
    if (!module_active(ptrs.module_mask, ptrs.num_modules, m)) continue;
    float pf = to_float(p[i]);
    const float gf = prepare_grad(to_float(g[i]), has_scale, scale, ptrs.maximize);
    op(pf, gf, s0 != nullptr ? s0[i] : unused0, s1 != nullptr ? s1[i] : unused1, m);
    p[i] = from_float<T>(pf);
  }
}

// Per-module Adam bias corrections at the step each module is about to take.
__global__ void adam_coeffs_kernel(const int64_t* module_steps, int64_t count, double lr,
                                   double beta1, double beta2, AdamModuleCoeffs* out) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m < count) out[m] = adam_module_coeffs(module_steps[m] + 1, lr, beta1, beta2);
}

__global__ void module_steps_kernel(int64_t* module_steps, const bool* module_mask,
                                    int64_t num_modules, const float* found_inf) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m > num_modules) return;
  const bool skip = found_inf != nullptr && *found_inf != 0.f;
  module_steps[m] = next_module_step(module_steps[m], module_active(module_mask, num_modules, m), skip);
}

// Packs the tensors into LaunchArgs and launches whenever the blocks or the tensor slots are
// full; a tensor cut by a full launch continues in slot 0 of the next one.
template <typename T, typename Op>
cudaError_t launch_chunks(const TensorSlot* tensors, int64_t n, const MaskedStepDevicePtrs& ptrs,
                          const Op& op, cudaStream_t stream) {
  static_assert(kernel_params_fit<Op>(), "masked_step_kernel's parameters exceed the limit");
  LaunchArgs args;
  int nt = 0;
  int nb = 0;
  for (int64_t t = 0; t < n; ++t) {
    const TensorSlot& s = tensors[t];
    if (s.numel == 0) continue;
    args.param[nt] = s.param;
    args.grad[nt] = s.grad;
    args.state0[nt] = s.state0;
    args.state1[nt] = s.state1;
    args.numel[nt] = s.numel;
    args.layout[nt] = make_layout_index(s.layout);
    ++nt;
    const int64_t chunks = (s.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      args.tensor[nb] = static_cast<unsigned char>(nt - 1);
      args.chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt == kMaxTensors)) {
        masked_step_kernel<T, Op><<<nb, kThreads, 0, stream>>>(args, ptrs, op);
        MAT_RETURN_IF_LAUNCH_FAILED();
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {
          args.param[0] = args.param[nt - 1];
          args.grad[0] = args.grad[nt - 1];
          args.state0[0] = args.state0[nt - 1];
          args.state1[0] = args.state1[nt - 1];
          args.numel[0] = args.numel[nt - 1];
          args.layout[0] = args.layout[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    masked_step_kernel<T, Op><<<nb, kThreads, 0, stream>>>(args, ptrs, op);
    MAT_RETURN_IF_LAUNCH_FAILED();
  }
  return cudaSuccess;
}

template <typename Op>
cudaError_t launch_for_dtype(const TensorSlot* tensors, int64_t n, ParamDtype dtype,
                             const MaskedStepDevicePtrs& ptrs, const Op& op, cudaStream_t stream) {
  switch (dtype) {
    case ParamDtype::kFloat32:
      return launch_chunks<float>(tensors, n, ptrs, op, stream);
    case ParamDtype::kBFloat16:
      return launch_chunks<__nv_bfloat16>(tensors, n, ptrs, op, stream);
    case ParamDtype::kFloat16:
      return launch_chunks<__half>(tensors, n, ptrs, op, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_masked_adamw(const TensorSlot* tensors, int64_t n, ParamDtype dtype,
                                const MaskedStepDevicePtrs& ptrs, const AdamwHyper& h,
                                AdamModuleCoeffs* coeff_workspace, cudaStream_t stream) {
  const int64_t count = ptrs.num_modules + 1;
  const int threads = 128;
  adam_coeffs_kernel<<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
      ptrs.module_steps, count, h.lr, h.beta1, h.beta2, coeff_workspace);
  MAT_RETURN_IF_LAUNCH_FAILED();
  const float lerp_w = static_cast<float>(1.0 - h.beta1);
  AdamwOp op;
  op.c = AdamwConsts<float>{static_cast<float>(1.0 - h.lr * h.weight_decay),
                            lerp_w,
                            1.f - lerp_w,
                            static_cast<float>(h.beta2),
                            static_cast<float>(1.0 - h.beta2),
                            static_cast<float>(h.eps),
                            h.weight_decay != 0.0,
                            fabsf(lerp_w) < 0.5f};
  op.coeffs = coeff_workspace;
  return launch_for_dtype(tensors, n, dtype, ptrs, op, stream);
}

cudaError_t launch_masked_sgd(const TensorSlot* tensors, int64_t n, ParamDtype dtype,
                              const MaskedStepDevicePtrs& ptrs, const SgdHyper& h,
                              cudaStream_t stream) {
  SgdOp op;
  op.c = SgdConsts<float>{static_cast<float>(h.weight_decay), static_cast<float>(h.momentum),
                          static_cast<float>(1.0 - h.dampening), static_cast<float>(-h.lr),
                          h.weight_decay != 0.0, h.momentum != 0.0, h.nesterov};
  op.module_steps = ptrs.module_steps;
  return launch_for_dtype(tensors, n, dtype, ptrs, op, stream);
}

cudaError_t launch_masked_module_steps(int64_t* module_steps, const bool* module_mask,
                                       int64_t num_modules, const float* found_inf,
                                       cudaStream_t stream) {
  const int threads = 128;
  const int64_t count = num_modules + 1;
  module_steps_kernel<<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
      module_steps, module_mask, num_modules, found_inf);
  MAT_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

}  // namespace optim
}  // namespace mat_cuda
