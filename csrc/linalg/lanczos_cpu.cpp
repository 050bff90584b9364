// CPU kernel of mat_cuda::lanczos_lambda_max: at::parallel_for over the matrices, one thread per
// matrix (SerialTeam) running the shared driver of lanczos.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "linalg/lanczos.h"
#include "linalg/lanczos_checks.h"

namespace mat_cuda {
namespace linalg {
namespace {

// x·y with eight independent partial sums, so that g++ vectorises it without -ffast-math.
template <typename S>
inline S dot8(const S* __restrict__ x, const S* __restrict__ y, int n) {
  S acc[8] = {S(0), S(0), S(0), S(0), S(0), S(0), S(0), S(0)};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += x[i + u] * y[i + u];
  }
  S tail = S(0);
  for (; i < n; ++i) tail += x[i] * y[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// The one-thread team of the CPU kernel (see the interface in lanczos.h).
struct SerialTeam {
  int rank() const { return 0; }
  int size() const { return 1; }
  bool leader() const { return true; }
  void sync() const {}

  // A few per step (α and norms, O(n)); the matvecs use dot8 in the input precision.
  template <typename S>
  double dot(const S* x, const S* y, int n) const {
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * static_cast<double>(y[i]);
    return acc;
  }

  template <typename S>
  void gemv(const S* A, int rows, int cols, const S* x, S* y) const {
    for (int r = 0; r < rows; ++r) y[r] = dot8(A + static_cast<int64_t>(r) * cols, x, cols);
  }

  template <typename S>
  void sub_combination(const S* Q, int rows, int n, const S* c, S* __restrict__ w) const {
    for (int r = 0; r < rows; ++r) {
      const S* __restrict__ q = Q + static_cast<int64_t>(r) * n;
      const S cr = c[r];
      for (int i = 0; i < n; ++i) w[i] -= cr * q[i];
    }
  }

  template <typename S>
  void combination(const S* Q, int rows, int n, const double* s, S* __restrict__ y) const {
    for (int i = 0; i < n; ++i) y[i] = S(0);
    for (int r = 0; r < rows; ++r) {
      const S* __restrict__ q = Q + static_cast<int64_t>(r) * n;
      const S sr = static_cast<S>(s[r]);
      for (int i = 0; i < n; ++i) y[i] += sr * q[i];
    }
  }
};

template <typename S>
void lanczos_cpu_impl(const at::Tensor& K, const c10::optional<at::Tensor>& v0,
                      const LanczosOptions& opt, at::Tensor& lambdas, at::Tensor& vectors,
                      at::Tensor& iterations, at::Tensor& residuals) {
  const int64_t M = K.size(0);
  const int64_t n = opt.n, m = opt.m;
  const S* K_ptr = K.data_ptr<S>();
  const S* v0_ptr = v0.has_value() ? v0->data_ptr<S>() : nullptr;
  S* lam_ptr = lambdas.data_ptr<S>();
  S* vec_ptr = vectors.data_ptr<S>();
  int* it_ptr = iterations.data_ptr<int>();
  S* res_ptr = residuals.data_ptr<S>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> sbuf(static_cast<size_t>(m * n + n + m));
    std::vector<double> dbuf(static_cast<size_t>(3 * m + 5 * m + 2 * kMaxTopk));
    int flags[4];
    LanczosScratch<S> sc;
    sc.Q = sbuf.data();
    sc.w = sc.Q + m * n;
    sc.coef = sc.w + n;
    sc.alpha = dbuf.data();
    sc.beta = sc.alpha + m;
    sc.s = sc.beta + m;
    sc.work = sc.s + m;
    sc.ritz = sc.work + 5 * m;
    sc.est = sc.ritz + kMaxTopk;
    sc.flags = flags;
    SerialTeam team;
    for (int64_t b = begin; b < end; ++b) {
      lanczos_matrix<S>(team, K_ptr + b * n * n, v0_ptr ? v0_ptr + b * n : nullptr, opt, sc,
                        lam_ptr + b * opt.topk, vec_ptr + b * n, it_ptr + b, res_ptr + b);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_lambda_max_cpu(
    const at::Tensor& K, int64_t iters, double tol, const c10::optional<at::Tensor>& v0,
    int64_t topk, int64_t seed) {
  const at::Device device(at::kCPU);
  CHECK_DEVICE(K, device);
  const int64_t m = check_lanczos_inputs(K, v0, iters, tol, topk);
  auto [lambdas, vectors, iterations, residuals] = lanczos_outputs(K, topk);
  if (K.size(0) == 0) return {lambdas, vectors, iterations, residuals};
  const LanczosOptions opt{static_cast<int>(K.size(1)), static_cast<int>(m),
                           static_cast<int>(topk), tol, static_cast<uint64_t>(seed)};
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "lanczos_lambda_max_cpu", [&] {
    lanczos_cpu_impl<scalar_t>(K, v0, opt, lambdas, vectors, iterations, residuals);
  });
  return {lambdas, vectors, iterations, residuals};
}

}  // namespace

TORCH_LIBRARY_IMPL(mat_cuda, CPU, m) {
  m.impl("lanczos_lambda_max", &lanczos_lambda_max_cpu);
}

}  // namespace linalg
}  // namespace mat_cuda
