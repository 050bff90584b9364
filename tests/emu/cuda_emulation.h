// A CUDA emulation for the host compiler: the real csrc/*/*.cu kernels, compiled by g++ against
// this header (force-included; cuda_runtime.h / cuda_fp16.h / cuda_bf16.h in emu/include
// resolve here), run on the CPU. Each block's threads are fibers scheduled between barriers
// in a chosen order (forward, reverse or seeded random), so a missing barrier or a race shows up
// as a difference between schedules. Launches are checked as CUDA checks them (grid and block
// limits, shared memory, kernel-parameter size). Warp collectives assert that every lane named
// by the mask arrives. Shared memory is allocated per block at exactly the size declared or
// launched (an overrun is caught by AddressSanitizer) and filled with schedule-dependent
// garbage (a read before a write differs between schedules).
//
// The build (tests/emu/emu_build.py) copies csrc/ and rewrites two constructs that no macro can
// express: `k<<<grid, block, smem, stream>>>(args)` becomes
// `::emu::launcher("k", k, grid, block, smem, stream)(args)`, and a `__shared__` declaration
// becomes a reference to the block's shared storage (::emu::static_shared / dynamic_shared).
// Everything else is this header. Single host thread: the "threads" of a block are fibers.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- what nvcc defines ----
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000  // the toolkit on PATH (nvcc 13.0); -DCUDART_VERSION=... to change
#endif
#define __CUDACC_VER_MAJOR__ (CUDART_VERSION / 1000)
#define __CUDACC_VER_MINOR__ ((CUDART_VERSION % 1000) / 10)
#define __CUDACC__ 1  // the sources take their CUDA branches (MAT_HD = __host__ __device__ ...)
// __CUDA_ARCH__ stays undefined: host and device code share one compile here.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
// __restrict__ is a g++ keyword already.

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
constexpr int warpSize = 32;

// ---- runtime API subset ----
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorNotSupported = 801,
};
typedef cudaError_t cudaError;
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

namespace emu {

// The emulated device (an H100/H200-class sm_90 by default); tests change max_smem_optin to
// force Lanczos' shared-memory placements.
struct DeviceProps {
  int major = 9, minor = 0;
  int sm_count = 132;
  int max_threads_per_block = 1024;
  int max_block_dim[3] = {1024, 1024, 64};
  int64_t max_grid_dim[3] = {2147483647LL, 65535, 65535};
  int smem_per_block = 48 * 1024;  // without opt-in
  int max_smem_optin = 227 * 1024;
  int smem_per_sm = 228 * 1024;
};
DeviceProps& device();

// Kernel-parameter limit: 32764 bytes from CUDA 12.1 on Volta and newer, else 4096.
inline size_t param_limit() { return (CUDART_VERSION >= 12010 && device().major >= 7) ? 32764 : 4096; }

enum class Order { kForward, kReverse, kRandom };
struct Schedule {
  Order order = Order::kForward;
  uint64_t seed = 0;
};
void set_schedule(const Schedule& s);
const Schedule& schedule();

[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Per-fiber and per-block coordinates (the scheduler updates them at every switch).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// ---- block collectives (implemented by the scheduler) ----
enum class BarKind { kSync, kOr, kAnd, kCount };
int block_barrier(BarKind kind, int pred);
enum class WarpOp { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width);

// ---- shared memory of the running block ----
void* shared_site(const char* file, int line, size_t bytes, size_t align);
void* dynamic_shared_base();
template <class T>
T& static_shared(const char* file, int line) {
  return *static_cast<T*>(shared_site(file, line, sizeof(T), alignof(T)));
}
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

// ---- launches ----
struct LaunchRecord;
// Validates the configuration (sets the sticky error and returns false when CUDA would refuse
// the launch); records the launch.
bool begin_launch(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem,
                  size_t param_bytes);
// Runs every block of the last validated launch: body(ctx) runs one thread.
void run_grid(void (*thread_body)(void*), void* ctx);

template <class... P>
constexpr size_t param_bytes_of() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

// Names the launched instantiation (note_instance) in the launch record; F is the kernel as
// the launch site spells it, so lanczos_kernel<S, true> and <S, false> (same parameter types)
// are told apart: GCC's __PRETTY_FUNCTION__ prints F with every template argument resolved.
void note_instance(const char* pretty);
template <auto F>
const char* instance_pretty() {
  return __PRETTY_FUNCTION__;
}

template <class... P>
struct Launcher {
  const char* name;
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  const char* instance = nullptr;

  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    if (!begin_launch(name, reinterpret_cast<const void*>(fn), grid, block, smem,
                      param_bytes_of<P...>())) {
      if (instance != nullptr) note_instance(instance);
      return;
    }
    if (instance != nullptr) note_instance(instance);
    // The parameters as the kernel receives them (converted once, copied per thread).
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{fn, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(a))...)};
    run_grid(
        [](void* c) {
          Ctx* x = static_cast<Ctx*>(c);
          std::apply(x->fn, x->args);  // the kernel's by-value parameters: a copy per thread
        },
        &ctx);
  }
};

template <class... P>
Launcher<P...> launcher(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0,
                        cudaStream_t = nullptr) {
  return Launcher<P...>{name, fn, grid, block, smem};
}

// The form the build's rewrite emits: `::emu::launcher<&k<T>>("k", k<T>, grid, block, ...)`.
template <auto F, class... P>
Launcher<P...> launcher(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0,
                        cudaStream_t = nullptr) {
  return Launcher<P...>{name, fn, grid, block, smem, instance_pretty<F>()};
}

cudaError_t func_set_attribute(const void* fn, cudaFuncAttribute attr, int value);
cudaError_t take_last_error();
cudaError_t peek_last_error();

}  // namespace emu

#define threadIdx (::emu::g_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { ::emu::block_barrier(::emu::BarKind::kSync, 0); }
inline int __syncthreads_or(int p) { return ::emu::block_barrier(::emu::BarKind::kOr, p != 0); }
inline int __syncthreads_and(int p) { return ::emu::block_barrier(::emu::BarKind::kAnd, p != 0); }
inline int __syncthreads_count(int p) { return ::emu::block_barrier(::emu::BarKind::kCount, p != 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::emu::warp_op(::emu::WarpOp::kSyncwarp, mask, 0, 0, warpSize);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace emu {
template <class T>
T shfl(WarpOp op, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  return ::emu::shfl(::emu::WarpOp::kShflIdx, mask, v, src, width);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::emu::shfl(::emu::WarpOp::kShflUp, mask, v, static_cast<int>(delta), width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::emu::shfl(::emu::WarpOp::kShflDown, mask, v, static_cast<int>(delta), width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::emu::shfl(::emu::WarpOp::kShflXor, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(::emu::warp_op(::emu::WarpOp::kBallot, mask, p != 0, 0, warpSize));
}
inline int __any_sync(unsigned mask, int p) {
  return static_cast<int>(::emu::warp_op(::emu::WarpOp::kAny, mask, p != 0, 0, warpSize));
}
inline int __all_sync(unsigned mask, int p) {
  return static_cast<int>(::emu::warp_op(::emu::WarpOp::kAll, mask, p != 0, 0, warpSize));
}

// ---- atomics: a fiber is never interrupted between two barriers, so these are atomic ----
template <class T>
inline T atomicAdd(T* a, T v) {
  T old = *a;
  *a = old + v;
  return old;
}
template <class T>
inline T atomicSub(T* a, T v) {
  T old = *a;
  *a = old - v;
  return old;
}
template <class T>
inline T atomicMax(T* a, T v) {
  T old = *a;
  *a = old < v ? v : old;
  return old;
}
template <class T>
inline T atomicMin(T* a, T v) {
  T old = *a;
  *a = v < old ? v : old;
  return old;
}
template <class T>
inline T atomicExch(T* a, T v) {
  T old = *a;
  *a = v;
  return old;
}
template <class T>
inline T atomicCAS(T* a, T cmp, T v) {
  T old = *a;
  if (old == cmp) *a = v;
  return old;
}
template <class T>
inline T atomicOr(T* a, T v) {
  T old = *a;
  *a = old | v;
  return old;
}
template <class T>
inline T atomicAnd(T* a, T v) {
  T old = *a;
  *a = old & v;
  return old;
}

// ---- device functions the sources use ----
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
// CUDA's integer/float min and max overloads (global namespace, mixed signedness as in CUDA's
// math headers: the common type).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// ---- half and bfloat16: storage types with the hardware's round-to-nearest-even conversions ----
namespace emu {
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// IEEE binary16 from binary32, round to nearest even (cvt.rn.f16.f32); NaN stays NaN (quiet).
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | (abs > 0x7f800000u ? (0x7e00u | ((abs >> 13) & 0x3ffu)) : 0x7c00u));
  }
  const int exp = static_cast<int>(abs >> 23) - 127;
  if (exp > 15) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  uint32_t mant = (abs & 0x7fffffu) | 0x800000u;               // 24 bits with the implicit 1
  int shift;                                                    // bits to drop from mant
  uint32_t hexp;
  if (exp >= -14) {
    shift = 13;
    hexp = static_cast<uint32_t>(exp + 15);
  } else {
    if (abs == 0) return static_cast<uint16_t>(sign);
    shift = 13 + (-14 - exp);  // subnormal: value = mant >> shift in units of 2^-24
    hexp = 0;
    if (shift > 24) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
  }
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  uint32_t out;
  if (hexp == 0) {
    out = q;  // may round up into the smallest normal: the bit pattern carries over correctly
  } else {
    out = (hexp << 10) + (q - 0x400u);  // q in [0x400, 0x800]; 0x800 carries into the exponent
  }
  return static_cast<uint16_t>(sign | out);
}
inline float f16_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(mant), -24);
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}
// bfloat16 from binary32, round to nearest even (cvt.rn.bf16.f32); NaN -> canonical 0x7fff.
inline uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }
}  // namespace emu

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(::emu::f32_to_f16_bits(f)) {}
  operator float() const { return ::emu::f16_bits_to_f32(__x); }
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(::emu::f32_to_bf16_bits(f)) {}
  operator float() const { return ::emu::bf16_bits_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline float __half2float(__half h) { return ::emu::f16_bits_to_f32(h.__x); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::emu::bf16_bits_to_f32(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---- runtime API functions ----
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int multiProcessorCount;
  int major, minor;
};
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t cudaDriverGetVersion(int* version);
inline cudaError_t cudaGetLastError() { return ::emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::emu::peek_last_error(); }
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
template <class F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return ::emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
