// Host test of csrc/linalg/lanczos_plan.h, the CUDA Lanczos kernel's memory plan and carving.
// 1. Invariants over a grid of (n, m, dtype, budget): regions aligned, inside their memory,
//    disjoint, shared use within the budget, and greedy (a region went global only if it did
//    not fit after the ones before it).
// 2. The case the plan exists for: float32 n = 60000 on a 227 KB GPU is planned (w global).
// 3. Carving: the shared Lanczos driver run on the carved scratch of every placement (budgets
//    chosen to push small, w, Q and K out of shared memory one after another) gives bitwise the
//    result of the same driver on separately allocated scratch. Overlapping regions would
//    corrupt it. Exit code 0 and "0 failures" = pass (tests/test_lanczos_plan.py).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "linalg/lanczos_plan.h"

using namespace mat_cuda::linalg;

static int failures = 0;
#define EXPECT(cond, ...)                       \
  do {                                          \
    if (!(cond)) {                              \
      if (failures++ < 20) {                    \
        std::printf("FAIL %s: ", #cond);        \
        std::printf(__VA_ARGS__);               \
        std::printf("\n");                      \
      }                                         \
    }                                           \
  } while (0)

struct SerialTeam {
  int rank() const { return 0; }
  int size() const { return 1; }
  bool leader() const { return true; }
  void sync() const {}
  template <typename S>
  double dot(const S* x, const S* y, int n) const {
    double a = 0.0;
    for (int i = 0; i < n; ++i) a += static_cast<double>(x[i]) * static_cast<double>(y[i]);
    return a;
  }
  template <typename S>
  void gemv(const S* A, int rows, int cols, const S* x, S* y) const {
    for (int r = 0; r < rows; ++r) {
      S v = S(0);
      for (int c = 0; c < cols; ++c) v += A[static_cast<int64_t>(r) * cols + c] * x[c];
      y[r] = v;
    }
  }
  template <typename S>
  void sub_combination(const S* Q, int rows, int n, const S* c, S* w) const {
    for (int i = 0; i < n; ++i) {
      S acc = w[i];
      for (int r = 0; r < rows; ++r) acc -= c[r] * Q[static_cast<int64_t>(r) * n + i];
      w[i] = acc;
    }
  }
  template <typename S>
  void combination(const S* Q, int rows, int n, const double* s, S* y) const {
    for (int i = 0; i < n; ++i) {
      S acc = S(0);
      for (int r = 0; r < rows; ++r) acc += static_cast<S>(s[r]) * Q[static_cast<int64_t>(r) * n + i];
      y[i] = acc;
    }
  }
};

static void check_invariants(const LanczosPlan& p, size_t budget) {
  const LanczosRegion* regions[] = {&p.fixed, &p.small, &p.w, &p.q, &p.k};
  EXPECT(p.fixed.shared, "fixed region global");
  EXPECT(p.smem_bytes <= budget, "smem %zu > budget %zu", p.smem_bytes, budget);
  EXPECT(p.global_bytes % kLanczosAlign == 0, "global bytes %zu unaligned", p.global_bytes);
  size_t shared_so_far = 0;
  for (int a = 0; a < 5; ++a) {
    const LanczosRegion& r = *regions[a];
    if (r.bytes == 0) continue;
    EXPECT(r.offset % kLanczosAlign == 0, "region %d offset %zu unaligned", a, r.offset);
    EXPECT(r.offset + r.bytes <= (r.shared ? p.smem_bytes : p.global_bytes),
           "region %d [%zu, +%zu) outside its memory", a, r.offset, r.bytes);
    for (int b = 0; b < a; ++b) {
      const LanczosRegion& o = *regions[b];
      if (o.bytes == 0 || o.shared != r.shared) continue;
      EXPECT(r.offset >= o.offset + o.bytes || o.offset >= r.offset + r.bytes,
             "regions %d and %d overlap", a, b);
    }
    if (!r.shared && a < 4) {  // greedy: it did not fit after the shared ones before it
      EXPECT(lanczos_align_up(shared_so_far) + r.bytes > budget, "region %d global but fits", a);
    }
    if (r.shared) shared_so_far = r.offset + r.bytes;
  }
}

template <typename S>
static bool run_driver(int n, int m, const LanczosPlan* plan, const std::vector<S>& K,
                       std::vector<S>* lam, std::vector<S>* vec, int* iters, S* res) {
  LanczosOptions opt{n, m, std::min(2, m), 1e-6, 7};
  LanczosScratch<S> sc;
  std::vector<unsigned char> smem, gmem;
  std::vector<S> Q, w, coef, kcopy;
  std::vector<double> d;
  std::vector<int> flags(4);
  const S* Kp = K.data();
  if (plan != nullptr) {
    // Poisoned, 16-byte aligned buffers.
    smem.assign(plan->smem_bytes + 16, 0xff);
    gmem.assign(plan->global_bytes + 16, 0xff);
    auto align = [](unsigned char* p) {
      return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 15) / 16 * 16);
    };
    S* kc = lanczos_carve<S, false>(*plan, align(smem.data()), align(gmem.data()), &sc);
    if (kc != nullptr) {
      std::memcpy(kc, K.data(), K.size() * sizeof(S));
      Kp = kc;
    }
  } else {
    Q.assign(static_cast<size_t>(m) * n, S(0));
    w.assign(n, S(0));
    coef.assign(m, S(0));
    d.assign(8 * m + 2 * kMaxTopk, 0.0);
    sc.Q = Q.data();
    sc.w = w.data();
    sc.coef = coef.data();
    sc.alpha = d.data();
    sc.beta = sc.alpha + m;
    sc.s = sc.beta + m;
    sc.work = sc.s + m;
    sc.ritz = sc.work + 5 * m;
    sc.est = sc.ritz + kMaxTopk;
    sc.flags = flags.data();
  }
  lam->assign(opt.topk, S(0));
  vec->assign(n, S(0));
  SerialTeam team;
  lanczos_matrix<S>(team, Kp, nullptr, opt, sc, lam->data(), vec->data(), iters, res);
  return true;
}

template <typename S>
static void check_carving(int n, int m) {
  std::mt19937 rng(n * 131 + m);
  std::normal_distribution<double> normal;
  // K = G Gᵀ, PSD.
  const int r = std::max(1, n / 2);
  std::vector<double> G(static_cast<size_t>(n) * r);
  for (double& g : G) g = normal(rng);
  std::vector<S> K(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double v = 0.0;
      for (int k = 0; k < r; ++k) v += G[static_cast<size_t>(i) * r + k] * G[static_cast<size_t>(j) * r + k];
      K[static_cast<size_t>(i) * n + j] = static_cast<S>(v);
    }
  std::vector<S> lam0, vec0;
  int it0 = 0;
  S res0 = S(0);
  run_driver<S>(n, m, nullptr, K, &lam0, &vec0, &it0, &res0);

  LanczosPlan all;
  lanczos_make_plan(n, m, sizeof(S), SIZE_MAX / 4, &all);
  const size_t fixed = lanczos_fixed_bytes();
  const size_t after_small = lanczos_align_up(fixed) + lanczos_small_bytes(m, sizeof(S));
  const size_t after_w = lanczos_align_up(after_small) + static_cast<size_t>(n) * sizeof(S);
  const size_t after_q = lanczos_align_up(after_w) + static_cast<size_t>(m) * n * sizeof(S);
  // everything shared; K global; K and Q global; w, Q, K global; only fixed shared
  const size_t budgets[] = {SIZE_MAX / 4, after_q, after_w, after_small, fixed};
  int seen = 0;
  for (size_t budget : budgets) {
    LanczosPlan p;
    EXPECT(lanczos_make_plan(n, m, sizeof(S), budget, &p), "no plan for budget %zu", budget);
    check_invariants(p, budget);
    seen |= (p.small.shared ? 0 : 1) | (p.w.shared ? 0 : 2) | (p.q.shared ? 0 : 4) |
            (p.k.bytes > 0 ? 8 : 0);
    std::vector<S> lam, vec;
    int it = 0;
    S res = S(0);
    run_driver<S>(n, m, &p, K, &lam, &vec, &it, &res);
    bool same = it == it0 && lam == lam0 && vec == vec0 &&
                std::memcmp(&res, &res0, sizeof(S)) == 0;
    EXPECT(same, "n=%d m=%d elem=%zu budget=%zu: carved run differs (lam %.17g vs %.17g, it %d vs %d)",
           n, m, sizeof(S), budget, static_cast<double>(lam[0]), static_cast<double>(lam0[0]), it, it0);
  }
  EXPECT(seen == 15, "n=%d m=%d: not every placement was forced (mask %d)", n, m, seen);
}

int main() {
  // 1. invariants over a grid
  const size_t budgets[] = {400, 1000, 4096, 48 * 1024, 101376, 232448, SIZE_MAX / 4};
  const int ns[] = {1, 2, 33, 64, 65, 200, 300, 1000, 4096, 29000, 57000, 60000, 100000, 1 << 20};
  int planned = 0;
  for (size_t elem : {size_t{4}, size_t{8}})
    for (int n : ns)
      for (int m : {1, 8, 32, 64, 200}) {
        if (m > n) continue;
        for (size_t budget : budgets) {
          LanczosPlan p;
          const bool ok = lanczos_make_plan(n, m, elem, budget, &p);
          EXPECT(ok == (budget >= lanczos_fixed_bytes()), "n=%d m=%d budget=%zu planned=%d", n, m,
                 budget, ok);
          if (ok) {
            check_invariants(p, budget);
            ++planned;
          }
        }
      }
  // 2. float32 n = 60000, 32 steps, an H100/H200's 227 KB: w (240 KB) no longer fits.
  LanczosPlan big;
  EXPECT(lanczos_make_plan(60000, 32, 4, 232448, &big), "n=60000 not planned");
  EXPECT(big.small.shared && !big.w.shared && !big.q.shared && big.k.bytes == 0,
         "n=60000 placement small=%d w=%d q=%d k=%zu", big.small.shared, big.w.shared,
         big.q.shared, big.k.bytes);
  LanczosPlan mid;
  lanczos_make_plan(50000, 32, 4, 232448, &mid);
  EXPECT(mid.small.shared && mid.w.shared && !mid.q.shared, "n=50000: w should stay shared");
  // 3. carving, float and double
  for (int n : {1, 33, 64, 65, 200}) {
    const int m = std::min(n, 24);
    check_carving<float>(n, m);
    check_carving<double>(n, m);
  }
  std::printf("%d plans checked, %d failures\n", planned, failures);
  return failures == 0 ? 0 : 1;
}
