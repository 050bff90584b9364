// Lanczos through its host side, as lanczos_cuda.cpp calls it: the device's opt-in shared
// memory (lanczos_device_smem_limit), capped by a budget as MAT_CUDA_LANCZOS_SMEM_LIMIT caps it,
// lanczos_make_plan, a global workspace of M · plan.global_bytes when the plan needs one, then
// lanczos_launch_f32/f64 (which picks lanczos_kernel<S, true> when small and w are shared, else
// lanczos_kernel<S, false>). A placement is forced by the budget: the exact end of the last
// region that should be shared, read off the all-shared plan of the same (n, m):
//   qk:     every region shared, K copied into shared memory        <S, true>
//   q:      Q shared, K read from the input                         <S, true>
//   base:   small and w shared, Q in the workspace                  <S, true>
//   small:  small shared, w and Q in the workspace                  <S, false>
//   w:      w shared, small and Q in the workspace (needs 68m > 4n) <S, false>
//   global: only the fixed 400 bytes shared                         <S, false>
//   auto:   the default device's limit (H100/H200 class, 227 KiB), no cap.
// Placements that need more than 227 KiB get an emulated device with that much.
// The driver checks that the plan it got has exactly the placement asked for.
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

  size_t budget = SIZE_MAX;  // the MAT_CUDA_LANCZOS_SMEM_LIMIT cap; unset for auto
  if (placement != "auto") {
    LanczosPlan all{};
    if (!lanczos_make_plan(n, m, es, SIZE_MAX / 4, &all)) return 4;
    if (placement == "qk") budget = all.k.offset + all.k.bytes;
    else if (placement == "q") budget = all.q.offset + all.q.bytes;
    else if (placement == "base") budget = all.w.offset + all.w.bytes;
    else if (placement == "small") budget = all.small.offset + all.small.bytes;
    else if (placement == "w") budget = mat_cuda::linalg::lanczos_align_up(all.fixed.bytes) + all.w.bytes;
    else if (placement == "global") budget = all.fixed.bytes;
    else {
      fprintf(stderr, "emu: unknown placement %s\n", placement.c_str());
      return 5;
    }
    // Placements that need more than the default device's limit (qk, q for larger n) get a
    // device with that much opt-in shared memory, as the old all-shared plan was tested.
    if (budget > static_cast<size_t>(emu::device().max_smem_optin)) {
      emu::device().max_smem_optin = static_cast<int>(budget);
    }
  }
  size_t device_limit = 0;
  if (mat_cuda::linalg::lanczos_device_smem_limit(0, &device_limit) != cudaSuccess) return 4;
  budget = std::min(budget, device_limit);  // lanczos_cuda.cpp: min(device, override)
  LanczosPlan plan{};
  if (!lanczos_make_plan(n, m, es, budget, &plan)) {
    fprintf(stderr, "emu: lanczos_make_plan refused a budget of %zu bytes\n", budget);
    return 4;
  }
  struct Want { bool small, w, q, k; };
  const Want got{plan.small.shared, plan.w.shared, plan.q.shared, plan.k.bytes > 0};
  Want want = got;
  if (placement == "qk") want = {true, true, true, true};
  if (placement == "q") want = {true, true, true, false};
  if (placement == "base") want = {true, true, false, false};
  if (placement == "small") want = {true, false, false, false};
  if (placement == "w") want = {false, true, false, false};
  if (placement == "global") want = {false, false, false, false};
  if (got.small != want.small || got.w != want.w || got.q != want.q || got.k != want.k) {
    fprintf(stderr, "emu: forcing placement %s (budget %zu) gave small=%d w=%d q=%d k=%d\n",
            placement.c_str(), budget, got.small, got.w, got.q, got.k);
    return 5;
  }
  if (plan.smem_bytes > budget) {
    fprintf(stderr, "emu: plan's shared memory %zu exceeds the budget %zu\n", plan.smem_bytes, budget);
    return 5;
  }

  const auto& Ka = c.array("K");
  const bool has_v0 = c.has_array("v0");
  DeviceBuffer K(Ka.bytes(), 0), V0(has_v0 ? c.array("v0").bytes() : 0, 0);
  // The workspace as lanczos_cuda.cpp allocates it (M · global_bytes bytes; page-aligned here).
  DeviceBuffer ws(static_cast<size_t>(M) * plan.global_bytes, 0);
  DeviceBuffer lam(static_cast<size_t>(M) * topk * es, 0), vec(static_cast<size_t>(M) * n * es, 0),
      it(static_cast<size_t>(M) * 4, 0), res(static_cast<size_t>(M) * es, 0);
  unsigned char* wsp = plan.global_bytes > 0 ? ws.data() : nullptr;
  auto run = [&](emucase::Writer& w, Facts& f) {
    memcpy(K.data(), Ka.data, Ka.bytes());
    if (has_v0) memcpy(V0.data(), c.array("v0").data, V0.bytes());
    for (DeviceBuffer* b : {&ws, &lam, &vec, &it, &res}) memset(b->data(), 0xff, b->bytes());
    cudaError_t err;
    if (es == 4) {
      err = mat_cuda::linalg::lanczos_launch_f32(
          reinterpret_cast<const float*>(K.data()),
          has_v0 ? reinterpret_cast<const float*>(V0.data()) : nullptr, M, opt, plan, wsp,
          reinterpret_cast<float*>(lam.data()), reinterpret_cast<float*>(vec.data()),
          reinterpret_cast<int*>(it.data()), reinterpret_cast<float*>(res.data()), nullptr);
    } else {
      err = mat_cuda::linalg::lanczos_launch_f64(
          reinterpret_cast<const double*>(K.data()),
          has_v0 ? reinterpret_cast<const double*>(V0.data()) : nullptr, M, opt, plan, wsp,
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
    f.add("small_shared", got.small ? 1 : 0);
    f.add("w_shared", got.w ? 1 : 0);
    f.add("q_shared", got.q ? 1 : 0);
    f.add("k_copy", got.k ? 1 : 0);
    f.add("base_shared", lanczos_base_shared(plan) ? 1 : 0);
    f.add("smem_bytes", static_cast<long long>(plan.smem_bytes));
    f.add("global_bytes", static_cast<long long>(plan.global_bytes));
    f.add("block", plan.block);
  };
  return run_case(schedules, run, out);
}

}  // namespace driver
