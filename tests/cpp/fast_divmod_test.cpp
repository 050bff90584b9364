// Checks csrc/common/fast_divmod.h against the hardware `/` and `%`: every divisor 1..4096 with
// dividends around each multiple, powers of two and their neighbours, and random 64-bit
// divisors and dividends up to 2^63 - 1. Built and run by tests/test_fast_divmod.py; it
// prints "<n> mismatches" and exits 1 on any mismatch.
#include <cstdio>
#include <random>

#include "common/fast_divmod.h"

using mat_cuda::FastDivU64;
using mat_cuda::make_fast_div_u64;

static long mismatches = 0, checks = 0;

static void check(uint64_t n, uint64_t d, const FastDivU64& f) {
  ++checks;
  if (f.div(n) != n / d || f.mod(n) != n % d) {
    if (mismatches++ < 10) {
      std::printf("mismatch: %llu / %llu -> %llu (want %llu)\n", (unsigned long long)n,
                  (unsigned long long)d, (unsigned long long)f.div(n), (unsigned long long)(n / d));
    }
  }
}

static void check_divisor(uint64_t d, std::mt19937_64& rng) {
  const FastDivU64 f = make_fast_div_u64(d);
  const uint64_t top = (uint64_t{1} << 63) - 1;
  for (uint64_t k : {uint64_t{0}, uint64_t{1}, uint64_t{2}, uint64_t{7}, uint64_t{1000}, top / d - 1, top / d}) {
    const uint64_t base = k * d;
    for (int delta = -2; delta <= 2; ++delta) {
      const uint64_t n = base + static_cast<uint64_t>(delta);
      if (n <= top && !(delta < 0 && base < 2)) check(n, d, f);
    }
  }
  check(top, d, f);
  for (int i = 0; i < 64; ++i) check(rng() >> 1, d, f);
  for (int i = 0; i < 16; ++i) check(rng() >> (1 + rng() % 62), d, f);
}

int main() {
  std::mt19937_64 rng(12345);
  for (uint64_t d = 1; d <= 4096; ++d) check_divisor(d, rng);
  for (int s = 1; s < 63; ++s) {
    const uint64_t p = uint64_t{1} << s;
    check_divisor(p - 1, rng);
    check_divisor(p, rng);
    check_divisor(p + 1, rng);
  }
  for (int i = 0; i < 20000; ++i) {
    const uint64_t d = (rng() >> (1 + rng() % 63)) | 1;
    check_divisor(d, rng);
    check_divisor(d + 1, rng);
  }
  const FastDivU64 zero = make_fast_div_u64(0);
  if (zero.divisor != 0 || zero.magic != 0 || zero.shift != 0) ++mismatches;
  std::printf("%ld checks, %ld mismatches\n", checks, mismatches);
  return mismatches == 0 ? 0 : 1;
}
