// The fp32 hot loops of the CPU masked steps on 8-wide AVX vectors. On x86 this translation
// unit is compiled for AVX (the pragmas below) and entered only after a runtime check
// (cpu_has_avx), so the package still runs on CPUs without it; elsewhere it compiles to stubs.
// Torch's own vectors (at::vec) fall back to generic 8-lane arrays on CPUs without AVX2, which
// gcc does not turn into AVX code. FMA stays off: every lane then rounds exactly like the scalar
// code of masked_step.h. Nothing from torch is included here, so no inline function is compiled
// twice with different targets; only the Avx8 instantiations of the shared templates live here.
// (The shared header is included after the pragmas so that those instantiations are AVX code.)
#if defined(__x86_64__) || defined(__i386__)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx")
#endif

#include <immintrin.h>

#include "optim/masked_step_simd.h"

namespace mat_cuda {
namespace optim {
namespace {

struct Avx8 {
  __m256 v;
  Avx8() = default;
  explicit Avx8(float x) : v(_mm256_set1_ps(x)) {}
  explicit Avx8(__m256 x) : v(x) {}
  static Avx8 load(const float* p) { return Avx8(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};

inline Avx8 operator+(const Avx8& a, const Avx8& b) { return Avx8(_mm256_add_ps(a.v, b.v)); }
inline Avx8 operator-(const Avx8& a, const Avx8& b) { return Avx8(_mm256_sub_ps(a.v, b.v)); }
inline Avx8 operator*(const Avx8& a, const Avx8& b) { return Avx8(_mm256_mul_ps(a.v, b.v)); }
inline Avx8 operator/(const Avx8& a, const Avx8& b) { return Avx8(_mm256_div_ps(a.v, b.v)); }

struct Avx8Sqrt {
  Avx8 operator()(const Avx8& x) const { return Avx8(_mm256_sqrt_ps(x.v)); }
};

AdamwConsts<Avx8> broadcast(const AdamwConsts<float>& c) {
  return AdamwConsts<Avx8>{Avx8(c.decay), Avx8(c.lerp_w), Avx8(c.lerp_w_comp), Avx8(c.beta2),
                           Avx8(c.one_minus_beta2), Avx8(c.eps), c.has_decay, c.lerp_from_start};
}

}  // namespace

bool cpu_has_avx() { return __builtin_cpu_supports("avx"); }

int64_t adamw_run_f32_avx(float* p, const float* g, float* m, float* v, int64_t n,
                          const AdamwConsts<float>& cs, AdamModuleCoeffs k, bool has_scale,
                          float grad_scale, bool maximize) {
  const AdamwConsts<Avx8> c = broadcast(cs);
  const Avx8 nss(k.neg_step_size), bc2(k.bc2_sqrt), scale(grad_scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    Avx8 pv = Avx8::load(p + i), mv = Avx8::load(m + i), vv = Avx8::load(v + i);
    const Avx8 gv = prepare_grad(Avx8::load(g + i), has_scale, scale, maximize);
    adamw_update(pv, gv, mv, vv, c, nss, bc2, Avx8Sqrt());
    pv.store(p + i);
    mv.store(m + i);
    vv.store(v + i);
  }
  return i;
}

int64_t sgd_run_f32_avx(float* p, const float* g, float* buf, int64_t n, bool first,
                        const SgdConsts<float>& cs, bool has_scale, float grad_scale,
                        bool maximize) {
  const SgdConsts<Avx8> c{Avx8(cs.weight_decay), Avx8(cs.momentum), Avx8(cs.one_minus_dampening),
                          Avx8(cs.neg_lr), cs.has_decay, cs.has_momentum, cs.nesterov};
  const Avx8 scale(grad_scale);
  Avx8 unused(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    Avx8 pv = Avx8::load(p + i);
    Avx8 bv = buf ? Avx8::load(buf + i) : unused;
    const Avx8 gv = prepare_grad(Avx8::load(g + i), has_scale, scale, maximize);
    sgd_update(pv, gv, bv, first, c);
    pv.store(p + i);
    if (buf) bv.store(buf + i);
  }
  return i;
}

}  // namespace optim
}  // namespace mat_cuda

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86: no AVX; the callers use their at::vec and scalar loops

#include "optim/masked_step_simd.h"

namespace mat_cuda {
namespace optim {

bool cpu_has_avx() { return false; }

int64_t adamw_run_f32_avx(float*, const float*, float*, float*, int64_t, const AdamwConsts<float>&,
                          AdamModuleCoeffs, bool, float, bool) {
  return 0;
}

int64_t sgd_run_f32_avx(float*, const float*, float*, int64_t, bool, const SgdConsts<float>&, bool,
                        float, bool) {
  return 0;
}

}  // namespace optim
}  // namespace mat_cuda

#endif
