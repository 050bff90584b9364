// Lanczos through its host side: lanczos_make_plan on the emulated device, then
// lanczos_launch_f32/f64 with the plan, as lanczos_cuda.cpp calls them (the base-bytes check
// and the global Q workspace when Q is not in shared memory). A placement is forced by giving
// the emulated device exactly the opt-in shared memory that placement needs:
//   qk: base + Q + K;  q: base + Q (K does not fit);  none: base (Q does not fit);
//   auto: the default device (H100/H200 class, 227 KiB).
#include "device_buffer.h"
#include "driver.h"
#include "linalg/lanczos_launch.h"

namespace driver {

using mat_cuda::linalg::LanczosOptions;
using mat_cuda::linalg::LanczosPlan;

int drive_lanczos(const emucase::Case& c, const std::vector<NamedSchedule>& schedules, const char* out) {
  const std::string dtype = c.str("dtype");
  const size_t es = dtype == "f64" ? 8 : 4;
  const int64_t M = c.integer("M");
  const int n = static_cast<int>(c.integer("n"));
  const int iters = static_cast<int>(c.integer("iters"));
  const int m = iters < n ? iters : n;
  const int topk = static_cast<int>(c.integer("topk"));
  const std::string placement = c.str("placement");
  const LanczosOptions opt{n, m, topk, c.num("tol"), static_cast<uint64_t>(c.integer("seed"))};

  LanczosPlan plan{};
  if (placement != "auto") {
    emu::device().max_smem_optin = 1 << 30;
    if (lanczos_make_plan(0, n, m, es, &plan) != cudaSuccess) return 4;
    size_t want = plan.base_bytes;
    if (placement == "q" || placement == "qk") want += static_cast<size_t>(m) * n * es;
    if (placement == "qk") want += static_cast<size_t>(n) * n * es;
    emu::device().max_smem_optin = static_cast<int>(want);
  }
  if (lanczos_make_plan(0, n, m, es, &plan) != cudaSuccess) {
    fprintf(stderr, "emu: lanczos_make_plan failed\n");
    return 4;
  }
  const bool want_q = placement == "q" || placement == "qk";
  const bool want_k = placement == "qk";
  if (placement != "auto" && (plan.q_in_shared != want_q || plan.k_in_shared != want_k)) {
    fprintf(stderr, "emu: forcing placement %s gave q_in_shared=%d k_in_shared=%d\n",
            placement.c_str(), plan.q_in_shared, plan.k_in_shared);
    return 5;
  }
  if (plan.base_bytes > plan.max_smem) {
    fprintf(stderr, "emu: base shared memory %zu exceeds the device's %zu\n", plan.base_bytes,
            plan.max_smem);
    return 5;
  }

  const auto& Ka = c.array("K");
  const bool has_v0 = c.has_array("v0");
  DeviceBuffer K(Ka.bytes(), 0), V0(has_v0 ? c.array("v0").bytes() : 0, 0);
  DeviceBuffer Q(plan.q_in_shared ? 0 : static_cast<size_t>(M) * m * n * es, 0);
  DeviceBuffer lam(static_cast<size_t>(M) * topk * es, 0), vec(static_cast<size_t>(M) * n * es, 0),
      it(static_cast<size_t>(M) * 4, 0), res(static_cast<size_t>(M) * es, 0);
  auto run = [&](emucase::Writer& w, Facts& f) {
    memcpy(K.data(), Ka.data, Ka.bytes());
    if (has_v0) memcpy(V0.data(), c.array("v0").data, V0.bytes());
    for (DeviceBuffer* b : {&Q, &lam, &vec, &it, &res}) memset(b->data(), 0xff, b->bytes());
    cudaError_t err;
    if (es == 4) {
      err = mat_cuda::linalg::lanczos_launch_f32(
          reinterpret_cast<const float*>(K.data()),
          has_v0 ? reinterpret_cast<const float*>(V0.data()) : nullptr, M, opt, plan,
          plan.q_in_shared ? nullptr : reinterpret_cast<float*>(Q.data()),
          reinterpret_cast<float*>(lam.data()), reinterpret_cast<float*>(vec.data()),
          reinterpret_cast<int*>(it.data()), reinterpret_cast<float*>(res.data()), nullptr);
    } else {
      err = mat_cuda::linalg::lanczos_launch_f64(
          reinterpret_cast<const double*>(K.data()),
          has_v0 ? reinterpret_cast<const double*>(V0.data()) : nullptr, M, opt, plan,
          plan.q_in_shared ? nullptr : reinterpret_cast<double*>(Q.data()),
          reinterpret_cast<double*>(lam.data()), reinterpret_cast<double*>(vec.data()),
          reinterpret_cast<int*>(it.data()), reinterpret_cast<double*>(res.data()), nullptr);
    }
    if (err != cudaSuccess) {
      fprintf(stderr, "emu: lanczos launch failed: %s\n", cudaGetErrorName(err));
      exit(4);
    }
    const char* dt = es == 4 ? "f32" : "f64";
    w.add("lambdas", dt, lam.data(), static_cast<size_t>(M) * topk);
    w.add("vectors", dt, vec.data(), static_cast<size_t>(M) * n);
    w.add("iterations", "i32", it.data(), static_cast<size_t>(M));
    w.add("residuals", dt, res.data(), static_cast<size_t>(M));
    f.add("q_in_shared", plan.q_in_shared ? 1 : 0);
    f.add("k_in_shared", plan.k_in_shared ? 1 : 0);
    f.add("smem_bytes", static_cast<long long>(plan.smem_bytes));
    f.add("base_bytes", static_cast<long long>(plan.base_bytes));
    f.add("block", plan.block);
  };
  return run_case(schedules, run, out);
}

}  // namespace driver
