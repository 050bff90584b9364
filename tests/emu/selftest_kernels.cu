// Deliberately wrong kernels, built through the same rewrite as csrc/ (tests/emu/emu_build.py):
// each shows that the emulation catches one class of bug, so that a clean run of the real
// kernels means something. Run by `emu_driver selftest:<name>`; tests/test_cuda_emulation.py
// checks each one fails the way it should.
#include <cuda_runtime.h>

#include <cstdint>

namespace selftest {

// Reads a neighbour's shared slot without a barrier between the write and the read.
__global__ void missing_barrier(float* out) {
  __shared__ float v[64];
  v[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  out[threadIdx.x] = v[(threadIdx.x + 1) % 64];
}

// The same with the barrier: every schedule agrees.
__global__ void with_barrier(float* out) {
  __shared__ float v[64];
  v[threadIdx.x] = static_cast<float>(threadIdx.x + 1);
  __syncthreads();
  out[threadIdx.x] = v[(threadIdx.x + 1) % 64];
}

// Reads shared memory nobody wrote.
__global__ void uninitialised_shared(float* out) {
  __shared__ float v[64];
  __syncthreads();
  out[threadIdx.x] = v[threadIdx.x];
}

// Half of the warp skips a full-mask shuffle.
__global__ void shuffle_lane_missing(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A barrier in divergent code.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// One element past the launched dynamic shared memory.
__global__ void dynamic_shared_overrun(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x + 1] = 1.f;  // blockDim.x floats were launched
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x];
}

// One element past a static shared array.
__global__ void static_shared_overrun(float* out) {
  __shared__ float v[32];
  v[threadIdx.x] = 1.f;  // 64 threads
  __syncthreads();
  out[threadIdx.x] = 0.f;
}

// Reads an array whose pages the driver made unreadable.
__global__ void protected_read(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }

struct Big {
  char bytes[40000];
};
// A kernel parameter above CUDA's 32764-byte limit.
__global__ void oversized_parameter(Big b, float* out) { out[threadIdx.x] = b.bytes[threadIdx.x]; }

cudaError_t launch(const char* which, float* out, const float* in) {
  const char* w = which;
  auto is = [w](const char* s) {
    const char* a = w;
    while (*a && *a == *s) ++a, ++s;
    return *a == 0 && *s == 0;
  };
  if (is("missing_barrier")) missing_barrier<<<1, 64>>>(out);
  else if (is("with_barrier")) with_barrier<<<2, 64>>>(out);
  else if (is("uninitialised_shared")) uninitialised_shared<<<1, 64>>>(out);
  else if (is("shuffle_lane_missing")) shuffle_lane_missing<<<1, 64>>>(out);
  else if (is("divergent_barrier")) divergent_barrier<<<1, 64>>>(out);
  else if (is("dynamic_shared_overrun")) dynamic_shared_overrun<<<1, 64, 64 * sizeof(float)>>>(out);
  else if (is("static_shared_overrun")) static_shared_overrun<<<1, 64>>>(out);
  else if (is("protected_read")) protected_read<<<1, 64>>>(in, out);
  else if (is("oversized_block")) with_barrier<<<1, 2048>>>(out);
  else if (is("oversized_shared")) dynamic_shared_overrun<<<1, 64, 64 * 1024>>>(out);
  else if (is("oversized_parameter")) oversized_parameter<<<1, 64>>>(Big{}, out);
  else return cudaErrorNotSupported;
  return cudaGetLastError();
}

}  // namespace selftest
