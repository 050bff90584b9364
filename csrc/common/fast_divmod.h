// Division by a run-time invariant integer without a divide instruction (Granlund & Montgomery,
// "Division by invariant integers using multiplication", PLDI 1994, section 4, the variant
// with an N+1-bit multiplier): the divisor's magic number and shift are computed once on the
// host, and each quotient then costs one high multiply, an add and a shift. A 64-bit `/` on a
// GPU is a ~70-instruction software routine; this is a few instructions, on host and device
// alike. No torch, no CUDA headers: both the CPU (g++) and CUDA (nvcc) kernels include it.
//
// Domain: dividends n < 2^63 (flat element indices of int64-indexed tensors) and divisors
// 1 <= d < 2^63. With l = ceil(log2 d) and m = floor(2^64 (2^l - d) / d) + 1 (< 2^64 because
// 2^l < 2d), floor(n / d) = (mulhi(m, n) + n) >> l, where mulhi(m, n) <= n keeps the sum below
// 2^64 for n < 2^63. tests/cpp/fast_divmod_test.cpp checks it against `/` and `%`.
#pragma once

#include <stdint.h>

#include "common/host_device.h"

namespace mat_cuda {

// The high 64 bits of the 128-bit product a·b.
MAT_HD uint64_t mulhi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32, b_lo = b & 0xffffffffu, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

// A divisor d with its magic number. divisor == 0 marks "no divisor" (never divided by).
struct FastDivU64 {
  uint64_t divisor;
  uint64_t magic;
  uint32_t shift;

  // floor(n / divisor) for n < 2^63.
  MAT_HD uint64_t div(uint64_t n) const { return (mulhi_u64(magic, n) + n) >> shift; }

  // n - floor(n / divisor) · divisor.
  MAT_HD uint64_t mod(uint64_t n) const { return n - div(n) * divisor; }
};

// Host: the magic number of d (1 <= d < 2^63; d == 0 gives the inert {0, 0, 0}).
// floor(2^64 (2^l - d) / d) by shift-and-subtract long division, without 128-bit types.
inline FastDivU64 make_fast_div_u64(uint64_t d) {
  FastDivU64 f{d, 0, 0};
  if (d == 0) return f;
  uint32_t l = 0;
  while (l < 63 && (uint64_t{1} << l) < d) ++l;
  // Long division of r · 2^64 by d, r = 2^l - d < d: 64 quotient bits, remainder kept < d
  // (so r << 1 < 2d < 2^64 never overflows).
  uint64_t r = (uint64_t{1} << l) - d;
  uint64_t q = 0;
  for (int bit = 0; bit < 64; ++bit) {
    r <<= 1;
    q <<= 1;
    if (r >= d) {
      r -= d;
      q |= 1;
    }
  }
  f.magic = q + 1;
  f.shift = l;
  return f;
}

}  // namespace mat_cuda
