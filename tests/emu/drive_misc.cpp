// The harness's own checks: the half/bfloat16 conversions (compared with torch's by the pytest)
// and the deliberately wrong kernels of selftest_kernels.cu.
#include "device_buffer.h"
#include "driver.h"

namespace selftest {
cudaError_t launch(const char* which, float* out, const float* in);
}

namespace driver {

// f32 in -> f16 / bf16 bits (as __float2half / __float2bfloat16) and back to f32.
int drive_convert(const emucase::Case& c, const char* out) {
  const auto& xa = c.array("x");
  const float* x = reinterpret_cast<const float*>(xa.data);
  std::vector<uint16_t> h(xa.count), b(xa.count);
  std::vector<float> hf(xa.count), bf(xa.count);
  for (size_t i = 0; i < xa.count; ++i) {
    const __half hv = __float2half(x[i]);
    const __nv_bfloat16 bv = __float2bfloat16(x[i]);
    memcpy(&h[i], &hv, 2);
    memcpy(&b[i], &bv, 2);
    hf[i] = __half2float(hv);
    bf[i] = __bfloat162float(bv);
  }
  emucase::Writer w;
  w.add("f16", "f16", h.data(), h.size());
  w.add("bf16", "bf16", b.data(), b.size());
  w.add("f16_back", "f32", hf.data(), hf.size());
  w.add("bf16_back", "f32", bf.data(), bf.size());
  w.write(out);
  return 0;
}

int drive_selftest(const std::string& which, const std::vector<NamedSchedule>& schedules,
                   const char* out) {
  DeviceBuffer in(64 * sizeof(float), 0), o(128 * sizeof(float), 0);
  auto run = [&](emucase::Writer& w, Facts& f) {
    in.unprotect();
    for (int i = 0; i < 64; ++i) reinterpret_cast<float*>(in.data())[i] = static_cast<float>(i);
    if (which == "protected_read") f.add("protected_bytes", static_cast<long long>(in.protect(0, in.bytes())));
    memset(o.data(), 0, o.bytes());
    const cudaError_t err = selftest::launch(which.c_str(), reinterpret_cast<float*>(o.data()),
                                             reinterpret_cast<const float*>(in.data()));
    f.add("launch_error", std::string("\"") + cudaGetErrorName(err) + "\"");
    in.unprotect();
    w.add("out", "f32", o.data(), 128);
  };
  return run_case(schedules, run, out);
}

}  // namespace driver
