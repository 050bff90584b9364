// Validation of the masked optimizer's group table, shared by the CPU and CUDA registrations
// (.cpp only: uses torch).
//
// Every group_table value is a module id the kernels use to index module_mask, module_steps and
// the per-module coefficients, so a value outside [0, num_modules] would read past them. The
// values live on the parameters' device: reading them on CUDA is a device-to-host copy, a host
// synchronisation. The table is static metadata (ModuleMap.kernel_tables builds it once per
// device and map), so each table is checked once per version and remembered:
// the first step with a table (and the first after any in-place change of it) reads it, every
// later step costs a lookup. Both devices take this path, so the CPU tests exercise the cache.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "common/checks.h"

namespace mat_cuda {
namespace optim {

// The check itself on host memory: values (count,) must lie in [0, num_modules].
inline void check_group_table_values(const int64_t* values, int64_t count, int64_t num_modules) {
  for (int64_t i = 0; i < count; ++i) {
    MAT_CHECK(values[i] >= 0 && values[i] <= num_modules, "group_table[", i, "] = ", values[i],
              " is out of range [0, ", num_modules, "]: module ids are 0 .. ", num_modules - 1,
              ", and ", num_modules, " marks unmanaged elements");
  }
}

// Tables already checked: a weak reference to the tensor (it keeps the TensorImpl's address from
// being reused by another tensor while remembered), the data pointer, length, version and module
// count it was checked against. Any difference means "not checked".
class CheckedGroupTables {
 public:
  bool contains(const at::Tensor& t, int64_t num_modules) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_) {
      if (matches(e, t, num_modules)) return true;
    }
    return false;
  }

  void add(const at::Tensor& t, int64_t num_modules) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Drop entries whose tensor is gone, then the oldest if still full.
    std::vector<Entry> kept;
    for (Entry& e : entries_) {
      if (!e.impl.expired()) kept.push_back(std::move(e));
    }
    if (kept.size() >= kCapacity) kept.erase(kept.begin());
    kept.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()),
                         t.const_data_ptr(), t.numel(), t._version(), num_modules});
    entries_ = std::move(kept);
  }

 private:
  static constexpr size_t kCapacity = 64;  // tables in use at once: one per device and group
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    const void* data;
    int64_t numel;
    int64_t version;
    int64_t num_modules;
  };

  static bool matches(const Entry& e, const at::Tensor& t, int64_t num_modules) {
    return !e.impl.expired() && e.impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
           e.data == t.const_data_ptr() && e.numel == t.numel() && e.version == t._version() &&
           e.num_modules == num_modules;
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

inline CheckedGroupTables& checked_group_tables() {
  static CheckedGroupTables tables;
  return tables;
}

// group_table: (G,) int64 contiguous on the parameters' device (shape, dtype and device are
// checked by check_masked_step_inputs). Raises naming the first bad entry; a CUDA table is read
// once per version (one synchronisation), see above. Inference tensors have no version counter:
// they are read at every call.
inline void ensure_group_table_valid(const at::Tensor& group_table, int64_t num_modules) {
  const bool cacheable = !group_table.is_inference();
  if (cacheable && checked_group_tables().contains(group_table, num_modules)) return;
  const at::Tensor host = group_table.device().is_cpu() ? group_table : group_table.cpu();
  check_group_table_values(host.const_data_ptr<int64_t>(), host.numel(), num_modules);
  if (cacheable) checked_group_tables().add(group_table, num_modules);
}

}  // namespace optim
}  // namespace mat_cuda
