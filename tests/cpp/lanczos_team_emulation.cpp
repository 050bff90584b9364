// Runs the shared Lanczos driver (csrc/linalg/lanczos.h) with a team of P std::threads that
// mimics the CUDA thread block (strided element loops, per-thread partial sums, barriers, a
// leader that solves T), and compares it with the one-thread team of the CPU kernel. This
// checks the driver's synchronisation and uniform control flow, which only the GPU exercises
// otherwise. Built and run by tests/test_linalg_lanczos_team.py. Exit code 0 = all match.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>

#include "linalg/lanczos.h"

using mat_cuda::linalg::LanczosOptions;
using mat_cuda::linalg::LanczosScratch;
using mat_cuda::linalg::kMaxTopk;

struct SharedState {
  explicit SharedState(int p) : bar(p), red(p) {}
  std::barrier<> bar;
  std::vector<double> red;
};

// The block-like team: `p` threads, each a "warp" of the CUDA BlockTeam.
struct ThreadTeam {
  int r, p;
  SharedState* sh;
  int rank() const { return r; }
  int size() const { return p; }
  bool leader() const { return r == 0; }
  void sync() const { sh->bar.arrive_and_wait(); }
  double dot(const double* x, const double* y, int n) const {
    double v = 0.0;
    for (int i = r; i < n; i += p) v += x[i] * y[i];
    sh->red[r] = v;
    sync();
    double total = 0.0;
    for (int w = 0; w < p; ++w) total += sh->red[w];
    sync();
    return total;
  }
  void gemv(const double* A, int rows, int cols, const double* x, double* y) const {
    for (int row = r; row < rows; row += p) {
      double v = 0.0;
      for (int c = 0; c < cols; ++c) v += A[static_cast<long>(row) * cols + c] * x[c];
      y[row] = v;
    }
    sync();
  }
  void sub_combination(const double* Q, int rows, int n, const double* c, double* w) const {
    for (int i = r; i < n; i += p) {
      double acc = w[i];
      for (int q = 0; q < rows; ++q) acc -= c[q] * Q[static_cast<long>(q) * n + i];
      w[i] = acc;
    }
    sync();
  }
  void combination(const double* Q, int rows, int n, const double* s, double* y) const {
    for (int i = r; i < n; i += p) {
      double acc = 0.0;
      for (int q = 0; q < rows; ++q) acc += s[q] * Q[static_cast<long>(q) * n + i];
      y[i] = acc;
    }
    sync();
  }
};

struct SerialTeam {
  int rank() const { return 0; }
  int size() const { return 1; }
  bool leader() const { return true; }
  void sync() const {}
  double dot(const double* x, const double* y, int n) const {
    double v = 0.0;
    for (int i = 0; i < n; ++i) v += x[i] * y[i];
    return v;
  }
  void gemv(const double* A, int rows, int cols, const double* x, double* y) const {
    for (int row = 0; row < rows; ++row) y[row] = dot(A + static_cast<long>(row) * cols, x, cols);
  }
  void sub_combination(const double* Q, int rows, int n, const double* c, double* w) const {
    for (int q = 0; q < rows; ++q)
      for (int i = 0; i < n; ++i) w[i] -= c[q] * Q[static_cast<long>(q) * n + i];
  }
  void combination(const double* Q, int rows, int n, const double* s, double* y) const {
    for (int i = 0; i < n; ++i) y[i] = 0.0;
    for (int q = 0; q < rows; ++q)
      for (int i = 0; i < n; ++i) y[i] += s[q] * Q[static_cast<long>(q) * n + i];
  }
};

struct Buffers {
  std::vector<double> Q, w, coef, dbl;
  int flags[4];
  LanczosScratch<double> sc;
  Buffers(int n, int m) : Q(static_cast<size_t>(m) * n), w(n), coef(m), dbl(8 * m + 2 * kMaxTopk) {
    sc.Q = Q.data();
    sc.w = w.data();
    sc.coef = coef.data();
    sc.alpha = dbl.data();
    sc.beta = sc.alpha + m;
    sc.s = sc.beta + m;
    sc.work = sc.s + m;
    sc.ritz = sc.work + 5 * m;
    sc.est = sc.ritz + kMaxTopk;
    sc.flags = flags;
  }
};

struct Result {
  std::vector<double> lambdas, vector;
  int iterations = 0;
  double residual = 0.0;
};

Result run_serial(const std::vector<double>& K, const LanczosOptions& opt) {
  Buffers b(opt.n, opt.m);
  Result out;
  out.lambdas.resize(opt.topk);
  out.vector.resize(opt.n);
  SerialTeam t;
  mat_cuda::linalg::lanczos_matrix<double>(t, K.data(), nullptr, opt, b.sc, out.lambdas.data(),
                                           out.vector.data(), &out.iterations, &out.residual);
  return out;
}

Result run_threads(const std::vector<double>& K, const LanczosOptions& opt, int p) {
  Buffers b(opt.n, opt.m);
  Result out;
  out.lambdas.resize(opt.topk);
  out.vector.resize(opt.n);
  SharedState sh(p);
  std::vector<std::thread> threads;
  for (int r = 0; r < p; ++r) {
    threads.emplace_back([&, r] {
      ThreadTeam t{r, p, &sh};
      mat_cuda::linalg::lanczos_matrix<double>(t, K.data(), nullptr, opt, b.sc,
                                               out.lambdas.data(), out.vector.data(),
                                               &out.iterations, &out.residual);
    });
  }
  for (auto& th : threads) th.join();
  return out;
}

// K = Σ_i λ_i u_i u_iᵀ with hashed (not orthogonal) u_i: symmetric PSD, `rank` terms.
std::vector<double> make_matrix(int n, int rank, int seed) {
  std::vector<double> K(static_cast<size_t>(n) * n, 0.0);
  for (int k = 0; k < rank; ++k) {
    std::vector<double> u(n);
    for (int i = 0; i < n; ++i) u[i] = mat_cuda::linalg::hashed_uniform(seed, k + 1, i);
    const double lam = 1.0 / (1.0 + k);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) K[static_cast<size_t>(i) * n + j] += lam * u[i] * u[j];
  }
  return K;
}

int main() {
  int failures = 0, cases = 0;
  const int sizes[] = {1, 2, 7, 33, 64};
  for (int n : sizes) {
    for (int rank : {0, 1, 3, n}) {
      if (rank > n) continue;
      for (int topk : {1, 3}) {
        if (topk > n) continue;
        for (int m : {n < 12 ? n : 12, n}) {
          if (m < topk) continue;
          for (int p : {3, 8}) {
            const LanczosOptions opt{n, m, topk, 1e-10, 0};
            const auto K = make_matrix(n, rank, 7 * n + rank);
            const Result a = run_serial(K, opt);
            const Result b = run_threads(K, opt, p);
            ++cases;
            bool ok = std::abs(a.iterations - b.iterations) <= 1;
            const double scale = std::max(1e-300, std::abs(a.lambdas[0]));
            for (int k = 0; k < topk; ++k)
              ok = ok && std::abs(a.lambdas[k] - b.lambdas[k]) <= 1e-9 * scale + 1e-300;
            ok = ok && std::abs(a.residual - b.residual) <= 1e-6 * scale + 1e-12;
            if (!ok) {
              ++failures;
              std::printf("MISMATCH n=%d rank=%d topk=%d m=%d p=%d: lam %.17g vs %.17g, iters %d vs %d\n",
                          n, rank, topk, m, p, a.lambdas[0], b.lambdas[0], a.iterations,
                          b.iterations);
            }
          }
        }
      }
    }
  }
  // NaN in K: NaN result for the threaded team too (and no hang).
  {
    auto K = make_matrix(16, 3, 1);
    K[5] = NAN;
    const LanczosOptions opt{16, 16, 2, 1e-10, 0};
    const Result b = run_threads(K, opt, 4);
    ++cases;
    if (!std::isnan(b.lambdas[0]) || !std::isnan(b.residual)) {
      ++failures;
      std::printf("MISMATCH NaN matrix: lam %g\n", b.lambdas[0]);
    }
  }
  std::printf("%d cases, %d mismatches\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
