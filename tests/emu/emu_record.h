// What the emulation records of each launch, for the driver's report.
#pragma once

#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace emu {

struct LaunchRecord {
  const char* name = "";
  std::string instance;  // e.g. "lanczos_kernel<float, true>" (note_instance)
  dim3 grid, block;
  size_t smem = 0;
  size_t param_bytes = 0;
  cudaError_t error = cudaSuccess;
  bool ran = false;
};

// Every launch since the start (or the last clear()), refused ones included.
std::vector<LaunchRecord>& launches();

}  // namespace emu
