// Entry point of the emulation driver (built by tests/emu/emu_build.py):
//   emu_driver <kind> <case file> <output file> [schedules]
// kind: optim | gram | lanczos | convert | selftest:<name>. Prints one "EMU-REPORT {json}" line;
// exit code 0 when every schedule agrees, 1 when they differ, 2 for a bad case, 3 for a fatal
// emulation error (a barrier or warp misuse), ASan/UBSan's own codes for memory errors.
#include "driver.h"

#include <cstdio>
#include <cstring>
#include <set>

#include "emu_record.h"

namespace driver {

std::vector<NamedSchedule> parse_schedules(const std::string& spec) {
  std::vector<NamedSchedule> out;
  size_t start = 0;
  while (start <= spec.size()) {
    size_t comma = spec.find(',', start);
    if (comma == std::string::npos) comma = spec.size();
    const std::string name = spec.substr(start, comma - start);
    start = comma + 1;
    if (name.empty()) continue;
    NamedSchedule s;
    s.name = name;
    if (name == "forward") {
      s.schedule.order = emu::Order::kForward;
    } else if (name == "reverse") {
      s.schedule.order = emu::Order::kReverse;
    } else if (name.rfind("random", 0) == 0) {
      s.schedule.order = emu::Order::kRandom;
      s.schedule.seed = strtoull(name.c_str() + 6, nullptr, 10);
    } else {
      fprintf(stderr, "unknown schedule %s\n", name.c_str());
      exit(2);
    }
    out.push_back(s);
  }
  return out;
}

static std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o + "\"";
}

int run_case(const std::vector<NamedSchedule>& schedules,
             const std::function<void(emucase::Writer&, Facts&)>& run, const char* out_path) {
  std::vector<emucase::Writer::Entry> reference;
  std::string kernels_json = "{", instances_json = "{", launches_json = "[", mismatch_json = "[";
  Facts facts;
  int status = 0;
  for (size_t k = 0; k < schedules.size(); ++k) {
    emu::set_schedule(schedules[k].schedule);
    emu::launches().clear();
    emucase::Writer w;
    Facts f;
    run(w, f);
    std::set<std::string> ran;
    for (const auto& r : emu::launches()) {
      if (r.ran) ran.insert(r.name);
    }
    kernels_json += (k ? "," : "") + json_str(schedules[k].name) + ":[";
    bool first = true;
    for (const auto& n : ran) {
      kernels_json += (first ? "" : ",") + json_str(n);
      first = false;
    }
    kernels_json += "]";
    std::set<std::string> inst;
    for (const auto& r : emu::launches()) {
      if (r.ran && !r.instance.empty()) inst.insert(r.instance);
    }
    instances_json += (k ? "," : "") + json_str(schedules[k].name) + ":[";
    first = true;
    for (const auto& n : inst) {
      instances_json += (first ? "" : ",") + json_str(n);
      first = false;
    }
    instances_json += "]";
    if (k == 0) {
      facts = f;
      w.write(out_path);
      reference = w.entries();
      bool firstl = true;
      for (const auto& r : emu::launches()) {
        char b[320];
        snprintf(b, sizeof b, "%s[%s,[%u,%u,%u],[%u,%u,%u],%zu,%zu,%d,%s]", firstl ? "" : ",",
                 json_str(r.name).c_str(), r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y,
                 r.block.z, r.smem, r.param_bytes, static_cast<int>(r.error), r.ran ? "true" : "false");
        launches_json += b;
        firstl = false;
      }
      continue;
    }
    const auto& cur = w.entries();
    for (size_t a = 0; a < reference.size(); ++a) {
      const auto& ref = reference[a];
      if (a >= cur.size() || cur[a].name != ref.name || cur[a].bytes.size() != ref.bytes.size()) {
        fprintf(stderr, "emu: schedule %s produced different outputs than %s\n",
                schedules[k].name.c_str(), schedules[0].name.c_str());
        status = 1;
        break;
      }
      if (!ref.bytes.empty() && memcmp(cur[a].bytes.data(), ref.bytes.data(), ref.bytes.size()) != 0) {
        size_t i = 0;
        while (cur[a].bytes[i] == ref.bytes[i]) ++i;
        const size_t elem = i / emucase::dtype_size(ref.dtype);
        fprintf(stderr, "emu: schedules %s and %s disagree on %s[%zu] (a race or a missing barrier)\n",
                schedules[0].name.c_str(), schedules[k].name.c_str(), ref.name.c_str(), elem);
        char b[256];
        snprintf(b, sizeof b, "%s[%s,%s,%zu]", mismatch_json.size() > 1 ? "," : "",
                 json_str(schedules[k].name).c_str(), json_str(ref.name).c_str(), elem);
        mismatch_json += b;
        status = 1;
      }
    }
  }
  kernels_json += "}";
  instances_json += "}";
  launches_json += "]";
  mismatch_json += "]";
  std::string schedules_json = "[";
  for (size_t k = 0; k < schedules.size(); ++k) schedules_json += (k ? "," : "") + json_str(schedules[k].name);
  schedules_json += "]";
  std::string facts_json = "{";
  for (size_t i = 0; i < facts.items.size(); ++i) {
    facts_json += (i ? "," : "") + json_str(facts.items[i].first) + ":" + facts.items[i].second;
  }
  facts_json += "}";
  printf("EMU-REPORT {\"schedules\":%s,\"kernels\":%s,\"instances\":%s,\"launches\":%s,\"mismatches\":%s,\"facts\":%s}\n",
         schedules_json.c_str(), kernels_json.c_str(), instances_json.c_str(), launches_json.c_str(), mismatch_json.c_str(),
         facts_json.c_str());
  fflush(stdout);
  return status;
}

}  // namespace driver

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s optim|gram|lanczos|convert|selftest:<name> <case> <out> [schedules]\n",
            argv[0]);
    return 2;
  }
  const std::string kind = argv[1];
  const auto schedules =
      driver::parse_schedules(argc > 4 ? argv[4] : "forward,reverse,random1,random2,random3");
  if (kind.rfind("selftest:", 0) == 0) return driver::drive_selftest(kind.substr(9), schedules, argv[3]);
  const emucase::Case c(argv[2]);
  if (kind == "optim") return driver::drive_optim(c, schedules, argv[3]);
  if (kind == "gram") return driver::drive_gram(c, schedules, argv[3]);
  if (kind == "lanczos") return driver::drive_lanczos(c, schedules, argv[3]);
  if (kind == "convert") return driver::drive_convert(c, argv[3]);
  fprintf(stderr, "unknown kind %s\n", kind.c_str());
  return 2;
}
