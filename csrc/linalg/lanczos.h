// Lanczos with full reorthogonalisation for the top eigenvalue(s) of one symmetric n×n matrix,
// written once for the CPU and the CUDA kernel.
//
// The driver is a template over a `Team`: the threads that work on one matrix. On the CPU the
// team is one thread (SerialTeam, lanczos_cpu.cpp); on CUDA it is one thread block
// (BlockTeam, lanczos.cu). Every thread of the team runs the driver; the team supplies the
// collective vector primitives, and the scalar decisions (convergence, breakdown, NaN) are
// taken by the team leader and read back by all from `LanczosScratch::flags` after a sync, so
// that all threads follow the same control flow. Team interface:
//   rank(), size(), leader(), sync()
//   dot(x, y, n)                  -> x·y accumulated in double (squared norms of float32
//                                    vectors neither overflow nor underflow), returned to
//                                    every thread (ends synced)
//   gemv(A, rows, cols, x, y)     y[r] = A[r,:]·x            (A row-major; ends synced)
//   sub_combination(Q, rows, n, c, w)   w -= Σ_r c[r] Q[r,:]   (ends synced)
//   combination(Q, rows, n, s, y)       y = Σ_r s[r] Q[r,:]    (s double; ends synced)
//
// One Lanczos step j (q_j unit, T's α_j on the diagonal, β_j below it):
//   w = K q_j;  α = q_j·w;  w -= α q_j + β_{j-1} q_{j-1}      (three-term recurrence)
//   c = Q_{0..j} w;  w -= Q_{0..j}ᵀ c;  α += c_j              (full reorthogonalisation: one
//                                                             classical Gram–Schmidt pass after
//                                                             the local one is enough here)
//   β_j = ‖w‖;  q_{j+1} = w / β_j
// then T_{j+1} is solved for its top Ritz value(s) θ and the residual estimates |β_j s_last|.
// The matrix stops when every requested residual estimate is ≤ tol·|θ_1| (or the budget is
// spent, or j+1 = n). When β_j collapses (an invariant subspace: rank-deficient K, or a start
// vector in one) before that, Lanczos restarts with a fresh hashed vector orthogonalised
// against Q and a zero coupling in T, so that after n steps Q is a full basis and T ~ K.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "linalg/tridiag.h"

namespace mat_cuda {
namespace linalg {

constexpr int kMaxTopk = 8;

// Per-matrix scratch; on CUDA in shared memory where it fits, else global.
template <typename S>
struct LanczosScratch {
  S* Q;           // (m, n) Lanczos basis, row j = q_j
  S* w;           // (n) the next Lanczos vector
  S* coef;        // (m) Gram–Schmidt coefficients
  double* alpha;  // (m) diagonal of T
  double* beta;   // (m) off-diagonal of T (beta[j] couples j and j+1)
  double* s;      // (m) eigenvector of T for θ_1
  double* work;   // (5 m) inverse iteration
  double* ritz;   // (kMaxTopk) top Ritz values, descending
  double* est;    // (kMaxTopk) residual estimates
  int* flags;     // (4) kDone, kRestart, kNaN, kSteps
};

constexpr int kDone = 0, kRestart = 1, kNaN = 2, kSteps = 3;

struct LanczosOptions {
  int n;          // matrix size
  int m;          // step budget, 1 ≤ m ≤ n
  int topk;       // eigenvalues wanted, 1 ≤ topk ≤ min(m, kMaxTopk)
  double tol;     // relative residual tolerance
  uint64_t seed;  // start-vector seed
};

// Solves T_s for its top Ritz values and residual estimates (leader only).
// ritz[0] on entry: the previous step's θ_1 (a lower bound), or -inf.
MAT_HD void lanczos_solve_tridiag(const double* a, const double* b, int s, double beta_next,
                                  int topk, double* ritz, double* est, double* x, double* work) {
  double last_sq;
  const double theta = tridiag_top_laguerre(a, b, s, ritz[0], &last_sq);
  ritz[0] = theta;
  est[0] = fabs(beta_next) * sqrt(last_sq);
  const int kk = topk < s ? topk : s;
  if (kk <= 1) return;
  double glo, ghi, max_b2;
  tridiag_gershgorin(a, b, s, &glo, &ghi, &max_b2);
  const double norm = fmax(fabs(glo), fabs(ghi));
  const double pivmin = tridiag_pivmin(max_b2);
  for (int k = 1; k < kk; ++k) {
    const double lam = tridiag_bisect(a, b, s, s - 1 - k, glo, fmin(ghi, ritz[k - 1]) + DBL_EPSILON * norm,
                                      pivmin, 2.0 * DBL_EPSILON * norm);
    tridiag_eigvec(a, b, s, lam, x, work);
    // Bisection stops within 2·eps·‖T‖, so eigenvalues equal to rounding could come out in the
    // wrong order by that much; clamping keeps the documented descending order exactly.
    ritz[k] = fmin(lam, ritz[k - 1]);
    est[k] = fabs(beta_next * x[s - 1]);
  }
}

// w -= Σ_{r<rows} (Q[r]·w) Q[r], and returns (Q[rows-1]·w) (the correction to α).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename S, typename Team>
MAT_HD S lanczos_orthogonalise(Team& t, const S* Q, int rows, int n, S* w, S* coef) {
  t.gemv(Q, rows, n, w, coef);
  const S last = coef[rows - 1];
  t.sub_combination(Q, rows, n, coef, w);
  return last;
}

#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename S, typename Team>
MAT_HD void lanczos_matrix(Team& t, const S* K, const S* v0, const LanczosOptions& opt,
                           const LanczosScratch<S>& sc, S* lambdas_out, S* vector_out,
                           int* iterations_out, S* residual_out) {
  const int n = opt.n;
  S* Q = sc.Q;
  S* w = sc.w;

  // Start vector: v0 when given and usable, else the hashed vector of stream 0.
  double nrm2 = 0.0;
  if (v0 != nullptr) {
    for (int i = t.rank(); i < n; i += t.size()) w[i] = v0[i];
    t.sync();
    nrm2 = static_cast<double>(t.dot(w, w, n));
  }
  if (!(nrm2 > 0.0) || !is_finite(nrm2)) {
    for (int i = t.rank(); i < n; i += t.size()) {
      w[i] = static_cast<S>(hashed_uniform(opt.seed, 0, i));
    }
    t.sync();
    nrm2 = static_cast<double>(t.dot(w, w, n));
  }
  {
    const S inv = static_cast<S>(1.0 / sqrt(nrm2));
    for (int i = t.rank(); i < n; i += t.size()) Q[i] = w[i] * inv;
  }
  if (t.leader()) {
    sc.ritz[0] = -INFINITY;
    for (int f = 0; f < 4; ++f) sc.flags[f] = 0;
  }
  t.sync();

  double tnorm = 0.0;  // leader only: running Gershgorin bound of ‖T‖ for the breakdown test
  int restarts = 0;
  for (int j = 0; j < opt.m; ++j) {
    const S* q = Q + static_cast<int64_t>(j) * n;
    t.gemv(K, n, n, q, w);
    const S alpha0 = static_cast<S>(t.dot(q, w, n));
    const S beta_prev = j > 0 ? static_cast<S>(sc.beta[j - 1]) : S(0);
    for (int i = t.rank(); i < n; i += t.size()) {
      S v = w[i] - alpha0 * q[i];
      if (j > 0) v -= beta_prev * Q[static_cast<int64_t>(j - 1) * n + i];
      w[i] = v;
    }
    t.sync();
    const S alpha_fix = lanczos_orthogonalise(t, Q, j + 1, n, w, sc.coef);
    const double beta = sqrt(static_cast<double>(t.dot(w, w, n)));
    if (t.leader()) {
      const double alpha = static_cast<double>(alpha0) + static_cast<double>(alpha_fix);
      sc.alpha[j] = alpha;
      sc.beta[j] = beta;
      sc.flags[kSteps] = j + 1;
      if (!is_finite(alpha) || !is_finite(beta)) {
        sc.flags[kNaN] = 1;
        sc.flags[kDone] = 1;
      } else {
        lanczos_solve_tridiag(sc.alpha, sc.beta, j + 1, beta, opt.topk, sc.ritz, sc.est, sc.s,
                              sc.work);
        tnorm = fmax(tnorm, fabs(alpha) + beta + (j > 0 ? fabs(sc.beta[j - 1]) : 0.0));
        bool converged = j + 1 >= opt.topk;
        const double bound = opt.tol * fabs(sc.ritz[0]);
        for (int k = 0; k < opt.topk && converged; ++k) converged = sc.est[k] <= bound;
        const bool done = converged || j + 1 == opt.m;
        sc.flags[kDone] = done ? 1 : 0;
        // β at rounding level of ‖T‖: w is noise, not a new direction.
        const double eps = sizeof(S) == 4 ? static_cast<double>(FLT_EPSILON) : DBL_EPSILON;
        sc.flags[kRestart] = (!done && beta <= 8.0 * eps * sqrt(static_cast<double>(n)) * tnorm) ? 1 : 0;
      }
    }
    t.sync();
    if (sc.flags[kDone]) break;
    double scale_by;
    if (sc.flags[kRestart]) {
      ++restarts;
      for (int i = t.rank(); i < n; i += t.size()) {
        w[i] = static_cast<S>(hashed_uniform(opt.seed, static_cast<uint64_t>(restarts), i));
      }
      t.sync();
      lanczos_orthogonalise(t, Q, j + 1, n, w, sc.coef);
      lanczos_orthogonalise(t, Q, j + 1, n, w, sc.coef);
      scale_by = sqrt(static_cast<double>(t.dot(w, w, n)));
      if (t.leader()) sc.beta[j] = 0.0;
    } else {
      scale_by = beta;
    }
    const S inv = static_cast<S>(1.0 / scale_by);
    S* q_next = Q + static_cast<int64_t>(j + 1) * n;
    for (int i = t.rank(); i < n; i += t.size()) q_next[i] = w[i] * inv;
    t.sync();
  }

  const int steps = sc.flags[kSteps];
  if (sc.flags[kNaN]) {
    for (int i = t.rank(); i < n; i += t.size()) vector_out[i] = static_cast<S>(NAN);
    if (t.leader()) {
      for (int k = 0; k < opt.topk; ++k) lambdas_out[k] = static_cast<S>(NAN);
      *iterations_out = steps;
      *residual_out = static_cast<S>(NAN);
    }
    t.sync();
    return;
  }

  // Ritz vector y = Q_{0..steps-1}ᵀ s for θ_1, and its explicit residual ‖K y − θ_1 y‖.
  if (t.leader()) tridiag_eigvec(sc.alpha, sc.beta, steps, sc.ritz[0], sc.s, sc.work);
  t.sync();
  t.combination(Q, steps, n, sc.s, vector_out);
  const double ynorm = sqrt(static_cast<double>(t.dot(vector_out, vector_out, n)));
  const S theta = static_cast<S>(sc.ritz[0]);
  {
    const S inv = static_cast<S>(ynorm > 0.0 ? 1.0 / ynorm : 1.0);
    for (int i = t.rank(); i < n; i += t.size()) vector_out[i] *= inv;
  }
  t.sync();
  t.gemv(K, n, n, vector_out, w);
  for (int i = t.rank(); i < n; i += t.size()) w[i] -= theta * vector_out[i];
  t.sync();
  const double res = sqrt(static_cast<double>(t.dot(w, w, n)));
  if (t.leader()) {
    for (int k = 0; k < opt.topk; ++k) lambdas_out[k] = static_cast<S>(sc.ritz[k]);
    *iterations_out = steps;
    *residual_out = static_cast<S>(res);
  }
  t.sync();
}

}  // namespace linalg
}  // namespace mat_cuda
