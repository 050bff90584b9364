// The masked optimizer through the real host launchers of masked_step.cu (launch_masked_adamw /
// launch_masked_sgd, then launch_masked_module_steps, as the optimizer calls them), one launch
// per parameter dtype present as optim_cuda.cpp does it. Every tensor lives in its own pages;
// the pages that hold only elements of inactive modules (all pages when found_inf is set) are
// made unreadable for the launch, so a kernel that reads a skipped chunk faults.
#include <memory>

#include "device_buffer.h"
#include "driver.h"
#include "optim/optim_launch.h"

namespace driver {

using mat_cuda::optim::AdamModuleCoeffs;
using mat_cuda::optim::ParamDtype;
using mat_cuda::optim::TensorLayout;
using mat_cuda::optim::TensorSlot;

namespace {

struct Tensor {
  std::string dtype;  // of the parameter and gradient
  size_t numel = 0;
  DeviceBuffer p, g, s0, s1;
  bool has_s0 = false, has_s1 = false;
  TensorLayout layout{};
  std::vector<std::pair<size_t, size_t>> inactive_runs;  // element ranges of inactive modules
};

// The module of flat element i, written from the layout table's definition (modules.py
// ModuleMap.kernel_tables), independently of the kernel's own lookup.
int64_t module_of(const TensorLayout& l, const int64_t* groups, size_t i) {
  const int64_t ii = static_cast<int64_t>(i);
  switch (l.code) {
    case 0: return l.module_or_offset;
    case 1: return groups[l.module_or_offset + ii / l.span];
    default: return groups[l.module_or_offset + (ii % l.last_dim) / l.span];
  }
}

void fill(DeviceBuffer& b, const emucase::Array& a) {
  b.unprotect();
  memcpy(b.data(), a.data, a.bytes());
}

}  // namespace

int drive_optim(const emucase::Case& c, const std::vector<NamedSchedule>& schedules, const char* out) {
  const std::string op = c.str("op");
  const int n = static_cast<int>(c.integer("n"));
  const int64_t M = c.integer("num_modules");
  const auto& layout_a = c.array("layout");
  const auto& groups_a = c.array("group_table");
  const auto& mask_a = c.array("mask");
  const auto& steps_a = c.array("steps");
  const int64_t* layout_rows = reinterpret_cast<const int64_t*>(layout_a.data);
  const int64_t* groups_in = reinterpret_cast<const int64_t*>(groups_a.data);
  const unsigned char* mask_in = mask_a.data;
  const bool has_scale = c.has_array("grad_scale");
  const bool has_inf = c.has_array("found_inf");
  const bool inf_set = has_inf && *reinterpret_cast<const float*>(c.array("found_inf").data) != 0.f;

  // Exactly sized small device arrays (ASan catches any index past their end).
  std::vector<int64_t> groups(groups_in, groups_in + groups_a.count);
  std::unique_ptr<bool[]> mask(new bool[M > 0 ? M : 1]);
  std::vector<int64_t> steps(steps_a.count);
  std::vector<AdamModuleCoeffs> coeffs(M + 1);
  float grad_scale = has_scale ? *reinterpret_cast<const float*>(c.array("grad_scale").data) : 1.f;
  float found_inf = has_inf ? *reinterpret_cast<const float*>(c.array("found_inf").data) : 0.f;

  std::vector<std::unique_ptr<Tensor>> tensors;
  size_t protected_pages_bytes = 0, inactive_elems = 0, total_elems = 0;
  for (int i = 0; i < n; ++i) {
    auto t = std::make_unique<Tensor>();
    const auto& pa = c.array("p" + std::to_string(i));
    const auto& ga = c.array("g" + std::to_string(i));
    t->dtype = pa.dtype;
    t->numel = pa.count;
    const size_t es = emucase::dtype_size(pa.dtype);
    t->p.allocate(pa.bytes(), pa.misalign * es);
    t->g.allocate(ga.bytes(), ga.misalign * es);
    t->has_s0 = c.has_array("s0_" + std::to_string(i));
    t->has_s1 = c.has_array("s1_" + std::to_string(i));
    if (t->has_s0) {
      const auto& a = c.array("s0_" + std::to_string(i));
      t->s0.allocate(a.bytes(), a.misalign * 4);
    }
    if (t->has_s1) {
      const auto& a = c.array("s1_" + std::to_string(i));
      t->s1.allocate(a.bytes(), a.misalign * 4);
    }
    const int64_t* r = layout_rows + 4 * i;
    t->layout = TensorLayout{r[0], r[1], r[2], r[3]};
    size_t run_start = 0;
    bool in_run = false;
    for (size_t e = 0; e <= t->numel; ++e) {
      bool inactive = false;
      if (e < t->numel) {
        const int64_t m = module_of(t->layout, groups.data(), e);
        // An id outside [0, M] (a case of a table the host check would refuse) is left
        // readable: the kernel's own out-of-bounds read is what that case must show.
        inactive = inf_set || (m >= 0 && m < M && !mask_in[m]);
        inactive_elems += inactive;
      }
      if (inactive && !in_run) {
        run_start = e;
        in_run = true;
      } else if (!inactive && in_run) {
        t->inactive_runs.push_back({run_start, e});
        in_run = false;
      }
    }
    total_elems += t->numel;
    tensors.push_back(std::move(t));
  }

  auto run = [&](emucase::Writer& w, Facts& facts) {
    // inputs
    for (int64_t m = 0; m < M; ++m) mask[m] = mask_in[m] != 0;
    memcpy(steps.data(), steps_a.data, steps_a.bytes());
    size_t prot = 0;
    for (int i = 0; i < n; ++i) {
      Tensor& t = *tensors[i];
      fill(t.p, c.array("p" + std::to_string(i)));
      fill(t.g, c.array("g" + std::to_string(i)));
      if (t.has_s0) fill(t.s0, c.array("s0_" + std::to_string(i)));
      if (t.has_s1) fill(t.s1, c.array("s1_" + std::to_string(i)));
      const size_t es = emucase::dtype_size(t.dtype);
      for (const auto& run : t.inactive_runs) {
        prot += t.p.protect(run.first * es, run.second * es);
        prot += t.g.protect(run.first * es, run.second * es);
        if (t.has_s0) prot += t.s0.protect(run.first * 4, run.second * 4);
        if (t.has_s1) prot += t.s1.protect(run.first * 4, run.second * 4);
      }
    }
    protected_pages_bytes = prot;

    mat_cuda::optim::MaskedStepDevicePtrs ptrs{};
    ptrs.module_mask = mask.get();
    ptrs.module_steps = steps.data();
    ptrs.group_table = groups.data();
    ptrs.grad_scale = has_scale ? &grad_scale : nullptr;
    ptrs.found_inf = has_inf ? &found_inf : nullptr;
    ptrs.num_modules = M;
    ptrs.maximize = c.integer("maximize") != 0;
    const cudaStream_t stream = nullptr;
    int launches_by_dtype = 0;
    // One launch per parameter dtype present, in optim_cuda.cpp's order.
    const std::pair<const char*, ParamDtype> dtypes[] = {
        {"f32", ParamDtype::kFloat32}, {"bf16", ParamDtype::kBFloat16}, {"f16", ParamDtype::kFloat16}};
    for (const auto& d : dtypes) {
      std::vector<TensorSlot> slots;
      for (int i = 0; i < n; ++i) {
        Tensor& t = *tensors[i];
        if (t.dtype != d.first) continue;
        TensorSlot s{};
        s.param = t.p.data();
        s.grad = t.g.data();
        s.state0 = t.has_s0 ? reinterpret_cast<float*>(t.s0.data()) : nullptr;
        s.state1 = t.has_s1 ? reinterpret_cast<float*>(t.s1.data()) : nullptr;
        s.numel = static_cast<int64_t>(t.numel);
        s.layout = t.layout;
        slots.push_back(s);
      }
      if (slots.empty()) continue;
      ++launches_by_dtype;
      cudaError_t err;
      if (op == "adamw") {
        const mat_cuda::optim::AdamwHyper h{c.num("lr"), c.num("beta1"), c.num("beta2"),
                                            c.num("weight_decay"), c.num("eps")};
        err = mat_cuda::optim::launch_masked_adamw(slots.data(), static_cast<int64_t>(slots.size()),
                                                   d.second, ptrs, h, coeffs.data(), stream);
      } else {
        const mat_cuda::optim::SgdHyper h{c.num("lr"), c.num("momentum"), c.num("dampening"),
                                          c.num("weight_decay"), c.integer("nesterov") != 0};
        err = mat_cuda::optim::launch_masked_sgd(slots.data(), static_cast<int64_t>(slots.size()),
                                                 d.second, ptrs, h, stream);
      }
      if (err != cudaSuccess) {
        fprintf(stderr, "emu: the %s launcher failed: %s\n", op.c_str(), cudaGetErrorName(err));
        exit(4);
      }
    }
    for (auto& t : tensors) {
      t->p.unprotect();
      t->g.unprotect();
      if (t->has_s0) t->s0.unprotect();
      if (t->has_s1) t->s1.unprotect();
    }
    const cudaError_t err = mat_cuda::optim::launch_masked_module_steps(
        steps.data(), mask.get(), M, has_inf ? &found_inf : nullptr, stream);
    if (err != cudaSuccess) {
      fprintf(stderr, "emu: launch_masked_module_steps failed: %s\n", cudaGetErrorName(err));
      exit(4);
    }
    for (int i = 0; i < n; ++i) {
      Tensor& t = *tensors[i];
      w.add("p" + std::to_string(i), t.dtype, t.p.data(), t.numel);
      if (t.has_s0) w.add("s0_" + std::to_string(i), "f32", t.s0.data(), t.numel);
      if (t.has_s1) w.add("s1_" + std::to_string(i), "f32", t.s1.data(), t.numel);
    }
    w.add("steps", "i64", steps.data(), steps.size());
    facts.add("protected_bytes", static_cast<long long>(protected_pages_bytes));
    facts.add("inactive_elements", static_cast<long long>(inactive_elems));
    facts.add("elements", static_cast<long long>(total_elems));
    facts.add("dtype_launchers", launches_by_dtype);
  };
  return run_case(schedules, run, out);
}

}  // namespace driver
