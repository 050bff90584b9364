// The mat_cuda operator library: one schema per op, declared once here. CPU kernels register
// in csrc/<family>/*_cpu.cpp and CUDA kernels in csrc/<family>/*_cuda.cpp under the same name
// (TORCH_LIBRARY_IMPL), so Python never branches on the device to pick a kernel. Fake (meta)
// kernels live in mat_cuda/_ops.py. The pybind11 module serves the import and build_info().
#include <torch/extension.h>
#include <torch/library.h>

#ifndef MAT_CUDA_WITH_CUDA
#define MAT_CUDA_WITH_CUDA 0
#define MAT_CUDA_ARCH_LIST ""
#define MAT_CUDA_CUDA_VERSION ""
#endif
#ifndef MAT_CUDA_NVCC_VERSION  // the CUDA toolkit (nvcc --version) of a CUDA build
#define MAT_CUDA_NVCC_VERSION ""
#define MAT_CUDA_CUDA_HOME ""
#endif

// The host compiler that compiled this file (and the extension's other C++ sources).
#if defined(__clang__)
#define MAT_CUDA_CXX_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define MAT_CUDA_CXX_COMPILER "gcc " __VERSION__
#else
#define MAT_CUDA_CXX_COMPILER "unknown"
#endif

TORCH_LIBRARY(mat_cuda, m) {
  // ---- optim: fused masked optimizer steps (csrc/optim/) ----
  // Per-module step counts (num_modules + 1,) int64: slot m advances when module_mask[m] is set
  // and found_inf is unset or zero; the last slot (unmanaged elements) advances every step.
  m.def("masked_module_steps_(Tensor(a!) module_steps, Tensor module_mask, Tensor? found_inf) -> ()");
  // One AdamW step of the elements of active modules (torch.optim.AdamW's update, bias
  // correction at the module's own step count + 1); masked elements and their state untouched.
  // module_steps holds the counts before this step (read only; masked_module_steps_ follows).
  // layout_table: (T, 4) int64 on the CPU; group_table: (G,) int64 on the params' device.
  m.def("masked_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor module_steps, Tensor module_mask, Tensor layout_table, "
        "Tensor group_table, float lr, float beta1, float beta2, float weight_decay, float eps, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // One SGD step (momentum, dampening, nesterov, weight decay) of the elements of active modules;
  // momentum_buffers may be empty when momentum == 0. A module at step count 0 starts its buffer.
  m.def("masked_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor module_steps, Tensor module_mask, Tensor layout_table, Tensor group_table, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");

  // ---- linalg: batched Lanczos (csrc/linalg/) ----
  // K (M, n, n) symmetric, float32/float64; v0 (M, n) optional start vectors. Returns the top
  // `topk` Ritz values (M, topk) descending, the top Ritz vector (M, n), the Lanczos steps
  // taken (M,) int32 and the explicit residual ‖K y − λ y‖ (M,). Sync-free.
  m.def("lanczos_lambda_max(Tensor K, int iters, float tol, Tensor? v0, int topk, int seed) "
        "-> (Tensor, Tensor, Tensor, Tensor)");

  // ---- mntk: per-module Gram accumulation (csrc/mntk/) ----
  // K (M, n, n) f32 += per-module Grams of a linear layer's per-sample gradients g_i = B_iᵀ A_i.
  // A (n, T, d_in) | (n, d_in), B (n, T, d_out) | (n, d_out); group_module (num_groups,) int64;
  // group_dim 0 = groups of output rows, 1 = of input columns; algorithm 0 auto, 1 ghost,
  // 2 explicit; workspace_bytes bounds temporaries; workspace (float32, 1-D), when given, is the
  // explicit form's scratch for per-sample gradients, reused across calls (its size is the bound).
  m.def("linear_gram_(Tensor(a!) K, Tensor A, Tensor B, Tensor group_module, int group_dim, "
        "int group_size, bool weight, bool bias, float scale, int algorithm, int workspace_bytes, "
        "Tensor(b!)? workspace=None) -> ()");
  // K[module] += scale * Gram of an embedding's per-sample weight gradients; indices (n, T) int64,
  // B (n, T, d); algorithm 0 auto, 1 ghost (index equality, sync-free), 2 explicit (per-sample
  // gradients over the batch's distinct ids); auto and explicit count those ids: one host
  // synchronisation on CUDA; 3 sync-free (explicit over a static bound on the distinct ids,
  // min(n·T, num_embeddings), or ghost, chosen by shapes). num_embeddings: 0 = unknown.
  m.def("embedding_gram_(Tensor(a!) K, Tensor indices, Tensor B, int module, int? padding_idx, "
        "float scale, int algorithm, int workspace_bytes, int num_embeddings=0) -> ()");
  // K[group_module[g]] += scale * G_g G_gᵀ for explicit per-sample gradients G (n, p).
  m.def("sample_gram_(Tensor(a!) K, Tensor G, Tensor group_module, int group_size, float scale) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda"] = static_cast<bool>(MAT_CUDA_WITH_CUDA);
  info["cuda_arch_list"] = std::string(MAT_CUDA_ARCH_LIST);
  info["cuda_version"] = std::string(MAT_CUDA_CUDA_VERSION);
  info["torch_version"] = std::string(MAT_CUDA_TORCH_VERSION);
  info["openmp"] = static_cast<bool>(MAT_CUDA_OPENMP);
  info["cxx_compiler"] = std::string(MAT_CUDA_CXX_COMPILER);
  info["cuda_toolkit"] = std::string(MAT_CUDA_NVCC_VERSION);
  info["cuda_home"] = std::string(MAT_CUDA_CUDA_HOME);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mat_cuda compiled kernels (ops are registered under torch.ops.mat_cuda)";
  m.def("build_info", &build_info,
        "What this build compiled: CUDA or not, the arch list, torch and CUDA versions, OpenMP, "
        "the host compiler and the CUDA toolkit.");
}
