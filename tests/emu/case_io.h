// The case files exchanged with tests/emu/case_io.py: a text header of scalars and array
// descriptors, "end", then the arrays' bytes.
//   EMUCASE 1
//   scalar <name> <value>
//   array <name> <dtype> <count> <offset> <misalign>
//   end
#pragma once

#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace emucase {

inline size_t dtype_size(const std::string& d) {
  if (d == "f64" || d == "i64") return 8;
  if (d == "f32" || d == "i32") return 4;
  if (d == "f16" || d == "bf16") return 2;
  if (d == "u8") return 1;
  fprintf(stderr, "case: unknown dtype %s\n", d.c_str());
  exit(2);
}

struct Array {
  std::string dtype;
  size_t count = 0;
  size_t offset = 0;
  size_t misalign = 0;  // elements to shift the device copy by (a misaligned view)
  const unsigned char* data = nullptr;
  size_t bytes() const { return count * dtype_size(dtype); }
};

class Case {
 public:
  explicit Case(const char* path) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open case file");
    struct stat st;
    fstat(fd, &st);
    size_ = static_cast<size_t>(st.st_size);
    base_ = static_cast<unsigned char*>(mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0));
    close(fd);
    if (base_ == MAP_FAILED) die("cannot map case file");
    const char* p = reinterpret_cast<const char*>(base_);
    const char* end = p + size_;
    size_t payload = 0;
    while (p < end) {
      const char* nl = static_cast<const char*>(memchr(p, '\n', end - p));
      if (!nl) die("unterminated header");
      std::string line(p, nl);
      p = nl + 1;
      if (line == "end") {
        payload = static_cast<size_t>(p - reinterpret_cast<const char*>(base_));
        break;
      }
      char kind[16], name[128], value[128];
      if (sscanf(line.c_str(), "%15s %127s %127s", kind, name, value) < 2) continue;
      if (strcmp(kind, "scalar") == 0) {
        scalars_[name] = value;
      } else if (strcmp(kind, "array") == 0) {
        char dt[16];
        unsigned long long count, offset, mis;
        if (sscanf(line.c_str(), "array %127s %15s %llu %llu %llu", name, dt, &count, &offset, &mis) != 5) {
          die("bad array line");
        }
        Array a;
        a.dtype = dt;
        a.count = count;
        a.offset = offset;
        a.misalign = mis;
        arrays_[name] = a;
      }
    }
    if (payload == 0) die("no end of header");
    for (auto& kv : arrays_) {
      kv.second.data = base_ + payload + kv.second.offset;
      if (payload + kv.second.offset + kv.second.bytes() > size_) die("array past end of file");
    }
  }
  bool has(const std::string& n) const { return scalars_.count(n) || arrays_.count(n); }
  double num(const std::string& n) const {
    auto it = scalars_.find(n);
    if (it == scalars_.end()) die(("missing scalar " + n).c_str());
    return strtod(it->second.c_str(), nullptr);
  }
  int64_t integer(const std::string& n) const {
    auto it = scalars_.find(n);
    if (it == scalars_.end()) die(("missing scalar " + n).c_str());
    return strtoll(it->second.c_str(), nullptr, 10);
  }
  std::string str(const std::string& n) const {
    auto it = scalars_.find(n);
    if (it == scalars_.end()) die(("missing scalar " + n).c_str());
    return it->second;
  }
  const Array& array(const std::string& n) const {
    auto it = arrays_.find(n);
    if (it == arrays_.end()) die(("missing array " + n).c_str());
    return it->second;
  }
  bool has_array(const std::string& n) const { return arrays_.count(n) != 0; }

 private:
  [[noreturn]] static void die(const char* m) {
    fprintf(stderr, "case: %s\n", m);
    exit(2);
  }
  unsigned char* base_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, std::string> scalars_;
  std::map<std::string, Array> arrays_;
};

// Writes arrays in the same format.
class Writer {
 public:
  void add(const std::string& name, const std::string& dtype, const void* data, size_t count) {
    Entry e{name, dtype, count, std::vector<unsigned char>(count * dtype_size(dtype))};
    if (count) memcpy(e.bytes.data(), data, e.bytes.size());
    entries_.push_back(std::move(e));
  }
  void scalar(const std::string& name, const std::string& value) { scalars_.push_back({name, value}); }
  void write(const char* path) const {
    FILE* f = fopen(path, "wb");
    if (!f) {
      fprintf(stderr, "case: cannot write %s\n", path);
      exit(2);
    }
    fprintf(f, "EMUCASE 1\n");
    for (auto& s : scalars_) fprintf(f, "scalar %s %s\n", s.first.c_str(), s.second.c_str());
    size_t off = 0;
    for (auto& e : entries_) {
      fprintf(f, "array %s %s %zu %zu 0\n", e.name.c_str(), e.dtype.c_str(), e.count, off);
      off += e.bytes.size();
    }
    fprintf(f, "end\n");
    for (auto& e : entries_) {
      if (!e.bytes.empty()) fwrite(e.bytes.data(), 1, e.bytes.size(), f);
    }
    fclose(f);
  }

  struct Entry {
    std::string name, dtype;
    size_t count;
    std::vector<unsigned char> bytes;
  };
  const std::vector<Entry>& entries() const { return entries_; }

 private:
  std::vector<Entry> entries_;
  std::vector<std::pair<std::string, std::string>> scalars_;
};

}  // namespace emucase
