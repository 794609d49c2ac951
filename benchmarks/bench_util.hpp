// Helpers shared by procpool_bench_workloads and procpool_bench_raw: argument
// parsing (key=value), the CPU-bound task, /proc readers, JSON output.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline constexpr double mib = 1024.0 * 1024.0;

/// The median of `values` (not empty).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t mid = values.size() / 2;
  return values.size() % 2 != 0 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
}

/// `prog <workload> key=value...`: the key=value pairs.
class Args {
 public:
  Args(int argc, char** argv, int first) {
    for (int i = first; i < argc; ++i) {
      std::string a = argv[i];
      auto eq = a.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("expected key=value, got " + a);
      values_[a.substr(0, eq)] = a.substr(eq + 1);
    }
  }
  long num(const std::string& key, long fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : static_cast<long>(std::stod(it->second));  // accepts 1e6
  }
  std::size_t size(const std::string& key, std::size_t fallback) const {
    long v = num(key, static_cast<long>(fallback));
    if (v < 0) throw std::invalid_argument(key + " must not be negative");
    return static_cast<std::size_t>(v);
  }
  std::string str(const std::string& key, const std::string& fallback) const {
    auto it = values_.find(key);
    return it == values_.end() ? fallback : it->second;
  }

 private:
  std::map<std::string, std::string> values_;
};

/// The CPU-bound task: a chain of dependent xorshift steps the compiler can
/// neither vectorize nor fold. About 1 ns an iteration.
inline std::uint64_t spin(std::uint64_t iterations) {
  std::uint64_t x = 88172645463325252ULL + iterations;
  for (std::uint64_t i = 0; i < iterations; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
  }
  return x;
}

/// Iterations of spin() that take about `ms` milliseconds here (best of 5).
inline std::uint64_t calibrate_spin(double ms) {
  const std::uint64_t probe = 2'000'000;
  double best = 1e9;
  volatile std::uint64_t sink = 0;
  for (int i = 0; i < 5; ++i) {
    auto start = Clock::now();
    sink = sink + spin(probe);
    best = std::min(best, seconds_since(start));
  }
  return static_cast<std::uint64_t>(static_cast<double>(probe) * (ms / 1000.0) / best);
}

/// A field of /proc/<pid>/smaps_rollup or /proc/<pid>/status, in kB (-1 if absent).
inline long proc_field_kb(const std::string& file, const std::string& field) {
  FILE* f = std::fopen(file.c_str(), "r");
  if (f == nullptr) return -1;
  char line[512];
  long value = -1;
  const std::string prefix = field + ":";
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::string(line).rfind(prefix, 0) == 0) {
      value = std::strtol(line + prefix.size(), nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return value;
}

/// Memory of one process, from /proc/<pid>/smaps_rollup, in MiB.
struct ProcessMemory {
  double rss = 0;       // resident, shared pages included
  double pss = 0;       // shared pages divided among their sharers
  double private_ = 0;  // resident pages no other process maps: its cost beyond shared pages
};

inline ProcessMemory process_memory(long pid) {
  const std::string file = fmt::format("/proc/{}/smaps_rollup", pid);
  ProcessMemory m;
  m.rss = static_cast<double>(proc_field_kb(file, "Rss")) / 1024.0;
  m.pss = static_cast<double>(proc_field_kb(file, "Pss")) / 1024.0;
  m.private_ =
      static_cast<double>(proc_field_kb(file, "Private_Clean") + proc_field_kb(file, "Private_Dirty")) / 1024.0;
  if (m.rss < 0 || m.pss < 0) throw std::runtime_error("cannot read " + file);
  return m;
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
inline double peak_rss_mib() { return static_cast<double>(proc_field_kb("/proc/self/status", "VmHWM")) / 1024.0; }

/// One JSON line: {"impl": ..., "workload": ..., "value": ..., "unit": ..., extras}.
class Json {
 public:
  Json(std::string impl, std::string workload) {
    add("impl", std::move(impl));
    add("workload", std::move(workload));
  }
  Json& add(const std::string& key, const std::string& value) {
    fields_.push_back(fmt::format("\"{}\": \"{}\"", key, value));
    return *this;
  }
  Json& add(const std::string& key, const char* value) { return add(key, std::string(value)); }
  Json& add(const std::string& key, double value) {
    fields_.push_back(fmt::format("\"{}\": {:.6g}", key, value));
    return *this;
  }
  Json& add(const std::string& key, long value) {
    fields_.push_back(fmt::format("\"{}\": {}", key, value));
    return *this;
  }
  Json& add(const std::string& key, std::size_t value) { return add(key, static_cast<long>(value)); }
  void print() const {
    std::string line = "{";
    for (std::size_t i = 0; i < fields_.size(); ++i) line += (i ? ", " : "") + fields_[i];
    fmt::print("{}}}\n", line);
    std::fflush(stdout);
  }

 private:
  std::vector<std::string> fields_;
};

}  // namespace bench
