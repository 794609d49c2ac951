// procpool - how much memory a worker holds: statm's cheap counts, the
// private pages of smaps_rollup, and the gauge max_memory_per_child reads
// after each task.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <optional>

namespace procpool::detail {

/// This process's pages from /proc/self/statm: its address space, and its
/// resident memory less what is backed by a file or shared memory (the
/// binary, libraries, procpool's shared buffers). That resident count still
/// includes the pages a fork shares with its parent until either writes them.
struct StatmBytes {
  std::size_t address_space = 0;
  std::size_t resident = 0;
};
inline StatmBytes statm_bytes() {
  std::size_t pages_total = 0, pages_resident = 0, pages_shared = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%zu %zu %zu", &pages_total, &pages_resident, &pages_shared) != 3) pages_resident = 0;
    std::fclose(f);
  }
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return {pages_total * page, (pages_resident - std::min(pages_shared, pages_resident)) * page};
}

/// The resident memory this process alone holds (Private_Clean plus
/// Private_Dirty of /proc/self/smaps_rollup), or nullopt where that cannot
/// be read. The kernel walks the page tables for it: about 10 ms per GiB.
inline std::optional<std::size_t> private_bytes() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return std::nullopt;
  std::size_t total = 0;
  bool found = false;
  char line[256];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    std::size_t kb = 0;
    if (std::sscanf(line, "Private_Clean: %zu kB", &kb) == 1 || std::sscanf(line, "Private_Dirty: %zu kB", &kb) == 1) {
      total += kb << 10;
      found = true;
    }
  }
  std::fclose(f);
  if (!found) return std::nullopt;
  return total;
}

/// Whether a worker holds more than max_memory_per_child of its own. statm
/// is cheap, and exact but for the pages a fork shares with its parent: only
/// past the cap does the gauge ask for the private count, and then at most
/// about a tenth of the time (between two counts, it adds what statm grew).
class MemoryGauge {
 public:
  bool over(std::size_t cap) {
    const std::size_t resident = statm_bytes().resident;
    if (resident <= cap) return false;
    const auto now = std::chrono::steady_clock::now();
    if (counted_ && now < next_count_) {
      return private_ + (resident > resident_then_ ? resident - resident_then_ : 0) > cap;
    }
    const std::optional<std::size_t> own = private_bytes();
    if (!own) return true;  // statm's count stands
    const auto after = std::chrono::steady_clock::now();
    counted_ = true;
    private_ = *own;
    resident_then_ = resident;
    next_count_ = after + 9 * (after - now);
    return private_ > cap;
  }

 private:
  bool counted_ = false;
  std::size_t private_ = 0;
  std::size_t resident_then_ = 0;
  std::chrono::steady_clock::time_point next_count_{};
};

}  // namespace procpool::detail
