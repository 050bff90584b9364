// "Device" memory of the emulation for the driver's tensors: each buffer has its own pages with
// a PROT_NONE guard page on both sides; the bytes between the page edges and the data are
// poisoned for AddressSanitizer, so any access outside [data, data + bytes) is reported. Whole
// pages inside the data can be made unreadable (mprotect) to prove a kernel never touches them.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace emu {
// Pages made unreadable on purpose: the SIGSEGV handler (emu_runtime.cpp) names them.
void note_unreadable(const void* begin, size_t bytes);
void forget_unreadable(const void* begin, size_t bytes);
}  // namespace emu

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, size_t misalign_bytes) { allocate(bytes, misalign_bytes); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(); }

  void allocate(size_t bytes, size_t misalign_bytes) {
    release();
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = bytes;
    span_ = (misalign_bytes + bytes + page_ - 1) / page_ * page_;
    if (span_ == 0) span_ = page_;
    map_bytes_ = span_ + 2 * page_;
    map_ = static_cast<unsigned char*>(
        mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map_ == MAP_FAILED) {
      fprintf(stderr, "DeviceBuffer: mmap of %zu bytes failed\n", map_bytes_);
      exit(2);
    }
    mprotect(map_, page_, PROT_NONE);
    mprotect(map_ + page_ + span_, page_, PROT_NONE);
    data_ = map_ + page_ + misalign_bytes;
#if defined(__SANITIZE_ADDRESS__)
    __asan_poison_memory_region(map_ + page_, misalign_bytes);
    __asan_poison_memory_region(data_ + bytes_, span_ - misalign_bytes - bytes_);
#endif
  }

  void release() {
    if (map_ == nullptr) return;
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(map_ + page_, span_);
#endif
    munmap(map_, map_bytes_);
    map_ = nullptr;
    data_ = nullptr;
  }

  unsigned char* data() const { return data_; }
  size_t bytes() const { return bytes_; }

  // Makes unreadable every page wholly inside [data + begin, data + end) or covering only
  // bytes of that range and slack outside the data. Returns the bytes protected.
  size_t protect(size_t begin, size_t end) {
    unsigned char* first = map_ + page_;
    unsigned char* lo = data_ + begin;
    unsigned char* hi = data_ + end;
    // a page may be protected when no data byte outside [lo, hi) lies in it
    size_t done = 0;
    for (unsigned char* pg = first; pg < first + span_; pg += page_) {
      unsigned char* a = std::max(pg, data_);
      unsigned char* b = std::min(pg + page_, data_ + bytes_);
      if (a >= b) continue;  // no data bytes in the page
      if (a >= lo && b <= hi) {
        mprotect(pg, page_, PROT_NONE);
        emu::note_unreadable(pg, page_);
        done += page_;
      }
    }
    return done;
  }
  void unprotect() {
    mprotect(map_ + page_, span_, PROT_READ | PROT_WRITE);
    emu::forget_unreadable(map_ + page_, span_);
  }

 private:
  size_t page_ = 4096, bytes_ = 0, span_ = 0, map_bytes_ = 0;
  unsigned char* map_ = nullptr;
  unsigned char* data_ = nullptr;
};
