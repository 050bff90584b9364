// The Gram kernels through their host launchers (mntk.cu): launch_hadamard_block_sum on given
// S and R blocks, and launch_scatter_tile into a given K.
#include "device_buffer.h"
#include "driver.h"
#include "mntk/mntk_launch.h"

namespace driver {

int drive_gram(const emucase::Case& c, const std::vector<NamedSchedule>& schedules, const char* out) {
  const std::string op = c.str("op");
  if (op == "hadamard") {
    const auto& Sa = c.array("S");
    const auto& Ra = c.array("R");
    DeviceBuffer S(Sa.bytes(), 0), R(Ra.bytes(), 0);
    const int64_t G = c.integer("G"), rI = c.integer("rI"), rJ = c.integer("rJ");
    // A grid-limit case asks for more outputs than memory holds: the launcher must refuse it
    // before launching, so one float is allocated (a launch would overrun it: ASan).
    const size_t count = static_cast<size_t>(G) * rI * rJ;
    const size_t out_count = count > (size_t(1) << 26) ? 1 : count;
    DeviceBuffer O(out_count * 4, 0);
    auto run = [&](emucase::Writer& w, Facts&) {
      memcpy(S.data(), Sa.data, Sa.bytes());
      memcpy(R.data(), Ra.data, Ra.bytes());
      memset(O.data(), 0xff, O.bytes());  // NaN: an output the kernel leaves unwritten shows
      mat_cuda::mntk::HadamardBlockSumArgs a{};
      a.S = reinterpret_cast<const float*>(S.data());
      a.R = reinterpret_cast<const float*>(R.data());
      a.out = reinterpret_cast<float*>(O.data());
      a.ld = c.integer("ld");
      a.r_batch = c.integer("r_batch");
      a.T = c.integer("T");
      a.G = G;
      a.rI = rI;
      a.rJ = rJ;
      const cudaError_t err = mat_cuda::mntk::launch_hadamard_block_sum(a, nullptr);
      if (err != cudaSuccess) {
        fprintf(stderr, "emu: launch_hadamard_block_sum failed: %s\n", cudaGetErrorName(err));
        exit(4);
      }
      w.add("out", "f32", O.data(), out_count);
    };
    return run_case(schedules, run, out);
  }
  if (op == "scatter") {
    const auto& Ka = c.array("K");
    const auto& Ta = c.array("tile");
    const auto& Ga = c.array("group_module");
    DeviceBuffer K(Ka.bytes(), 0), Tl(Ta.bytes(), 0), Gm(Ga.bytes(), 0);
    auto run = [&](emucase::Writer& w, Facts&) {
      memcpy(K.data(), Ka.data, Ka.bytes());
      memcpy(Tl.data(), Ta.data, Ta.bytes());
      memcpy(Gm.data(), Ga.data, Ga.bytes());
      mat_cuda::mntk::ScatterTileArgs a{};
      a.K = reinterpret_cast<float*>(K.data());
      a.tile = reinterpret_cast<const float*>(Tl.data());
      a.group_module = reinterpret_cast<const int64_t*>(Gm.data());
      a.M = c.integer("M");
      a.n = c.integer("n");
      a.G = c.integer("G");
      a.rI = c.integer("rI");
      a.rJ = c.integer("rJ");
      a.i0 = c.integer("i0");
      a.j0 = c.integer("j0");
      a.mirror = c.integer("mirror") != 0;
      a.scale = static_cast<float>(c.num("scale"));
      const cudaError_t err = mat_cuda::mntk::launch_scatter_tile(a, nullptr);
      if (err != cudaSuccess) {
        fprintf(stderr, "emu: launch_scatter_tile failed: %s\n", cudaGetErrorName(err));
        exit(4);
      }
      w.add("K", "f32", K.data(), Ka.count);
    };
    return run_case(schedules, run, out);
  }
  fprintf(stderr, "unknown gram op %s\n", op.c_str());
  return 2;
}

}  // namespace driver
