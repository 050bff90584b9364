// The emulation driver's shared pieces: running one case under every schedule and checking
// that the schedules agree bit for bit, and the report the pytest reads.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "case_io.h"
#include "cuda_emulation.h"

namespace driver {

struct NamedSchedule {
  std::string name;
  emu::Schedule schedule;
};

// "forward,reverse,random1,random2,random3" -> schedules.
std::vector<NamedSchedule> parse_schedules(const std::string& spec);

// Extra key/value facts of a case for the report (a JSON object's members, already encoded).
struct Facts {
  std::vector<std::pair<std::string, std::string>> items;
  void add(const std::string& k, const std::string& json_value) { items.push_back({k, json_value}); }
  void add(const std::string& k, long long v) { add(k, std::to_string(v)); }
};

// Runs `run` once per schedule (it must restore its inputs itself and write every output
// into the writer), writes the first schedule's outputs to out_path, compares the others with
// them bit for bit, prints the EMU-REPORT line and returns the exit code (0 = all agree).
int run_case(const std::vector<NamedSchedule>& schedules,
             const std::function<void(emucase::Writer&, Facts&)>& run, const char* out_path);

// The case kinds (one file each).
int drive_optim(const emucase::Case& c, const std::vector<NamedSchedule>& s, const char* out);
int drive_gram(const emucase::Case& c, const std::vector<NamedSchedule>& s, const char* out);
int drive_lanczos(const emucase::Case& c, const std::vector<NamedSchedule>& s, const char* out);
int drive_convert(const emucase::Case& c, const char* out);
int drive_selftest(const std::string& which, const std::vector<NamedSchedule>& s, const char* out);

}  // namespace driver
