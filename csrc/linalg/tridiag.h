// The small symmetric tridiagonal eigenproblem that Lanczos produces, solved by one thread.
//
// T (s×s) is held as its diagonal a[0..s) and off-diagonal b[0..s-1), in double whatever the
// input dtype (s ≤ iters, a few tens: the cost is nothing next to the matvecs, and double
// keeps the Ritz values exact to the rounding of the Lanczos coefficients themselves).
//
//  * tridiag_top_laguerre: the largest eigenvalue of T_s, given the largest of T_{s-1}, by
//    Laguerre's method on det(xI − T) from above (monotone for real-rooted polynomials, cubic;
//    its derivatives come from the LDLᵀ pivots d_i(x) of T − xI), falling back to bisection
//    when the bracket is left. It also returns the last component of the unit
//    eigenvector, s_last² = −1 / d_s'(λ): the Lanczos residual estimate |β s_last| for free.
//  * tridiag_bisect: the eigenvalue of a given ascending index by Sturm-count bisection
//    (LAPACK dstebz's recurrence and pivmin).
//  * tridiag_eigvec: the unit eigenvector for an eigenvalue by inverse iteration with a
//    partial-pivoting LU of T − λI (LAPACK dgttrf/dgttrs), returning the Rayleigh quotient.
// All are MAT_HD: the CPU and CUDA kernels run this very code.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace mat_cuda {
namespace linalg {

// SplitMix64 (Steele et al.): a fixed integer hash, identical on host and device.
MAT_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Element i of the deterministic pseudo-random vector number `stream` for `seed`, uniform in
// [-1, 1). The Lanczos start vector is stream 0; restarts after a breakdown use 1, 2, ...
MAT_HD double hashed_uniform(uint64_t seed, uint64_t stream, int64_t i) {
  const uint64_t h = splitmix64(seed ^ splitmix64(stream * 0x2545F4914F6CDD1Dull +
                                                  static_cast<uint64_t>(i)));
  return static_cast<double>(h >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

// False for NaN and ±Inf (no std:: / CUDA overload ambiguity).
MAT_HD bool is_finite(double x) { return x - x == 0.0; }

// Gershgorin interval [lo, hi] of T and max b².
MAT_HD void tridiag_gershgorin(const double* a, const double* b, int s, double* lo, double* hi,
                               double* max_b2) {
  double l = a[0], h = a[0], mb2 = 0.0;
  for (int i = 0; i < s; ++i) {
    const double r = (i > 0 ? fabs(b[i - 1]) : 0.0) + (i + 1 < s ? fabs(b[i]) : 0.0);
    l = fmin(l, a[i] - r);
    h = fmax(h, a[i] + r);
    if (i + 1 < s) mb2 = fmax(mb2, b[i] * b[i]);
  }
  *lo = l;
  *hi = h;
  *max_b2 = mb2;
}

// Smallest pivot magnitude allowed in the Sturm recurrence (LAPACK's pivmin).
MAT_HD double tridiag_pivmin(double max_b2) { return DBL_MIN * fmax(1.0, max_b2); }

// Number of eigenvalues of T strictly below x (Sturm count of the LDLᵀ pivots of T − xI).
MAT_HD int tridiag_count_below(const double* a, const double* b, int s, double x, double pivmin) {
  int count = 0;
  double d = 1.0;
  for (int i = 0; i < s; ++i) {
    d = a[i] - x - (i > 0 ? b[i - 1] * b[i - 1] / d : 0.0);
    if (fabs(d) <= pivmin) d = -pivmin;
    if (d < 0.0) ++count;
  }
  return count;
}

// The eigenvalue of ascending index idx (0-based) of T, bracketed by [lo, hi], to an absolute
// width of abs_tol (plus rounding).
MAT_HD double tridiag_bisect(const double* a, const double* b, int s, int idx, double lo, double hi,
                             double pivmin, double abs_tol) {
  for (int it = 0; it < 256; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (hi - lo <= abs_tol + 2.0 * pivmin || mid <= lo || mid >= hi) break;
    if (tridiag_count_below(a, b, s, mid, pivmin) <= idx) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return 0.5 * (lo + hi);
}

// Largest eigenvalue of T (size s) and the squared last component of its unit eigenvector.
// `lower` must be a lower bound of λ_max(T) (the previous step's top Ritz value, or −inf).
MAT_HD double tridiag_top_laguerre(const double* a, const double* b, int s, double lower,
                                 double* last_component_sq) {
  double glo, ghi, max_b2;
  tridiag_gershgorin(a, b, s, &glo, &ghi, &max_b2);
  const double norm = fmax(fabs(glo), fabs(ghi));
  if (s == 1) {
    *last_component_sq = 1.0;
    return a[0];
  }
  if (norm == 0.0) {
    *last_component_sq = 1.0;
    return 0.0;
  }
  const double lo = fmax(fmax(lower, glo), a[s - 1]) - 4.0 * DBL_EPSILON * norm;
  // Weyl: T = blockdiag(T_{s-1}, a_s) + (coupling of norm |b_{s-1}|).
  double x = fmin(ghi, fmax(fmax(lower, glo), a[s - 1]) + fabs(b[s - 2])) +
             4.0 * DBL_EPSILON * norm;
  for (int it = 0; it < 64; ++it) {
    // Pivots d_i of the LDLᵀ of T − xI with d_i' and d_i'' (derivatives in x). Above λ_max
    // all d_i < 0 and p(x) = det(xI − T) = Π(−d_i), so G = p'/p = Σ d_i'/d_i and
    // H = G² − p''/p = Σ ((d_i'/d_i)² − d_i''/d_i).
    double d = a[0] - x, dp = -1.0, dpp = 0.0;
    double inv_d = 1.0 / d;  // one division per pivot
    double G = dp * inv_d, H = G * G;
    bool above = d < 0.0;
    for (int i = 1; i < s; ++i) {
      const double r = b[i - 1] * b[i - 1] * inv_d;  // b²/d_{i-1}
      const double rd = r * inv_d;                   // b²/d_{i-1}²
      const double dpp_next = rd * (dpp - 2.0 * dp * dp * inv_d);
      const double dp_next = -1.0 + rd * dp;
      d = a[i] - x - r;
      dp = dp_next;
      dpp = dpp_next;
      if (i + 1 < s && !(d < 0.0)) above = false;
      inv_d = 1.0 / d;
      const double g = dp * inv_d;
      G += g;
      H += g * g - dpp * inv_d;
    }
    if (!above || !(x >= lo)) break;  // left the bracket: bisect instead
    if (!(d < 0.0)) {  // at the root to rounding (Laguerre from above never crosses it)
      *last_component_sq = fmin(1.0, -1.0 / dp);
      return x;
    }
    // Laguerre's step: monotone towards the largest root from above, cubic near it.
    const double ns = static_cast<double>(s);
    const double disc = fmax(0.0, (ns - 1.0) * (ns * H - G * G));
    const double step = ns / (G + sqrt(disc));
    x -= step;
    if (!(step > 2.0 * DBL_EPSILON * fabs(x) + DBL_MIN)) {
      *last_component_sq = fmin(1.0, -1.0 / dp);
      return x;
    }
  }
  // Fallback (block-diagonal T after a restart, or the bracket left by rounding).
  const double pivmin = tridiag_pivmin(max_b2);
  const double lam = tridiag_bisect(a, b, s, s - 1, glo, ghi, pivmin, 2.0 * DBL_EPSILON * norm);
  // The last component from the derivative recurrence is unreliable here; report the worst
  // case so that convergence is judged on the next step or by the explicit residual.
  double d = a[0] - lam, dp = -1.0;
  bool ok = true;
  for (int i = 1; i < s; ++i) {
    if (d == 0.0) { ok = false; break; }
    const double r = b[i - 1] * b[i - 1] / d;
    const double dp_next = -1.0 + r * dp / d;
    d = a[i] - lam - r;
    dp = dp_next;
  }
  *last_component_sq = (ok && dp < 0.0) ? fmin(1.0, -1.0 / dp) : 1.0;
  return lam;
}

// Unit eigenvector x (length s) of T for the eigenvalue near `lambda`, by inverse iteration.
// work: 5*s doubles. Returns the Rayleigh quotient xᵀTx.
MAT_HD double tridiag_eigvec(const double* a, const double* b, int s, double lambda, double* x,
                             double* work) {
  if (s == 1) {
    x[0] = 1.0;
    return a[0];
  }
  double glo, ghi, max_b2;
  tridiag_gershgorin(a, b, s, &glo, &ghi, &max_b2);
  const double norm = fmax(fabs(glo), fabs(ghi));
  // A zero pivot (λ exact) is replaced by eps·‖T‖: the solve then amplifies the eigenvector.
  const double tiny = norm > 0.0 ? DBL_EPSILON * norm : 1.0;
  double* d = work;
  double* dl = work + s;
  double* du = work + 2 * s;
  double* du2 = work + 3 * s;
  double* piv = work + 4 * s;
  for (int i = 0; i < s; ++i) {
    d[i] = a[i] - lambda;
    if (i + 1 < s) {
      dl[i] = b[i];
      du[i] = b[i];
    }
    du2[i] = 0.0;
    piv[i] = 0.0;
  }
  // dgttrf: LU with partial pivoting of the tridiagonal (dl, d, du); fills du2.
  for (int i = 0; i + 1 < s; ++i) {
    if (fabs(d[i]) >= fabs(dl[i])) {
      if (d[i] != 0.0) {
        const double f = dl[i] / d[i];
        dl[i] = f;
        d[i + 1] -= f * du[i];
      }
    } else {
      const double f = d[i] / dl[i];
      d[i] = dl[i];
      dl[i] = f;
      const double t = du[i];
      du[i] = d[i + 1];
      d[i + 1] = t - f * d[i + 1];
      if (i + 2 < s) {
        du2[i] = du[i + 1];
        du[i + 1] = -f * du[i + 1];
      }
      piv[i] = 1.0;
    }
  }
  for (int i = 0; i < s; ++i) {
    if (fabs(d[i]) < tiny) d[i] = d[i] < 0.0 ? -tiny : tiny;
  }
  for (int i = 0; i < s; ++i) x[i] = hashed_uniform(0x5EEDull, 0, i);
  for (int it = 0; it < 3; ++it) {
    // dgttrs: forward (L with the row interchanges), then back substitution with U.
    for (int i = 0; i + 1 < s; ++i) {
      if (piv[i] == 0.0) {
        x[i + 1] -= dl[i] * x[i];
      } else {
        const double t = x[i];
        x[i] = x[i + 1];
        x[i + 1] = t - dl[i] * x[i];
      }
    }
    x[s - 1] /= d[s - 1];
    x[s - 2] = (x[s - 2] - du[s - 2] * x[s - 1]) / d[s - 2];
    for (int i = s - 3; i >= 0; --i) {
      x[i] = (x[i] - du[i] * x[i + 1] - du2[i] * x[i + 2]) / d[i];
    }
    // Normalise (scale by the largest entry first: the solve can grow entries by 1/tiny).
    double big = 0.0;
    for (int i = 0; i < s; ++i) big = fmax(big, fabs(x[i]));
    if (!(big > 0.0) || !is_finite(big)) {
      for (int i = 0; i < s; ++i) x[i] = (i == s - 1) ? 1.0 : 0.0;
      break;
    }
    double nrm2 = 0.0;
    for (int i = 0; i < s; ++i) {
      x[i] /= big;
      nrm2 += x[i] * x[i];
    }
    const double inv = 1.0 / sqrt(nrm2);
    for (int i = 0; i < s; ++i) x[i] *= inv;
  }
  double rq = 0.0;
  for (int i = 0; i < s; ++i) {
    rq += a[i] * x[i] * x[i];
    if (i + 1 < s) rq += 2.0 * b[i] * x[i] * x[i + 1];
  }
  return rq;
}

}  // namespace linalg
}  // namespace mat_cuda
